"""Evaluation at native resolution: slices predicted at network size, probabilities resized back.

``predict_volume`` -> (Z, C, H, W) probabilities on the native grid; ``evaluate_cases`` -> one row
per case with per-class Dice (and HD95 / ASD through :mod:`samatch.metrics` when ``distances``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from samatch.io.base import Case
from samatch.preprocess import minmax_normalize, resize_image, resize_probs


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module, image: np.ndarray, size: int, device, batch: int = 16, cascade=None
) -> torch.Tensor:
    """image (Z, H, W) raw intensities -> class probabilities (Z, C, H, W) on CPU, native grid.

    ``cascade``: a callable (images (B,1,S,S), logits (B,C,S,S)) -> probabilities (B,C,S,S), e.g.
    SAM refinement of the Match prediction (:meth:`SamGuidance.cascade`); None = Match alone.
    """
    was_training = model.training
    model.eval()
    x = torch.from_numpy(resize_image(minmax_normalize(image), size))[:, None]  # (Z, 1, S, S)
    out = []
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch].to(device)
        logits = model(xb)
        probs = cascade(xb, logits) if cascade is not None else logits.float().softmax(1)
        out.append(resize_probs(probs, tuple(image.shape[1:])).cpu())
    model.train(was_training)
    return torch.cat(out)


def volume_dice(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Per foreground class Dice of two label volumes, shape (num_classes - 1,).

    Both empty -> 1.0 (nothing to find, nothing found); the same convention as samatch.metrics.
    """
    n = num_classes
    joint = np.bincount(gt.ravel().astype(np.int64) * n + pred.ravel(), minlength=n * n).reshape(n, n)
    inter = np.diag(joint)[1:].astype(np.float64)
    size_sum = joint.sum(0)[1:] + joint.sum(1)[1:]
    return np.where(size_sum > 0, 2 * inter / np.maximum(size_sum, 1), 1.0)


def predict_label(model: torch.nn.Module, image: np.ndarray, size: int, device, cascade=None) -> np.ndarray:
    """image (Z, H, W) -> predicted label volume (Z, H, W) uint8 at native resolution."""
    return predict_volume(model, image, size, device, cascade=cascade).argmax(1).numpy().astype(np.uint8)


def evaluate_cases(
    model: torch.nn.Module,
    cases: Sequence[Case],
    num_classes: int,
    size: int,
    device,
    distances: bool = True,
    cascade=None,
) -> list[dict]:
    """Rows of per-case, per-class metrics.

    With ``distances``: :func:`samatch.metrics.case_rows` rows (``case, patient, class, dice, hd95,
    asd, units, empty``), in mm where the case has a spacing. Without: one row per case holding
    ``case`` and ``dice_<c>`` only (cheap enough to run during training).
    """
    if distances:
        # Imported only here: importing MONAI takes 3-4 s (it loads all its subpackages), which a
        # deployed site would pay in every evaluation, each a fresh process (docs/performance_log.md).
        from samatch.metrics import case_metrics, case_rows
    rows = []
    for case in tqdm(cases, desc="evaluating", leave=False, disable=len(cases) < 10 or not distances or None):
        pred = predict_label(model, case.image, size, device, cascade)
        if distances:
            metrics = case_metrics(pred, case.label, num_classes, case.meta.spacing)
            rows += case_rows(case.meta.case_id, metrics, case.meta.patient_id)
        else:
            dice = volume_dice(pred, case.label, num_classes)
            rows.append({"case": case.meta.case_id, **{f"dice_{c}": float(d) for c, d in enumerate(dice, 1)}})
    return rows


def summarize_dice(rows: Sequence[dict], class_names: Sequence[str]) -> dict[str, float]:
    """Mean Dice per class over cases (``dice_<name>``) and over classes (``dice_mean``)."""
    out = {}
    for c, name in enumerate(class_names[1:], start=1):
        out[f"dice_{name}"] = float(np.mean([r[f"dice_{c}"] for r in rows]))
    out["dice_mean"] = float(np.mean([out[f"dice_{n}"] for n in class_names[1:]]))
    return out
