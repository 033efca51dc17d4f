"""Intensity normalisation and resizing to the network size, with the exact inverse for evaluation.

Array functions on numpy, one slice or a stack of slices ``(Z, H, W)``; the network sees
``(Z, size, size)`` and evaluation maps predictions back to ``(Z, H, W)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def minmax_normalize(image: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Per-slice min-max to [0, 1]. ``image``: (Z, H, W) or (H, W). A constant slice becomes 0."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        return minmax_normalize(img[None], eps)[0]
    lo = img.min(axis=(1, 2), keepdims=True)
    hi = img.max(axis=(1, 2), keepdims=True)
    rng = hi - lo
    # A constant slice has no contrast to stretch; map it to zeros rather than dividing by ~0.
    return np.where(rng > eps, (img - lo) / np.maximum(rng, eps), 0.0).astype(np.float32)


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of every slice. ``image``: (Z, H, W) float -> (Z, size, size) float32."""
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    img = np.asarray(image, dtype=np.float32)
    if img.shape[1:] == out_hw:
        return img.copy()
    t = torch.from_numpy(np.ascontiguousarray(img))[:, None]  # (Z, 1, H, W)
    out = F.interpolate(t, size=out_hw, mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


def resize_label(label: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of every slice. ``label``: (Z, H, W) int -> (Z, size, size) uint8."""
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    lab = np.asarray(label)
    if lab.shape[1:] == out_hw:
        return lab.astype(np.uint8, copy=True)
    t = torch.from_numpy(np.ascontiguousarray(lab.astype(np.uint8)))[:, None]
    # 'nearest-exact' samples pixel centres, so down- then up-sizing is symmetric.
    out = F.interpolate(t, size=out_hw, mode="nearest-exact")
    return out[:, 0].numpy().astype(np.uint8)


def resize_probs(probs: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of class probabilities or logits. ``probs``: (Z, C, h, w) -> (Z, C, H, W)."""
    if tuple(probs.shape[-2:]) == tuple(size_hw):
        return probs
    return F.interpolate(probs, size=size_hw, mode="bilinear", align_corners=False)


def inverse_resize_label(label: np.ndarray, native_hw: tuple[int, int]) -> np.ndarray:
    """Map a (Z, size, size) label back to the native (Z, H, W) grid (nearest; exact if sizes match).

    For predictions prefer resizing the probabilities with :func:`resize_probs` and taking the
    argmax at native size; this function is the label-only inverse used when only a mask exists.
    """
    return resize_label(label, native_hw)
