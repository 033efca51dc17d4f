"""`samatch compare RUN_A RUN_B ...`: paired Wilcoxon signed-rank tests on per-case Dice.

Reads each run's eval_<split>/cases.csv (run `samatch evaluate` first), averages Dice over classes
per case, and tests every run against the first, Bonferroni-corrected over the comparisons.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run folders; the first is the reference")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--metric", default="dice", choices=["dice", "hd95", "asd"])


def per_case_means(csv_path: Path, metric: str) -> dict[str, float]:
    """{case: mean over classes of ``metric``} from a cases.csv."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: not found (run `samatch evaluate` on this run first)")
    values: dict[str, list[float]] = defaultdict(list)
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            values[row["case"]].append(float(row[metric]))
    return {case: sum(v) / len(v) for case, v in values.items()}


def run(args) -> int:
    from samatch.stats import compare_runs, format_table

    if len(args.runs) < 2:
        raise ValueError("compare needs at least two runs")
    per_case = {
        r: per_case_means(Path(r) / f"eval_{args.split}" / "cases.csv", args.metric) for r in args.runs
    }
    rows = compare_runs(per_case, reference=args.runs[0])
    print(f"{args.metric} per case (mean over classes), {args.split}; reference: {args.runs[0]}")
    print("paired two-sided Wilcoxon signed-rank, Bonferroni over", len(rows), "comparison(s)")
    print(format_table(rows))
    return 0
