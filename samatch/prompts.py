"""Box and point prompts for SAM, computed from masks, labels or Match probabilities.

Coordinate convention (as SAM / MedSAM callers use it): boxes are ``(x0, y0, x1, y1)`` in pixel
indices of the given image, x = column, y = row, and the extents are INCLUSIVE: a mask whose pixels
span columns 3..7 has x0 = 3, x1 = 7 (a single pixel at (row 0, col 0) gives (0, 0, 0, 0)). SAM's
prompt encoder adds 0.5 to every coordinate, so inclusive extents land on the centres of the extreme
pixels. Boxes are float32 and must be rescaled by the caller if SAM sees a resized image.

Everything is vectorised over batch and classes, stays on the input's device and never synchronises
with the host, so prompts can be built inside the training step on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from samatch.transfer import host_may_read

__all__ = [
    "boxes_from_masks",
    "boxes_from_label",
    "boxes_from_probs",
    "confident_masks",
    "largest_component",
    "jitter_boxes",
    "points_from_masks",
]


def _clamp_xyxy(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., 4) xyxy -> same, clamped into [0, W-1] x [0, H-1]."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(
        [x0.clamp(0, width - 1), y0.clamp(0, height - 1), x1.clamp(0, width - 1), y1.clamp(0, height - 1)],
        dim=-1,
    )


def boxes_from_masks(masks: torch.Tensor, margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight bounding boxes of binary masks.

    Args:
        masks: (B, K, H, W) bool (any dtype is read as ``!= 0``).
        margin: pixels added on every side before clamping to the image; >= 0.

    Returns:
        boxes: (B, K, 4) float32 xyxy, inclusive extents (see module docstring); zeros where invalid.
        valid: (B, K) bool, False for an empty mask.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must be (B, K, H, W), got shape {tuple(masks.shape)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    masks = masks != 0
    h, w = masks.shape[-2:]
    rows = masks.any(dim=-1)  # (B, K, H)
    cols = masks.any(dim=-2)  # (B, K, W)
    valid = rows.any(dim=-1)  # (B, K)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    # First / last occupied index without argmax-on-bool or nonzero(): replace empty slots by a value
    # that loses the min (H) or the max (-1).
    y0 = torch.where(rows, ys, h).amin(dim=-1)
    y1 = torch.where(rows, ys, -1).amax(dim=-1)
    x0 = torch.where(cols, xs, w).amin(dim=-1)
    x1 = torch.where(cols, xs, -1).amax(dim=-1)
    boxes = torch.stack([x0 - margin, y0 - margin, x1 + margin, y1 + margin], dim=-1).float()
    boxes = _clamp_xyxy(boxes, h, w)
    return boxes * valid.unsqueeze(-1), valid


def boxes_from_label(
    label: torch.Tensor, num_classes: int, margin: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth boxes of every foreground class.

    Args:
        label: (B, H, W) long class indices.
        num_classes: C, including background 0.
        margin: see :func:`boxes_from_masks`.

    Returns:
        boxes (B, C-1, 4), valid (B, C-1); column k is class k + 1.
    """
    if label.dim() != 3:
        raise ValueError(f"label must be (B, H, W), got shape {tuple(label.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + one class), got {num_classes}")
    classes = torch.arange(1, num_classes, device=label.device).view(1, -1, 1, 1)
    return boxes_from_masks(label.unsqueeze(1) == classes, margin)


def confident_masks(probs: torch.Tensor, threshold: float = 0.95) -> torch.Tensor:
    """Per-class masks of confident argmax pixels.

    Args:
        probs: (B, C, H, W) softmax probabilities.
        threshold: a pixel counts when its max probability is >= threshold.

    Returns:
        (B, C-1, H, W) bool; channel k is ``(argmax == k+1) & (max prob >= threshold)``.
    """
    if probs.dim() != 4 or probs.shape[1] < 2:
        raise ValueError(f"probs must be (B, C>=2, H, W), got shape {tuple(probs.shape)}")
    conf, pred = probs.max(dim=1)  # (B, H, W) each
    classes = torch.arange(1, probs.shape[1], device=probs.device).view(1, -1, 1, 1)
    return (pred.unsqueeze(1) == classes) & (conf >= threshold).unsqueeze(1)


