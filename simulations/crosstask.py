"""Does a SAM adapter shared across tasks help? Two cross-task federations, side by side.

    python -m simulations.crosstask --config simulations/crosstask_cpu.toml --out runs/crosstask

The config is a federation run config whose ``partition-manifest`` has ``tasks`` (e.g.
``simulations/crosstask/manifest.json``: an ACDC, a BUSI and a CHAOS-liver hospital). Both arms run
the real ServerApp and ClientApp in this process (:func:`federation.inprocess.run_inprocess`) with
the same seeds, data and schedule; they differ only in ``share-adapters``:

* ``shared`` (``all``): one set of SAM LoRA adapters, averaged over every hospital;
* ``per-task`` (``task``): adapters averaged only among hospitals of the same task.

The U-Nets are per task in both. Reported per task, on that task's validation data, for the final
global model of each arm: the U-Net's mean Dice (the sites' federated evaluation) and SAM's Dice with
ground-truth boxes on up to ``--sam-slices`` validation slices (the adapter's own quality, through
:func:`samatch.sam_report.pseudo_label_dice`). ``--task-set TASK:KEY=VALUE`` changes one task's
settings for this comparison (e.g. ``liver:data.max_unlabeled=1`` on a CPU); the manifest actually
used is written to OUT.

Outputs in OUT: ``crosstask.md``, ``crosstask.json`` and one run folder per arm.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from federation.config import manifest_tasks, parse_run_config, site_from_node_config
from federation.inprocess import run_inprocess
from federation.local import clear_sessions, get_session, load_state
from federation.state import from_wire
from samatch import allocator
from samatch.hardware import hardware
from simulations.compare import load_run_config

ARMS = {"shared": "all", "per-task": "task"}


def write_manifest(manifest: str, task_sets: list[str], out: Path) -> Path:
    """The manifest with absolute data roots and the ``--task-set`` changes, saved in ``out``."""
    data = json.loads(Path(manifest).read_text())
    data["tasks"] = manifest_tasks(manifest)  # data roots resolved
    for item in task_sets:
        task, _, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not eq or task not in data["tasks"]:
            raise ValueError(
                f"--task-set {item!r}: expected TASK:KEY=VALUE with TASK in {sorted(data['tasks'])}"
            )
        try:  # numbers and booleans as JSON; anything else stays a string
            data["tasks"][task][key] = json.loads(value)
        except json.JSONDecodeError:
            data["tasks"][task][key] = value
    path = out / "manifest.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def sam_box_dice(run_config: dict, final: dict, share: str, max_slices: int) -> dict[str, dict]:
    """{task: {"sam_gt_box": mean Dice over classes, "n": slices}} for the final adapters."""
    from samatch.sam_report import collect_slices, pseudo_label_dice

    cfg, fed = parse_run_config(run_config)
    n_sites = len(json.loads(Path(fed.partition_manifest).read_text())["sites"])
    out = {}
    for pid in range(n_sites):
        site = site_from_node_config({"partition-id": pid, "num-partitions": n_sites}, cfg, fed)
        if site.task in out:
            continue
        session = get_session(site, cfg)
        load_state(session, from_wire(final, site.task, share))
        method, data = session.trainer.method, session.trainer.data
        images, labels = collect_slices(data.val, session.cfg.data.size, max_slices, seed=cfg.seed)
        method.eval()
        dice = pseudo_label_dice(method.guide, method.model, images, labels, cfg.method.threshold)
        out[site.task] = {
            "sam_gt_box": float(np.nanmean(dice["gt_box"])),
            "unet_slices": float(np.nanmean(dice["unet"])),
            "n": len(images),
        }
    return out


def run_arm(name: str, base: dict, out: Path, sam_slices: int) -> dict:
    run_config = {**base, "share-adapters": ARMS[name], "out-dir": str(out / name)}
    cfg, fed = parse_run_config(run_config)
    n = len(json.loads(Path(fed.partition_manifest).read_text())["sites"])
    t0 = time.perf_counter()
    run_inprocess(*_apps(), run_config, [{"partition-id": i, "num-partitions": n} for i in range(n)])
    seconds = time.perf_counter() - t0
    results = json.loads((out / name / "results.json").read_text())
    final = torch.load(out / name / "last.pt", weights_only=False)["method"]
    last = results["rounds"][-1]
    per_task = {t: {"unet_dice": m.get("dice_mean")} for t, m in last.get("evaluate-tasks", {}).items()}
    for task, row in sam_box_dice(run_config, final, ARMS[name], sam_slices).items():
        per_task.setdefault(task, {}).update(row)
    rounds = [
        {t: m.get("dice_mean") for t, m in r.get("evaluate-tasks", {}).items()} | {"round": r["round"]}
        for r in results["rounds"]
    ]
    return {"share-adapters": ARMS[name], "seconds": round(seconds, 1), "tasks": per_task, "rounds": rounds}


def _apps():
    from clients.client_app import app as client_app
    from server.server_app import app as server_app

    return server_app, client_app


def format_table(arms: dict) -> str:
    tasks = sorted({t for a in arms.values() for t in a["tasks"]})
    lines = [
        "| task | adapters | U-Net val Dice (volumes) | SAM Dice, GT boxes (slices) | slices |",
        "|---|---|---|---|---|",
    ]
    for task in tasks:
        for name, arm in arms.items():
            row = arm["tasks"].get(task, {})
            unet = row.get("unet_dice")
            lines.append(
                f"| {task} | {name} | {unet * 100:.2f} | {row.get('sam_gt_box', float('nan')) * 100:.2f} | "
                f"{row.get('n', 0)} |"
                if unet is not None
                else f"| {task} | {name} | - | - | - |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulations.crosstask", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="federation run config TOML with a cross-task manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, repeatable")
    p.add_argument("--task-set", action="append", default=[], metavar="TASK:KEY=VALUE")
    p.add_argument("--sam-slices", type=int, default=16, help="validation slices per task for SAM's Dice")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    allocator.add_allocator_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    allocator.relaunch(args.allocator, argv, parser)  # from the command line: start again on it
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        base = load_run_config(args.config, args.set, None)
        if not manifest_tasks(str(base.get("partition-manifest", ""))):
            raise ValueError(f"{args.config}: partition-manifest must name a manifest with tasks")
        base["partition-manifest"] = str(write_manifest(base["partition-manifest"], args.task_set, out))
        arms = {}
        for name in ARMS:
            clear_sessions()
            print(f"crosstask: arm {name} (share-adapters={ARMS[name]})", flush=True)
            arms[name] = run_arm(name, base, out, args.sam_slices)
        clear_sessions()
    except (OSError, ValueError, KeyError) as exc:
        print(f"crosstask: error: {exc}", file=sys.stderr)
        return 2
    report = {"config": base, "arms": arms, "hardware": hardware(), "argv": sys.argv}
    (out / "crosstask.json").write_text(json.dumps(report, indent=1, default=str))
    table = format_table(arms)
    (out / "crosstask.md").write_text(f"# Shared vs per-task SAM adapters\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
