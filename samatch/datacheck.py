"""``samatch data check ROOT``: load every case of a dataset folder, validate it, print a summary.

Per split (or for the whole folder when the layout has no splits) it prints cases, patients,
slices, image sizes, spacing, label values and voxel counts per class. A bad file ends the check
with one line naming it (exit 2); with ``--keep-going`` each bad file gets its line, the good
cases are still summarized, and the exit code is still 2.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from samatch.io import READERS, open_dataset
from samatch.io.base import Case, CaseRef, DataError, Reader
from samatch.io.labelmap import PRESETS, parse_label_map

MAX_LISTED = 4  # list up to this many distinct sizes/spacings, else show ranges


def _label_map_arg(text: str):
    try:
        return parse_label_map(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, help="dataset folder")
    parser.add_argument(
        "--format", choices=list(READERS), default=None, help="default: detected from the folder"
    )
    parser.add_argument(
        "--label-map",
        type=_label_map_arg,
        default=None,
        help=f"select classes: a preset ({', '.join(PRESETS)}) or 'SRC=DST[,SRC=DST]'; unmapped values -> 0",
    )
    parser.add_argument("--keep-going", action="store_true", help="report every bad file instead of stopping")


@dataclass
class SplitSummary:
    """What one split's good cases add up to. ``voxels[v]``: voxels with label value v."""

    cases: int = 0
    patients: set[str] = field(default_factory=set)
    slices: int = 0
    slices_per_case: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)  # (H, W) -> cases
    spacings: Counter = field(default_factory=Counter)  # (z, y, x) mm -> cases
    spacing_notes: set[str] = field(default_factory=set)
    voxels: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    bad: int = 0

    def add(self, case: Case) -> None:
        self.cases += 1
        self.patients.add(case.meta.patient_id)
        z, h, w = case.image.shape
        self.slices += z
        self.slices_per_case[z] += 1
        self.sizes[(h, w)] += 1
        if case.meta.spacing is None:
            self.spacing_notes.add(case.meta.extra.get("spacing_note", "not stored"))
        else:
            self.spacings[tuple(round(float(s), 4) for s in case.meta.spacing)] += 1
        if case.label is not None:
            self.voxels += np.bincount(case.label.ravel(), minlength=256)


def summarize(refs: list[CaseRef], keep_going: bool, desc: str) -> SplitSummary:
    """Load and validate ``refs``. A DataError stops unless ``keep_going`` (then: one line on stderr)."""
    summary = SplitSummary()
    # disable=None: a progress bar only when stderr is a terminal, so logs and tests stay clean.
    for ref in tqdm(refs, desc=desc, unit="case", file=sys.stderr, disable=None, leave=False):
        try:
            summary.add(ref.load())
        except DataError as err:
            if not keep_going:
                raise
            summary.bad += 1
            tqdm.write(f"samatch: error: {err}", file=sys.stderr)
    return summary


def _fmt_counter(counter: Counter, fmt, axes: str) -> str:
    """Distinct tuples with their case counts, or per-axis ranges when there are many."""
    if not counter:
        return "-"
    if len(counter) <= MAX_LISTED:
        return ", ".join(f"{fmt(k)} ({n})" for k, n in sorted(counter.items()))
    ranges = ", ".join(
        f"{a} {fmt_num(min(k[i] for k in counter))}..{fmt_num(max(k[i] for k in counter))}"
        for i, a in enumerate(axes)
    )
    return f"{len(counter)} distinct; {ranges}"


def fmt_num(x: float) -> str:
    return f"{x:g}"


def format_summary(split: str | None, s: SplitSummary, class_names: tuple[str, ...] | None) -> str:
    """The table printed for one split."""
    z_lo, z_hi = (min(s.slices_per_case), max(s.slices_per_case)) if s.slices_per_case else (0, 0)
    rows = [
        ("cases", f"{s.cases}" + (f" (+{s.bad} bad)" if s.bad else "")),
        ("patients", str(len(s.patients))),
        ("slices", f"{s.slices} (per case: {z_lo}" + (f"..{z_hi})" if z_hi != z_lo else ")")),
        ("image sizes", _fmt_counter(s.sizes, lambda k: f"{k[0]}x{k[1]}", "HW")),
        ("spacing", _fmt_spacing(s)),
    ]
    values = [int(v) for v in np.flatnonzero(s.voxels)]
    rows.append(("label values", " ".join(map(str, values)) or "-"))
    lines = [f"split {split or '(all cases)'}"] + [f"  {k:<13}{v}" for k, v in rows]
    total = int(s.voxels.sum())
    if total:
        lines.append(f"  {'class':<16}{'value':>6}{'voxels':>14}{'share':>9}")
        for v in sorted(set(values) | set(range(len(class_names or ())))):
            share = 100 * s.voxels[v] / total
            lines.append(f"  {_class_name(class_names, v):<16}{v:>6}{int(s.voxels[v]):>14}{share:>8.2f}%")
    return "\n".join(lines)


def _class_name(class_names: tuple[str, ...] | None, value: int) -> str:
    if class_names and value < len(class_names):
        return class_names[value]
    return "background" if value == 0 else f"class{value}"


def _fmt_spacing(s: SplitSummary) -> str:
    parts = []
    if s.spacings:
        parts.append(
            "mm (z, y, x): " + _fmt_counter(s.spacings, lambda k: " x ".join(map(fmt_num, k)), "zyx")
        )
    parts += [f"none: {note}" for note in sorted(s.spacing_notes)]
    return "; ".join(parts) or "-"


def _patients_in_two_splits(reader: Reader, refs_by_split: dict) -> DataError | None:
    seen: dict[str, str] = {}
    for split, refs in refs_by_split.items():
        for pid in sorted({r.patient_id for r in refs}):
            if pid in seen:
                return DataError(reader.root, f"patient {pid} is in both {seen[pid]} and {split}")
            seen[pid] = split
    return None


def run(args: argparse.Namespace) -> int:
    reader = open_dataset(args.root, args.format, args.label_map)
    declared = reader.declared_classes()
    refs_by_split = {split: reader.cases(split) for split in reader.available_splits() or [None]}
    header = f"dataset {reader.name}  {reader.root}"
    if declared is not None:
        header += "\nclasses " + ", ".join(f"{i} {n}" for i, n in enumerate(declared))
    print(header)
    failed = 0
    overlap = _patients_in_two_splits(reader, refs_by_split)
    if overlap is not None:
        if not args.keep_going:
            raise overlap
        failed += 1
        print(f"samatch: error: {overlap}", file=sys.stderr)
    for split, refs in refs_by_split.items():
        summary = summarize(refs, args.keep_going, desc=f"loading {split or 'cases'}")
        failed += summary.bad
        print()
        print(format_summary(split, summary, declared))
    if failed:
        print(f"\n{failed} problem(s) found", file=sys.stderr)
        return 2
    return 0
