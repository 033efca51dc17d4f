"""The server's run folder: ``results.json`` (per-round metrics), ``last.pt`` (resume point) and
``best.pt`` (best global model by mean validation Dice over sites).

Checkpoints use the core's layout (``{"method": state, "config": ...}`` beside ``config.json``), so
``samatch evaluate`` / :func:`samatch.engine.load_run_model` read ``best.pt`` as they read a
centralized run's (under FedBN the global state has no BatchNorm tensors: the model loads with its
initial BatchNorm statistics, and each site's own live only on that site).

A cross-task run's global state holds one U-Net per task under wire names (``task.<T>.model.*``),
which the core cannot load; each task therefore also gets its own run folder, ``tasks/<T>/``, with
the task's ``config.json`` and its ``last.pt`` / ``best.pt`` (best by that task's mean validation
Dice) under the site's own key names, so ``samatch evaluate --run <out-dir>/tasks/<T>`` works.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from federation.config import FederationConfig
from federation.state import from_wire
from samatch.config import TrainConfig
from samatch.splits import Splits, save_splits


def _dice(metrics: Mapping) -> float | None:
    return metrics.get("dice_mean")


class RunRecorder:
    """``tasks``: a cross-task run's {task: that task's TrainConfig} (empty for a single-task run)."""

    def __init__(
        self,
        out_dir: str | Path,
        cfg: TrainConfig,
        fed: FederationConfig,
        history: list | None = None,
        tasks: Mapping[str, TrainConfig] | None = None,
        splits: Mapping[str, Splits] | None = None,
    ):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg, self.fed = cfg, fed
        self.rounds: list[dict] = list(history or [])
        self.tasks = dict(tasks or {})
        splits = splits or {}
        self.best = self._best_so_far(self.out, lambda r: r.get("evaluate", {}))
        cfg.save(self.out / "config.json")
        if "" in splits:
            save_splits(splits[""], self.out / "splits.json")
        self.task_best: dict[str, float] = {}
        for task, task_cfg in self.tasks.items():
            folder = self.out / "tasks" / task
            folder.mkdir(parents=True, exist_ok=True)
            task_cfg.save(folder / "config.json")
            if task in splits:
                save_splits(splits[task], folder / "splits.json")
            self.task_best[task] = self._best_so_far(
                folder, lambda r, t=task: r.get("evaluate-tasks", {}).get(t, {})
            )

    def _best_so_far(self, folder: Path, metrics_of: Callable[[dict], Mapping]) -> float:
        """The best mean Dice in the history (a resumed run) when ``folder`` holds its best.pt, else -1
        (a run resumed into another folder, or written before per-task folders: the next round's
        model becomes best.pt)."""
        if not (folder / "best.pt").is_file():
            return -1.0
        return max((d for r in self.rounds if (d := _dice(metrics_of(r))) is not None), default=-1.0)

    def _save(
        self, folder: Path, cfg: TrainConfig, name: str, state: dict[str, torch.Tensor], server_round: int
    ) -> None:
        payload = {
            "method": state,
            "round": server_round,
            "config": cfg.to_dict(),
            "federation": asdict(self.fed),
            "history": self.rounds,
        }
        tmp = folder / f"{name}.tmp"
        torch.save(payload, tmp)
        tmp.replace(folder / name)  # atomic: a crash never leaves a truncated checkpoint

    def record(
        self, server_round: int, state: dict[str, torch.Tensor], metrics: dict, seconds: float
    ) -> dict:
        """Append the round to results.json, save last.pt, and best.pt when mean Dice improved; the
        same per task in ``tasks/<T>/`` (``row["best-tasks"]``: the tasks whose Dice improved)."""
        row = {"round": server_round, "seconds": round(seconds, 2), **metrics}
        self.rounds.append(row)
        dice = _dice(metrics.get("evaluate", {}))
        row["best"] = dice is not None and dice > self.best
        if row["best"]:
            self.best = dice
            self._save(self.out, self.cfg, "best.pt", state, server_round)
        self._save(self.out, self.cfg, "last.pt", state, server_round)
        if self.tasks:
            row["best-tasks"] = []
        for task, task_cfg in self.tasks.items():
            folder, own = self.out / "tasks" / task, from_wire(state, task)
            dice = _dice(metrics.get("evaluate-tasks", {}).get(task, {}))
            if dice is not None and dice > self.task_best[task]:
                self.task_best[task] = dice
                row["best-tasks"].append(task)
                self._save(folder, task_cfg, "best.pt", own, server_round)
            self._save(folder, task_cfg, "last.pt", own, server_round)
        summary = {"rounds": self.rounds, "best_dice": self.best}
        if self.tasks:
            summary["best_dice_tasks"] = self.task_best
        (self.out / "results.json").write_text(json.dumps(summary, indent=1))
        return row

    def task_dice(self, row: dict | None = None) -> str:
        """A cross-task round's (``row``, as :meth:`record` returned it) or, without one, the run's best
        Dice per task, e.g. "acdc 0.8123 *best*, busi 0.5510"; "" when no task has one."""
        if row is None:
            return ", ".join(f"{t} {d:.4f}" for t, d in self.task_best.items() if d >= 0)
        by_task = row.get("evaluate-tasks", {})
        return ", ".join(
            f"{t} {d:.4f}{' *best*' if t in row.get('best-tasks', []) else ''}"
            for t in self.tasks
            if (d := _dice(by_task.get(t, {}))) is not None
        )


def load_resume(path: str | Path) -> dict:
    """A ``last.pt`` (or the folder holding one) -> {"method", "round", "history", ...}."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no checkpoint to resume from")
    return torch.load(p, map_location="cpu", weights_only=False)
