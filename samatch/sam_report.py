"""How good are SAM's pseudo-labels? Per-class Dice on validation slices, by prompt source.

For each foreground class, on validation slices where the class is present:

* ``gt_box``: SAM prompted with the ground-truth box (the ceiling of box prompting);
* ``gt_box_plain``: the same without the nested-structure rule (``sam.enclosed``), to show what a
  box around a ring gives (the filled disk);
* ``gt_box_points``: the ground-truth box plus two points per class: a positive one on the class
  (its pixel nearest the centroid) and, where the centroid falls outside the class (a ring's hole),
  a negative one there; no nested-structure rule (another way to ask for a ring);
* ``pred_box``: SAM prompted with boxes from the U-Net's prediction (what training uses);
* ``unet``: the U-Net's own prediction, for reference;

each for the pretrained SAM (``before``: LoRA B = 0) and, when the run trained adapters, the
adapted one (``after``). Dice is computed at network size on 2D slices (a diagnostic, not the
evaluation protocol of :mod:`samatch.evaluate`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from samatch.io.base import Case
from samatch.methods.sam_guided import ring_probs
from samatch.preprocess import minmax_normalize, resize_image, resize_label
from samatch.prompts import confident_masks, points_from_masks


def _dice(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool pairs -> (N,) Dice; NaN where the ground truth is empty (not scored)."""
    inter = (pred & gt).sum((1, 2)).float()
    total = (pred.sum((1, 2)) + gt.sum((1, 2))).float()
    return torch.where(gt.any(dim=(1, 2)), 2 * inter / total.clamp_min(1), torch.nan)


def collect_slices(cases: Sequence[Case], size: int, max_slices: int, seed: int = 0):
    """Validation slices with any foreground, resized: images (N,1,S,S), labels (N,S,S) long."""
    images, labels = [], []
    for case in cases:
        img = resize_image(minmax_normalize(case.image), size)
        lab = resize_label(case.label, size)
        keep = lab.reshape(lab.shape[0], -1).any(1)
        images.append(img[keep])
        labels.append(lab[keep])
    img, lab = np.concatenate(images), np.concatenate(labels)
    pick = np.random.default_rng(seed).permutation(len(img))[:max_slices]
    return torch.from_numpy(img[pick])[:, None], torch.from_numpy(lab[pick]).long()


@torch.no_grad()
def pseudo_label_dice(
    guide, model, images, labels, threshold: float, batch: int = 8
) -> dict[str, np.ndarray]:
    """{prompt source: (N, C-1) Dice} for one SamGuidance (see module docstring)."""
    c = guide.num_classes
    classes = torch.arange(1, c, device=labels.device).view(1, -1, 1, 1)
    out: dict[str, list[torch.Tensor]] = defaultdict(list)
    enclosed = guide.enclosed
    for i in range(0, len(images), batch):
        x, y = images[i : i + batch], labels[i : i + batch]
        gt = y[:, None] == classes  # (B, C-1, S, S)
        emb = guide.embed(x)
        logits = model(x)
        probs = logits.softmax(1)
        prompts = {
            "gt_box": (gt, enclosed),
            "gt_box_plain": (gt, {}),
            "pred_box": (confident_masks(probs, threshold), enclosed),
        }
        scale = 256 / x.shape[-1]  # network pixels -> SAM grid (pixel centres)
        coords, point_labels, _ = points_from_masks(gt, negative_in_hole=True)
        prompts["gt_box_points"] = (gt, {})
        for name, (masks, rule) in prompts.items():
            largest = name == "pred_box" and guide.cfg.largest_component
            boxes, valid = guide.boxes(masks, largest=largest, all_classes=True, enclosed=rule)
            points = ((coords + 0.5) * scale - 0.5, point_labels) if name == "gt_box_points" else None
            filled = guide.decode(emb, boxes, x.shape[-1], points=points)
            p = torch.sigmoid(filled) * valid[:, :, None, None]
            sam_masks = ring_probs(p, rule) > 0.5
            out[name].append(torch.stack([_dice(sam_masks[:, k], gt[:, k]) for k in range(c - 1)], 1))
        pred = probs.argmax(1)
        out["unet"].append(torch.stack([_dice(pred == k + 1, gt[:, k]) for k in range(c - 1)], 1))
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items()}


def summarize_report(results: dict[str, dict[str, np.ndarray]], class_names: Sequence[str]) -> dict:
    """{stage: {source: {class: mean Dice over slices where present, "n": count}}}."""
    report: dict = {}
    for stage, by_source in results.items():
        report[stage] = {}
        for source, d in by_source.items():
            entry = {name: float(np.nanmean(d[:, k])) for k, name in enumerate(class_names[1:])}
            entry["n"] = [int(np.isfinite(d[:, k]).sum()) for k in range(d.shape[1])]
            report[stage][source] = entry
    return report


def format_report(report: dict, class_names: Sequence[str]) -> str:
    names = list(class_names[1:])
    lines = [f"{'stage':<8} {'prompt':<14} " + " ".join(f"{n:>11}" for n in names)]
    for stage, by_source in report.items():
        for source, entry in by_source.items():
            lines.append(f"{stage:<8} {source:<14} " + " ".join(f"{entry[n]:>11.4f}" for n in names))
    return "\n".join(lines)
