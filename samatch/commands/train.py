"""`samatch train`: centralized training of one method on one dataset into a run folder.

RUN_DIR receives config.json, splits.json, metrics.csv, tb/ (TensorBoard), val_history.json,
best.pt (best validation Dice) and last.pt (resume point, rewritten at every validation). Without
--resume, an earlier run in RUN_DIR is first renamed RUN_DIR.<YYYYmmdd-HHMMSS> (samatch.rundir); while
the run lives, RUN_DIR/.run.lock keeps other runs from moving or writing into it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from samatch.config import TrainConfig, apply_overrides, load_config, parse_set_args
from samatch.data import TrainData, build_train_data
from samatch.methods import METHODS
from samatch.rundir import check_free, hold, moved_note, set_aside
from samatch.splits import save_splits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=sorted(METHODS), help="training method (default: config's)")
    p.add_argument("--data", help="dataset folder (omit with --format phantom-cardiac|phantom-lesion)")
    p.add_argument("--format", help="acdc-h5 | acdc-nifti | busi | nifti | phantom-cardiac | phantom-lesion")
    p.add_argument("--label-map", help="e.g. chaos-liver or 1=1")
    p.add_argument("--labeled", type=int, help="labeled budget (patients / images / cases)")
    p.add_argument(
        "--out", required=True, help="run folder (an earlier run in it is first moved to OUT.<date-time>)"
    )
    p.add_argument("--config", help="TOML or JSON file with dotted overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, repeatable")
    p.add_argument("--iterations", type=int, help="shortcut for schedule.iterations")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _overrides(args) -> dict:
    out = parse_set_args(args.set)
    for key, value in (
        ("method.name", args.method),
        ("data.root", args.data),
        ("data.format", args.format),
        ("data.label_map", args.label_map),
        ("data.labeled", args.labeled),
        ("schedule.iterations", args.iterations),
        ("device", args.device),
    ):
        if value is not None:
            out[key] = value
    return out


def run(args) -> int:
    out = Path(args.out)
    check_free(out)  # a live run there: refused now, not after the data are read
    if args.resume:
        if not (out / "last.pt").is_file():
            raise FileNotFoundError(f"{out / 'last.pt'}: nothing to resume")
        # The saved config, with what this command line changes (e.g. a longer --iterations).
        cfg = apply_overrides(TrainConfig.load(out / "config.json"), _overrides(args))
    else:
        cfg = load_config(args.config, _overrides(args))
        if not cfg.data.root and not cfg.data.format.startswith("phantom-"):
            raise ValueError(
                "--data ROOT is required (or --format phantom-cardiac for the built-in phantoms)"
            )
    cfg.data.splits_file = str(out / "splits.json") if args.resume else cfg.data.splits_file
    data = build_train_data(cfg)  # read and checked before anything in `out` is moved or written
    if not args.resume and (moved := set_aside(out)):  # an earlier run there: renamed, not mixed
        print(moved_note(out, moved))
    with hold(out):  # no other run moves or writes into `out` while this one lives
        return _train(args, cfg, data, out)


def _train(args: argparse.Namespace, cfg: TrainConfig, data: TrainData, out: Path) -> int:
    from samatch.allocator import describe
    from samatch.engine import Trainer  # torch-heavy; keep `samatch --help` fast

    save_splits(data.splits, out / "splits.json")
    cfg.save(out / "config.json")
    trainer = Trainer(cfg, data, out_dir=out)
    if trainer.device.type == "cpu":
        print(describe())
    if args.resume:
        trainer.resume(out / "last.pt")
        print(f"resuming {out} at iteration {trainer.iteration}")
    result = trainer.run(progress=not args.quiet)
    print(
        f"done: {result['iteration']} iterations, best val Dice {result['best']['dice']:.4f} "
        f"at iteration {result['best']['iteration']} -> {out}"
    )
    return 0
