"""`samatch evaluate`: a run's checkpoint on a split, per volume at native resolution.

Writes RUN_DIR/eval_<split>/cases.csv (one row per case and class) and summary.json, and prints
mean +/- std per class. Distances are in mm when the format carries a spacing, in voxels otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from samatch.commands import add_cascade_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", required=True, help="run folder made by `samatch train`, or a federated run's out-dir"
    )
    p.add_argument(
        "--data",
        help="dataset folder, or phantom site indices such as 0,1,2 (default: config.json's data.root;"
        " a federation of phantom hospitals trained on phantoms 0, 1, 2, its config names 0 alone)",
    )
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device", default="auto")
    add_cascade_arguments(p)


def format_summary(summary: dict, class_names) -> str:
    units = summary["units"]
    lines = [f"{'class':<12} {'n':>3} {'Dice':>15} {'HD95 (' + units + ')':>18} {'ASD (' + units + ')':>18}"]
    for c, e in summary["classes"].items():
        name = class_names[int(c)] if int(c) < len(class_names) else str(c)
        cells = [
            f"{e[m]['mean']:.4f} +/- {e[m]['std']:.4f}"
            if m == "dice"
            else f"{e[m]['mean']:.2f} +/- {e[m]['std']:.2f}"
            for m in ("dice", "hd95", "asd")
        ]
        lines.append(f"{name:<12} {e['n']:>3} {cells[0]:>15} {cells[1]:>18} {cells[2]:>18}")
    m = summary["mean"]
    lines.append(f"{'mean':<12} {'':>3} {m['dice']:>15.4f} {m['hd95']:>18.2f} {m['asd']:>18.2f}")
    return "\n".join(lines)


def run(args) -> int:
    from samatch.data import load_volumes, open_reader, run_splits
    from samatch.engine import load_run_cascade, load_run_model
    from samatch.evaluate import evaluate_cases
    from samatch.metrics import summarize, write_case_csv, write_summary_json

    cfg, model, device = load_run_model(args.run, args.checkpoint, args.device)
    if args.data:
        cfg.data.root = args.data
    reader = open_reader(cfg.data)
    splits = run_splits(args.run, reader, cfg.data)
    ids = getattr(splits, args.split)
    if not ids:
        raise ValueError(
            f"{cfg.data.root or reader.name}: split '{args.split}' is empty "
            f"(this folder has no {args.split} list; test data may be withheld)"
        )
    refs = {r.case_id: r for r in reader.cases(None)}
    cases = load_volumes([refs[i] for i in ids], desc=args.split)
    cascade = None
    if args.sam_cascade:
        cascade = load_run_cascade(args.run, cfg, args.checkpoint, device, args.cascade_threshold)
    rows = evaluate_cases(model, cases, cfg.model.num_classes, cfg.data.size, device, True, cascade)
    summary = summarize(rows)
    out = Path(args.run) / (f"eval_{args.split}" + ("_cascade" if args.sam_cascade else ""))
    out.mkdir(exist_ok=True)
    write_case_csv(out / "cases.csv", rows)
    write_summary_json(out / "summary.json", summary)
    how = " + SAM cascade" if args.sam_cascade else ""
    print(f"{args.run} ({args.checkpoint}.pt{how}) on {args.split}: {len(cases)} cases")
    print(format_summary(summary, reader.class_names))
    print(f"-> {out}/cases.csv, summary.json")
    return 0
