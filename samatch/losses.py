"""Segmentation losses for the Match networks and the SAM adapter.

Conventions shared by every loss here:

* Inputs are raw LOGITS. Softmax / sigmoid is applied inside, and cross-entropy goes through
  ``F.cross_entropy`` (log-softmax), never ``log(softmax)``, so confident wrong pixels cannot produce
  ``log(0)``.
* ``weight_mask`` (B, H, W) is a per-pixel weight, normally the 0/1 confidence mask
  ``conf_u_w >= threshold`` of UniMatch, possibly multiplied by an ignore mask.
* Nothing here synchronises with the host (no ``.item()``, no ``bool(tensor)``, no ``nonzero()``), so
  the losses can sit inside a CUDA-graph / async training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ce_loss", "dice_loss", "binary_dice_loss", "binary_ce_loss"]


def _check_dense(logits: torch.Tensor, target: torch.Tensor, weight_mask: torch.Tensor | None) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    b, _, h, w = logits.shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(f"target must be (B, H, W) = {(b, h, w)}, got {tuple(target.shape)}")
    if target.dtype != torch.long:
        raise ValueError(f"target must be a long tensor of class indices, got {target.dtype}")
    if weight_mask is not None and tuple(weight_mask.shape) != (b, h, w):
        raise ValueError(f"weight_mask must be (B, H, W) = {(b, h, w)}, got {tuple(weight_mask.shape)}")


def ce_loss(
    logits: torch.Tensor, target: torch.Tensor, weight_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixel-wise cross-entropy, optionally weighted.

    Args:
        logits: (B, C, H, W) raw scores.
        target: (B, H, W) long class indices in [0, C).
        weight_mask: (B, H, W) float weights, or None for all ones.

    Returns:
        Scalar ``sum(w * ce) / (B * H * W)``: the mean over ALL pixels with masked pixels counted as
        zero, as UniMatch does. We deliberately do not divide by ``sum(w)``: early in training few
        pixels pass the confidence threshold, and renormalising would give those few pixels the full
        weight of the loss; here the unlabeled loss grows with the fraction of trusted pixels.
    """
    _check_dense(logits, target, weight_mask)
    ce = F.cross_entropy(logits, target, reduction="none")  # (B, H, W)
    if weight_mask is not None:
        ce = ce * weight_mask.to(ce.dtype)
    return ce.mean()


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight_mask: torch.Tensor | None = None,
    include_background: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Soft multi-class Dice loss on softmax probabilities.

    For each class c (background skipped unless ``include_background``), with p = softmax(logits),
    t = one_hot(target) and w = weight_mask, sums taken over batch AND pixels ("batch Dice", so a class
    absent from one image does not give that image a degenerate term):

        dice_c = (2 * sum(w p_c t_c) + smooth) / (sum(w p_c) + sum(w t_c) + smooth)

    The loss is ``1 - mean_c dice_c``. Denominators are plain sums, not squared (MONAI's
    ``squared_pred=False``). A class absent from the target and not predicted scores dice ~1.

    Args:
        logits: (B, C, H, W) raw scores.
        target: (B, H, W) long class indices in [0, C).
        weight_mask: (B, H, W) float weights, or None.
        include_background: also average the Dice of class 0.
        smooth: added to numerator and denominator; must be >= 0 (0 gives NaN for empty classes).

    Returns:
        Scalar loss.
    """
    _check_dense(logits, target, weight_mask)
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    num_classes = logits.shape[1]
    first = 0 if include_background else 1
    if num_classes - first < 1:
        raise ValueError(f"no class left to score: C={num_classes}, include_background={include_background}")
    probs = logits.softmax(dim=1)  # (B, C, H, W)
    # A comparison, not F.one_hot: one_hot range-checks the labels on CPU with .item(); out-of-range
    # labels simply match no class here (ce_loss is the one that rejects them).
    classes = torch.arange(num_classes, device=target.device).view(1, -1, 1, 1)
    onehot = (target.unsqueeze(1) == classes).to(probs.dtype)  # (B, C, H, W)
    if weight_mask is not None:
        w = weight_mask.to(probs.dtype).unsqueeze(1)  # (B, 1, H, W)
        probs_w, onehot_w = probs * w, onehot * w
    else:
        probs_w, onehot_w = probs, onehot
    dims = (0, 2, 3)
    intersect = (probs_w * onehot).sum(dims)  # (C,)
    denom = probs_w.sum(dims) + onehot_w.sum(dims)  # (C,)
    dice = (2.0 * intersect + smooth) / (denom + smooth)
    return 1.0 - dice[first:].mean()


def _check_binary(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise ValueError(f"target must match logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    if tuple(valid.shape) != tuple(logits.shape[:2]) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool (B, K) = {tuple(logits.shape[:2])} tensor")


def _mean_over_valid(per_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # Multiplying (not indexing) keeps the graph connected, so with no valid prompt the loss is an
    # exact 0 that still has a (zero) gradient; clamp avoids 0/0 without a host-side check.
    weights = valid.to(per_mask.dtype)
    return (per_mask * weights).sum() / weights.sum().clamp_min(1.0)


def binary_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, smooth: float = 1e-5
) -> torch.Tensor:
    """Per-prompt soft Dice loss for SAM mask logits (one binary mask per prompt).

    Args:
        logits: (B, K, H, W) raw mask logits, one channel per prompt (box) k.
        target: (B, K, H, W) binary target (bool or float), mask k of image b.
        valid: (B, K) bool; False for prompts that do not exist (e.g. empty class, no box).
        smooth: Dice smoothing, >= 0.

    Returns:
        Scalar: mean over VALID (b, k) of ``1 - dice_bk`` with sigmoid probabilities and sums over
        pixels. 0 (with grad) when no prompt is valid.
    """
    _check_binary(logits, target, valid)
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    probs = logits.sigmoid()
    t = target.to(probs.dtype)
    intersect = (probs * t).sum((2, 3))  # (B, K)
    denom = probs.sum((2, 3)) + t.sum((2, 3))  # (B, K)
    dice = (2.0 * intersect + smooth) / (denom + smooth)
    return _mean_over_valid(1.0 - dice, valid)


def binary_ce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-prompt binary cross-entropy on mask logits (MedSAM trains with Dice + BCE).

    Args:
        logits: (B, K, H, W) raw mask logits.
        target: (B, K, H, W) binary target.
        valid: (B, K) bool.

    Returns:
        Scalar: mean over valid (b, k) of the pixel-mean BCE; 0 (with grad) when none is valid.
    """
    _check_binary(logits, target, valid)
    bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return _mean_over_valid(bce.mean((2, 3)), valid)
