"""Per-case segmentation metrics (Dice, HD95, ASD) on label volumes, via MONAI, and their summaries.

Definitions (MONAI's, computed per foreground class on binary masks):

* Dice: ``2 |P & G| / (|P| + |G|)`` (``monai.metrics.compute_dice``).
* HD95: symmetric 95th-percentile Hausdorff distance: the larger of the 95th percentiles (linear
  interpolation) of the surface-to-surface distances P->G and G->P (``compute_hausdorff_distance``
  with ``percentile=95``). Surfaces are the mask voxels removed by one binary erosion.
* ASD: average symmetric surface distance: the mean of all P->G and G->P surface distances together
  (``compute_average_surface_distance`` with ``symmetric=True``).

Distances are in mm when ``spacing`` is given (``units == "mm"``), in voxels otherwise
(``units == "voxels"``); spacing follows the array axis order, (z, y, x) for a (Z, H, W) volume.

Empty masks, a FINITE convention (no large sentinel values, no NaN, so every case
enters the means):

* both prediction and ground truth empty: Dice 1, HD95 0, ASD 0 (a correct "absent");
* exactly one empty: Dice 0, HD95 = ASD = the volume diagonal ``sqrt(sum(((n_i - 1) * s_i) ** 2))``,
  the largest distance between two voxel centres of the volume, i.e. the worst distance possible.
  ``empty`` in the result ("pred" / "gt") and ``n_one_empty`` in the summary say how often this
  happened, since such cases dominate mean distances.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

__all__ = [
    "METRICS",
    "case_metrics",
    "case_rows",
    "summarize",
    "write_case_csv",
    "write_summary_json",
]

METRICS = ("dice", "hd95", "asd")
CSV_FIELDS = ("case", "patient", "class", "dice", "hd95", "asd", "units", "empty")


def _check_inputs(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Sequence[float] | None
) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must have the same shape")
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected a (Z, H, W) volume or an (H, W) image, got shape {pred.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for name, arr in (("pred", pred), ("gt", gt)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes})")
    if spacing is not None:
        if len(spacing) != pred.ndim or any(not s > 0 for s in spacing):
            raise ValueError(f"spacing must be {pred.ndim} positive numbers, got {spacing}")


def _diagonal(shape: tuple[int, ...], spacing: Sequence[float]) -> float:
    """Largest distance between two voxel centres of a volume of this shape."""
    return math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing, strict=True)))


def _pair_metrics(p: np.ndarray, g: np.ndarray, spacing: tuple[float, ...] | None) -> dict[str, float]:
    """Dice / HD95 / ASD of two NON-EMPTY binary masks of the same shape."""
    yp = torch.from_numpy(p[None, None].astype(np.float32))  # (1, 1, *spatial)
    yg = torch.from_numpy(g[None, None].astype(np.float32))
    with warnings.catch_warnings():
        # MONAI 1.5+ passes a deprecated argument to itself inside the surface-distance code.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        dice = compute_dice(yp, yg, include_background=True, ignore_empty=False)
        hd95 = compute_hausdorff_distance(yp, yg, include_background=True, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(
            yp, yg, include_background=True, symmetric=True, spacing=spacing
        )
    return {"dice": float(dice), "hd95": float(hd95), "asd": float(asd)}


def case_metrics(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None
) -> dict[int, dict[str, Any]]:
    """Metrics of one case, per foreground class.

    Args:
        pred: (Z, H, W) (or (H, W)) integer labels in [0, num_classes).
        gt: same shape as pred.
        num_classes: C, including background 0.
        spacing: voxel size per axis in mm, e.g. (z, y, x); None for voxel units.

    Returns:
        ``{c: {"dice", "hd95", "asd": float, "units": "mm" | "voxels",
        "empty": "none" | "both" | "pred" | "gt"}}`` for c = 1..C-1 (see the module docstring for
        the empty-mask convention).
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check_inputs(pred, gt, num_classes, spacing)
    units = "voxels" if spacing is None else "mm"
    sp = None if spacing is None else tuple(float(s) for s in spacing)  # MONAI wants one type
    diag = _diagonal(pred.shape, sp or (1.0,) * pred.ndim)
    out: dict[int, dict[str, Any]] = {}
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        p_any, g_any = bool(p.any()), bool(g.any())
        if not p_any and not g_any:
            values, empty = {"dice": 1.0, "hd95": 0.0, "asd": 0.0}, "both"
        elif not p_any or not g_any:
            values, empty = {"dice": 0.0, "hd95": diag, "asd": diag}, ("pred" if not p_any else "gt")
        else:
            values, empty = _pair_metrics(p, g, sp), "none"
        out[c] = {**values, "units": units, "empty": empty}
    return out


def case_rows(case_id: str, metrics: dict[int, dict[str, Any]], patient_id: str = "") -> list[dict[str, Any]]:
    """Flatten :func:`case_metrics` into rows ``{"case", "patient", "class", metric..., "units",
    "empty"}``; the patient is the case itself when not given."""
    patient = patient_id or case_id
    return [{"case": case_id, "patient": patient, "class": c, **m} for c, m in sorted(metrics.items())]


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std per class, and the mean over classes.

    Args:
        rows: rows as made by :func:`case_rows`, all in the same units.

    Returns:
        ``{"units": str, "classes": {c: {"n": int, "n_one_empty": int,
        "dice": {"mean", "std"}, "hd95": {...}, "asd": {...}}}, "mean": {"dice", "hd95", "asd"}}``.
        std is the population std (ddof=0, numpy's default); "mean" is the unweighted mean of the
        per-class means.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no rows to summarize")
    units = {r["units"] for r in rows}
    if len(units) != 1:
        raise ValueError(f"rows mix units {sorted(units)}; evaluate all cases with or without spacing")
    by_class: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_class.setdefault(int(r["class"]), []).append(r)
    classes: dict[int, dict[str, Any]] = {}
    for c, rs in sorted(by_class.items()):
        entry: dict[str, Any] = {
            "n": len(rs),
            "n_one_empty": sum(r.get("empty") in ("pred", "gt") for r in rs),
        }
        for m in METRICS:
            vals = np.array([float(r[m]) for r in rs])
            entry[m] = {"mean": float(vals.mean()), "std": float(vals.std())}
        classes[c] = entry
    mean = {m: float(np.mean([e[m]["mean"] for e in classes.values()])) for m in METRICS}
    return {"units": units.pop(), "classes": classes, "mean": mean}


def write_case_csv(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write per-case rows (see :func:`case_rows`) as CSV with a header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(r)


def write_summary_json(path: str | Path, summary: dict[str, Any]) -> None:
    """Write a :func:`summarize` result as indented JSON (class keys become strings)."""
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
