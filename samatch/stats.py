"""Paired significance tests between runs evaluated on the same cases.

Each run is compared with a reference run by a two-sided Wilcoxon signed-rank test on the paired
differences ``run - reference`` over the ids both runs have. With m non-reference runs, the
Bonferroni-adjusted p-value is ``min(1, p * m)``.

The pairs must be independent, so they are patients, not cases: with ``groups`` (:func:`patients_of`)
a patient's cases that both runs have are averaged first (ACDC's ED and ES frames are two volumes of
one heart; as two pairs they would overstate the evidence). Rows without a patient count as their
own patient.

p-values come from ``scipy.stats.wilcoxon(method="auto")`` (behaviour of scipy 1.17, the version we
test with): the exact null distribution when there are no ties and no zero differences, an
exhaustive (hence exact) permutation test when there are ties or zeros and n <= 13, the normal
approximation beyond that. So small studies (n < 6 included) still get exact p-values; note that
with n <= 5 pairs no two-sided p-value can fall below 0.0625, however large the effect.

Zero differences follow ``zero_method`` (scipy's): "wilcox" (default) drops them, "pratt" ranks them
and then drops them, "zsplit" splits their ranks between the signs. If every difference is zero the
runs are identical on these cases: statistic 0, p = 1 (scipy would divide by zero).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy.stats import wilcoxon

__all__ = ["Comparison", "case_means", "compare_runs", "format_table", "patients_of"]

ZERO_METHODS = ("wilcox", "pratt", "zsplit")


@dataclass(frozen=True)
class Comparison:
    """One run against the reference, on their ``n`` common cases.

    ``mean`` / ``ref_mean`` are the run's and the reference's means over those common cases,
    ``diff = mean - ref_mean``; ``statistic`` is scipy's two-sided statistic ``min(W+, W-)``.
    Statistic and p-values are NaN when n == 0.
    """

    run: str
    n: int
    mean: float
    ref_mean: float
    diff: float
    statistic: float
    p: float
    p_bonferroni: float


def case_means(rows: Iterable[Mapping], metric: str) -> dict[str, float]:
    """Rows (``case``, ``class``, ``metric``, ...) -> {case: mean over its classes of ``metric``}."""
    values: dict[str, list[float]] = {}
    for r in rows:
        values.setdefault(str(r["case"]), []).append(float(r[metric]))
    return {case: float(np.mean(v)) for case, v in values.items()}


def patients_of(rows: Iterable[Mapping]) -> dict[str, str]:
    """Rows -> {case: patient}: a row's ``patient`` field, or its case when it has none (files written
    before the field existed; datasets with one case per patient)."""
    return {str(r["case"]): str(r.get("patient") or r["case"]) for r in rows}


def _group_means(values: dict[str, float], ids: list[str], groups: Mapping[str, str]) -> dict[str, float]:
    """{id: value} over ``ids`` -> {group: mean of its ids' values}."""
    by_group: dict[str, list[float]] = {}
    for i in ids:
        by_group.setdefault(groups[i], []).append(values[i])
    return {g: float(np.mean(v)) for g, v in by_group.items()}


def _wilcoxon(diffs: np.ndarray, zero_method: str) -> tuple[float, float]:
    if diffs.size == 0:
        return math.nan, math.nan
    if not np.any(diffs):
        return 0.0, 1.0
    res = wilcoxon(diffs, zero_method=zero_method, alternative="two-sided", method="auto")
    return float(res.statistic), float(res.pvalue)


def compare_runs(
    per_case: dict[str, dict[str, float]],
    reference: str,
    zero_method: str = "wilcox",
    groups: Mapping[str, str] | None = None,
) -> list[Comparison]:
    """Compare every run with ``reference`` on their common cases.

    Args:
        per_case: ``{run_name: {case_id: value}}``, e.g. per-case Dice of each method
            (:func:`case_means`).
        reference: the run the others are compared with; must be a key of ``per_case``.
        zero_method: scipy's handling of zero differences: "wilcox", "pratt" or "zsplit".
        groups: ``{case_id: patient}`` (:func:`patients_of`): the pairs are then the patients, each
            the mean over the cases both runs have of it; ``n``, the means and ``diff`` are over
            patients. None: every case is a pair.

    Returns:
        One :class:`Comparison` per non-reference run, in ``per_case`` order.
    """
    if reference not in per_case:
        raise ValueError(f"reference run {reference!r} not among {sorted(per_case)}")
    if zero_method not in ZERO_METHODS:
        raise ValueError(f"zero_method must be one of {ZERO_METHODS}, got {zero_method!r}")
    ref = per_case[reference]
    others = [name for name in per_case if name != reference]
    m = len(others)
    rows = []
    for name in others:
        run, base = per_case[name], ref
        common = sorted(set(run) & set(base))
        if groups is not None:  # the same volumes on both sides, then one pair per patient
            run, base = _group_means(run, common, groups), _group_means(base, common, groups)
            common = sorted(run)
        a = np.array([run[c] for c in common], dtype=float)
        r = np.array([base[c] for c in common], dtype=float)
        stat, p = _wilcoxon(a - r, zero_method)
        mean = float(a.mean()) if common else math.nan
        ref_mean = float(r.mean()) if common else math.nan
        rows.append(
            Comparison(
                run=name,
                n=len(common),
                mean=mean,
                ref_mean=ref_mean,
                diff=mean - ref_mean,
                statistic=stat,
                p=p,
                p_bonferroni=min(1.0, p * m) if not math.isnan(p) else math.nan,
            )
        )
    return rows


def format_table(rows: list[Comparison], digits: int = 4) -> str:
    """Plain-text table of :func:`compare_runs` rows, one line per run, columns aligned."""
    header = ("run", "n", "mean", "ref_mean", "diff", "W", "p", "p_bonf")
    body = [
        (
            r.run,
            str(r.n),
            f"{r.mean:.{digits}f}",
            f"{r.ref_mean:.{digits}f}",
            f"{r.diff:+.{digits}f}",
            f"{r.statistic:g}",
            f"{r.p:.{digits}g}",
            f"{r.p_bonferroni:.{digits}g}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    # Run names left-aligned, numbers right-aligned.
    lines = []
    for line in [header, *body]:
        numbers = [cell.rjust(wd) for cell, wd in zip(line[1:], widths[1:], strict=True)]
        cells = [line[0].ljust(widths[0]), *numbers]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
