"""The server's run folder: ``results.json`` (per-round metrics), ``last.pt`` (resume point) and
``best.pt`` (best global model by mean validation Dice over sites).

Checkpoints use the core's layout (``{"method": state, "config": ...}`` beside ``config.json``), so
``samatch evaluate`` / :func:`samatch.engine.load_run_model` read ``best.pt`` as they read a
centralized run's (under FedBN the global state has no BatchNorm tensors: the model loads with its
initial BatchNorm statistics, and each site's own live only on that site).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from federation.config import FederationConfig
from samatch.config import TrainConfig


class RunRecorder:
    def __init__(
        self, out_dir: str | Path, cfg: TrainConfig, fed: FederationConfig, history: list | None = None
    ):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg, self.fed = cfg, fed
        self.rounds: list[dict] = list(history or [])
        done = [r["evaluate"]["dice_mean"] for r in self.rounds if "dice_mean" in r.get("evaluate", {})]
        self.best = max(done, default=-1.0)
        cfg.save(self.out / "config.json")

    def _save(self, name: str, state: dict[str, torch.Tensor], server_round: int) -> None:
        payload = {
            "method": state,
            "round": server_round,
            "config": self.cfg.to_dict(),
            "federation": asdict(self.fed),
            "history": self.rounds,
        }
        tmp = self.out / f"{name}.tmp"
        torch.save(payload, tmp)
        tmp.replace(self.out / name)  # atomic: a crash never leaves a truncated checkpoint

    def record(
        self, server_round: int, state: dict[str, torch.Tensor], metrics: dict, seconds: float
    ) -> dict:
        """Append the round to results.json, save last.pt, and best.pt when mean Dice improved."""
        row = {"round": server_round, "seconds": round(seconds, 2), **metrics}
        self.rounds.append(row)
        dice = metrics.get("evaluate", {}).get("dice_mean")
        row["best"] = dice is not None and dice > self.best
        if row["best"]:
            self.best = dice
            self._save("best.pt", state, server_round)
        self._save("last.pt", state, server_round)
        (self.out / "results.json").write_text(
            json.dumps({"rounds": self.rounds, "best_dice": self.best}, indent=1)
        )
        return row


def load_resume(path: str | Path) -> dict:
    """A ``last.pt`` (or the folder holding one) -> {"method", "round", "history", ...}."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no checkpoint to resume from")
    return torch.load(p, map_location="cpu", weights_only=False)