def boxes_from_probs(
    probs: torch.Tensor,
    threshold: float = 0.95,
    margin: int = 0,
    largest_component: bool = False,
    max_iters: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes around the confident prediction of each foreground class of a Match network.

    Args:
        probs: (B, C, H, W) softmax probabilities.
        threshold: minimum max-probability for a pixel to count (see :func:`confident_masks`).
        margin: pixels added on every side, clamped to the image.
        largest_component: keep only the largest 8-connected component of each class mask, so a stray
            confident blob does not stretch the box across the image.
        max_iters: passed to :func:`largest_component`.

    Returns:
        boxes (B, C-1, 4) float32 xyxy, valid (B, C-1) bool; column k is class k + 1.
    """
    masks = confident_masks(probs, threshold)
    if largest_component:
        masks = _largest_component(masks, max_iters=max_iters)
    return boxes_from_masks(masks, margin)


def largest_component(
    masks: torch.Tensor, connectivity: int = 8, max_iters: int | None = None
) -> torch.Tensor:
    """Keep the largest connected component of every (b, k) mask, on the device.

    Each foreground pixel starts with its own label (flat index + 1); iterations spread the maximum
    label through the mask (:func:`component_labels`), so labels stay inside their component, and
    once converged each component carries one label (its largest flat index + 1). Pixels per label
    are then counted with scatter_add. An iteration gives every pixel the maximum of its horizontal
    run of foreground, then of its vertical run (8-connectivity: after a 3x3 maximum for the
    diagonals), so a component converges after about as many iterations as its shape has turns,
    whatever its size: at most 8 on the training masks of ACDC, BUSI and CHAOS at 256 x 256
    (benchmarks/lc_iterations.py; up to 134 with the earlier 3x3 propagation and pointer jumping).

    On a GPU the iterations are a fixed count because checking convergence would need a host sync;
    on the CPU the loop stops once an iteration changes nothing (the same result). The default
    H + W is enough for any path of up to H + W pixels. A component that has not converged is seen
    as several pieces, and only the largest piece is kept: the result is then part of one component
    (perhaps not of the largest, if that one is still in pieces), never pixels outside the mask.

    Args:
        masks: (B, K, H, W) bool.
        connectivity: 8 (default) or 4.
        max_iters: number of iterations; None means H + W.

    Returns:
        (B, K, H, W) bool. Empty masks stay empty. Ties in size go to the component whose largest flat
        (row-major) index is smaller.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    return _largest_component(masks, connectivity, max_iters)


def _run_ids(fg: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, H, W) long >= 1: a number per horizontal run of equal pixels (foreground
    or background), unique over all rows and masks. Background runs get numbers of their own too,
    so no one number collects the whole background (on a GPU, one address taking millions of
    atomic updates in a row)."""
    start = torch.ones_like(fg)
    start[..., 1:] = fg[..., 1:] != fg[..., :-1]  # the first column, and wherever the value changes
    return start.flatten().cumsum(0).view(fg.shape)


def component_labels(masks: torch.Tensor, connectivity: int = 8):
    """The labelling iterations of :func:`largest_component`: yields (N, 1, H, W) float labels, first
    the initial ones (each foreground pixel its flat index + 1, background 0), then those after each
    iteration, forever (a converged component holds its largest flat index + 1 everywhere).

    masks (B, K, H, W) bool. The caller decides when to stop (a fixed count, or the fixed point).
    """
    b, k, h, w = masks.shape
    n, hw = b * k, h * w
    fg = (masks != 0).reshape(n, h, w)
    # Runs along rows, and along columns (found in the transposed masks; each kind numbered apart).
    runs = (_run_ids(fg).flatten(), _run_ids(fg.transpose(1, 2)).transpose(1, 2).flatten())
    # float32 holds integers exactly up to 2**24 pixels (max_pool2d needs floating point).
    dtype = torch.float32 if hw < 2**24 else torch.float64
    fgf = fg.to(dtype).view(n, 1, h, w)
    labels = torch.arange(1, hw + 1, device=masks.device, dtype=dtype).view(1, 1, h, w) * fgf
    yield labels
    while True:
        if connectivity == 8:  # the diagonal neighbours
            labels = F.max_pool2d(labels, kernel_size=3, stride=1, padding=1) * fgf
        flat = labels.flatten()
        for ids in runs:  # every pixel takes the maximum of its run (background runs hold 0)
            best = torch.zeros(n * hw + 1, device=masks.device, dtype=dtype)
            flat = best.scatter_reduce(0, ids, flat, "amax").gather(0, ids)
        labels = flat.view(n, 1, h, w) * fgf
        yield labels


def _largest_component(
    masks: torch.Tensor, connectivity: int = 8, max_iters: int | None = None, stop_early: bool | None = None
) -> torch.Tensor:
    """:func:`largest_component`; ``stop_early`` None: at the fixed point where the host may read the
    masks (:func:`samatch.transfer.host_may_read`: the CPU, outside a recorded step)."""
    if masks.dim() != 4:
        raise ValueError(f"masks must be (B, K, H, W), got shape {tuple(masks.shape)}")
    b, k, h, w = masks.shape
    n, hw = b * k, h * w
    if max_iters is None:
        max_iters = h + w
    if max_iters < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters}")
    # On the CPU, stop at the fixed point (what the remaining iterations would return anyway); on a
    # GPU that test would stall the step on a host sync, so the fixed count runs there.
    if stop_early is None:
        stop_early = host_may_read(masks)
    iterations = component_labels(masks, connectivity)
    labels = next(iterations)
    for _ in range(max_iters):
        previous, labels = labels, next(iterations)
        if stop_early and torch.equal(labels, previous):
            break
    flat = labels.view(n, hw).long()  # (N, HW)
    counts = torch.zeros(n, hw + 1, device=masks.device, dtype=torch.long)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    counts[:, 0] = 0  # background is never a component
    best = counts.argmax(dim=1, keepdim=True)  # (N, 1); 0 when empty -> selects nothing below
    keep = (flat == best) & (best > 0)
    return keep.view(b, k, h, w)


def jitter_boxes(
    boxes: torch.Tensor,
    valid: torch.Tensor,
    image_size: tuple[int, int],
    max_shift: int = 5,
    expand_only: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomly perturb boxes, as done when fine-tuning SAM/MedSAM so it tolerates imprecise boxes.

    Each of the four coordinates moves independently by an integer drawn uniformly from
    [-max_shift, max_shift] (or, with ``expand_only``, outwards by [0, max_shift], MedSAM's
    ``bbox_shift``). The result is clamped to the image and re-ordered so x0 <= x1 and y0 <= y1.

    Args:
        boxes: (B, K, 4) float xyxy (inclusive pixel extents).
        valid: (B, K) bool; invalid boxes come back as zeros.
        image_size: (H, W) of the image the boxes refer to.
        max_shift: largest shift in pixels, >= 0.
        expand_only: only grow boxes.
        generator: a torch.Generator on ``boxes.device`` for reproducibility.

    Returns:
        (B, K, 4) float boxes.
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, K, 4), got shape {tuple(boxes.shape)}")
    if tuple(valid.shape) != tuple(boxes.shape[:2]):
        raise ValueError(f"valid must be (B, K) = {tuple(boxes.shape[:2])}, got {tuple(valid.shape)}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    h, w = image_size
    low = 0 if expand_only else -max_shift
    shift = torch.randint(
        low, max_shift + 1, tuple(boxes.shape), generator=generator, device=boxes.device
    ).to(boxes.dtype)
    if expand_only:  # x0, y0 move left / up, x1, y1 right / down (no host constant: CUDA-graph safe)
        shift = torch.cat([-shift[..., :2], shift[..., 2:]], dim=-1)
    out = _clamp_xyxy(boxes + shift, h, w)
    x0, y0, x1, y1 = out.unbind(-1)
    out = torch.stack(
        [torch.minimum(x0, x1), torch.minimum(y0, y1), torch.maximum(x0, x1), torch.maximum(y0, y1)], dim=-1
    )
    return out * valid.unsqueeze(-1).to(out.dtype)


def points_from_masks(
    masks: torch.Tensor, negative_in_hole: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Point prompts: the foreground pixel nearest to each mask's centroid.

    For a ring-shaped structure (e.g. the myocardium) the centroid falls in the hole; the nearest
    foreground pixel is then on the ring, which is still a correct positive point. With
    ``negative_in_hole``, a second, negative point is placed at the rounded centroid when that pixel
    is NOT in the mask (the hole), telling SAM not to fill it; otherwise the second point is padding.

    Args:
        masks: (B, K, H, W) bool.
        negative_in_hole: add the second (negative or padding) point.

    Returns:
        coords: (B, K, N, 2) float32 (x, y) pixel indices, N = 2 with ``negative_in_hole`` else 1.
        labels: (B, K, N) long, SAM's convention: 1 positive, 0 negative, -1 padding (ignored).
        valid: (B, K) bool; for an empty mask coords are 0 and all labels -1.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must be (B, K, H, W), got shape {tuple(masks.shape)}")
    masks = masks != 0
    h, w = masks.shape[-2:]
    fg = masks.float()
    count = fg.sum((2, 3))  # (B, K)
    valid = count > 0
    ys = torch.arange(h, device=masks.device, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32).view(1, 1, 1, w)
    cy = (fg * ys).sum((2, 3)) / count.clamp_min(1.0)  # (B, K)
    cx = (fg * xs).sum((2, 3)) / count.clamp_min(1.0)
    dist2 = (ys - cy[..., None, None]) ** 2 + (xs - cx[..., None, None]) ** 2  # (B, K, H, W)
    dist2 = torch.where(masks, dist2, torch.inf)
    idx = dist2.flatten(2).argmin(dim=-1)  # (B, K); ties -> first in row-major order
    pos = torch.stack([idx % w, idx // w], dim=-1).float()  # (B, K, 2) as (x, y)
    pos_label = torch.where(valid, 1, -1)  # (B, K)
    if not negative_in_hole:
        coords, labels = pos.unsqueeze(2), pos_label.unsqueeze(2)
    else:
        ry, rx = cy.round().long(), cx.round().long()
        centre_in = masks.flatten(2).gather(2, (ry * w + rx).unsqueeze(-1)).squeeze(-1)  # (B, K)
        hole = valid & ~centre_in
        neg = torch.stack([rx, ry], dim=-1).float()
        coords = torch.stack([pos, neg * hole.unsqueeze(-1)], dim=2)
        labels = torch.stack([pos_label, torch.where(hole, 0, -1)], dim=2)
    coords = coords * valid[..., None, None]
    return coords, labels.long(), valid
