"""`samatch compare RUN_A RUN_B ...`: paired Wilcoxon signed-rank tests on per-patient Dice.

Reads each run's eval_<split>/cases.csv (run `samatch evaluate` first), averages the metric over
classes per case and over each patient's cases (ACDC's ED and ES frames are one patient: one pair),
and tests every run against the first, Bonferroni-corrected over the comparisons. When any cases.csv
lacks the ``patient`` column (written before it existed), every run is paired by case, and the
output says so.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run folders; the first is the reference")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--metric", default="dice", choices=["dice", "hd95", "asd"])


def read_case_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of a cases.csv (``samatch evaluate``)."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: not found (run `samatch evaluate` on this run first)")
    with csv_path.open() as f:
        return list(csv.DictReader(f))


def run(args) -> int:
    from samatch.stats import case_means, compare_runs, format_table, patients_of

    if len(args.runs) < 2:
        raise ValueError("compare needs at least two runs")
    case_rows = {r: read_case_rows(Path(r) / f"eval_{args.split}" / "cases.csv") for r in args.runs}
    per_case = {r: case_means(rows, args.metric) for r, rows in case_rows.items()}
    old = [r for r, rows in case_rows.items() if rows and "patient" not in rows[0]]
    # Pairs are patients when every file names them; else cases, for all runs alike.
    groups = None if old else patients_of(row for rows in case_rows.values() for row in rows)
    rows = compare_runs(per_case, reference=args.runs[0], groups=groups)
    unit = "case" if old else "patient (mean over its cases)"
    print(f"{args.metric} per {unit}, mean over classes, {args.split}; reference: {args.runs[0]}")
    if old:
        print(
            f"no patient column in {', '.join(old)} (written before it existed): "
            "cases paired as if independent"
        )
    print("paired two-sided Wilcoxon signed-rank, Bonferroni over", len(rows), "comparison(s)")
    print(format_table(rows))
    return 0
