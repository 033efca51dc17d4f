"""Fuse SAM's per-class masks with the Match network's softmax into one pseudo-label.

SAM answers one binary question per box prompt ("is this pixel inside the object of class c?"), with
no background channel and no competition between classes; the Match network gives a C-way softmax.
:func:`fuse` turns the first into a C-way distribution comparable to the second.
"""

from __future__ import annotations

import torch

__all__ = ["fuse"]


@torch.no_grad()
def fuse(
    match_probs: torch.Tensor, sam_logits: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-label and confidence from SAM masks, falling back to Match where SAM has no prompt.

    Per pixel, for foreground class c = 1..C-1:

    1. ``p_c = sigmoid(sam_logits[:, c-1])`` (logits are never read as probabilities);
    2. if the prompt of class c is invalid (no box), ``p_c = match_probs[:, c]`` instead;
    3. background score ``p_0 = prod_c (1 - p_c)``: the probability that no class claims the pixel if
       SAM's masks are read as independent. We prefer it to ``1 - max_c p_c`` because two classes that
       both claim a pixel with p = 0.6 should leave little room for background (0.16, not 0.4); with a
       single foreground class both rules agree;
    4. the C scores are divided by their sum; ``pseudo = argmax``, ``conf = max`` of the normalised
       scores (to be thresholded like UniMatch's ``conf_u_w``).

    An image with NO valid prompt at all returns ``match_probs`` unchanged (argmax and max), so
    SAM-Match degrades exactly to the Match method; step 3 would otherwise inflate the background of
    a plain softmax (prod(1 - p_c) >= 1 - sum p_c).

    Runs under ``torch.no_grad``: pseudo-labels are targets.

    Args:
        match_probs: (B, C, H, W) softmax probabilities of the Match network (weak view).
        sam_logits: (B, C-1, H, W) SAM mask logits, channel k for class k + 1.
        valid: (B, C-1) bool, whether class k + 1 had a prompt in image b.
        eps: floor on the normaliser.

    Returns:
        pseudo: (B, H, W) long labels; conf: (B, H, W) float in [0, 1].
    """
    if match_probs.dim() != 4 or match_probs.shape[1] < 2:
        raise ValueError(f"match_probs must be (B, C>=2, H, W), got {tuple(match_probs.shape)}")
    b, c, h, w = match_probs.shape
    if tuple(sam_logits.shape) != (b, c - 1, h, w):
        raise ValueError(
            f"sam_logits must be (B, C-1, H, W) = {(b, c - 1, h, w)}, got {tuple(sam_logits.shape)}"
        )
    if tuple(valid.shape) != (b, c - 1) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool (B, C-1) = {(b, c - 1)} tensor")
    fg = torch.where(valid[..., None, None], sam_logits.sigmoid(), match_probs[:, 1:])  # (B, C-1, H, W)
    bg = (1.0 - fg).prod(dim=1, keepdim=True)  # (B, 1, H, W)
    scores = torch.cat([bg, fg], dim=1)  # (B, C, H, W)
    scores = scores / scores.sum(dim=1, keepdim=True).clamp_min(eps)
    any_valid = valid.any(dim=1)[:, None, None, None]  # (B, 1, 1, 1)
    scores = torch.where(any_valid, scores, match_probs)
    conf, pseudo = scores.max(dim=1)
    return pseudo, conf
