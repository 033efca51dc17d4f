"""`samatch sam-report --run RUN_DIR`: per-class Dice of SAM pseudo-labels on validation slices.

Prompts from ground-truth boxes (with and without the nested-structure rule) and from the U-Net's
predicted boxes; for the pretrained SAM and, for SAM-Match runs, the adapted one. Writes
RUN_DIR/sam_report.json. See samatch/sam_report.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder made by `samatch train`")
    p.add_argument("--data", help="dataset folder (default: the run's)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--max-slices", type=int, default=40, help="validation slices with foreground (random)")
    p.add_argument("--threshold", type=float, default=0.5, help="confidence for predicted boxes")
    p.add_argument("--enclosed", help="override sam.enclosed, e.g. 2>3 for ACDC")
    p.add_argument("--device", default="auto")


def run(args) -> int:
    from samatch.data import load_volumes, open_reader, run_splits
    from samatch.engine import load_run_guide, load_run_model
    from samatch.sam_report import collect_slices, format_report, pseudo_label_dice, summarize_report

    cfg, model, device = load_run_model(args.run, args.checkpoint, args.device)
    if args.data:
        cfg.data.root = args.data
    if args.enclosed is not None:
        cfg.sam.enclosed = args.enclosed
    reader = open_reader(cfg.data)
    splits = run_splits(args.run, reader, cfg.data)
    refs = {r.case_id: r for r in reader.cases(None)}
    cases = load_volumes([refs[i] for i in splits.val], desc="val")
    images, labels = collect_slices(cases, cfg.data.size, args.max_slices, cfg.seed)
    images, labels = images.to(device), labels.to(device)
    results = {}
    for stage, adapted in (("before", False), ("after", True)):
        guide, loaded = load_run_guide(args.run, cfg, args.checkpoint, device, adapted)
        if adapted and not loaded:
            break  # not a SAM-Match run: no adapters to compare
        results[stage] = pseudo_label_dice(guide, model, images, labels, args.threshold)
    report = summarize_report(results, reader.class_names)
    report["meta"] = {
        "slices": int(len(images)),
        "size": cfg.data.size,
        "enclosed": cfg.sam.enclosed,
        "threshold": args.threshold,
        "checkpoint": args.checkpoint,
    }
    (Path(args.run) / "sam_report.json").write_text(json.dumps(report, indent=2))
    print(
        f"SAM pseudo-label Dice on {len(images)} validation slices (size {cfg.data.size}, "
        f"enclosed={cfg.sam.enclosed or 'none'}):"
    )
    print(format_report({k: v for k, v in report.items() if k != "meta"}, reader.class_names))
    print(f"-> {Path(args.run) / 'sam_report.json'}")
    return 0
