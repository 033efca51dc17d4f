"""Supervised-only, FixMatch and UniMatch on the 2D U-Net (UniMatch's medical recipe).

Names follow UniMatch: ``img_x, mask_x`` labeled; ``img_u_w`` weak view; ``img_u_s1/s2`` strong
views with CutMix; ``conf_u_w, mask_u_w`` the pseudo-label; ``loss_x, loss_u_s1, loss_u_fp``.
The CutMix partner of each unlabeled image is its neighbour in the batch (``roll(1)``), so the
partner's pseudo-label comes from the same forward pass instead of an extra one.
"""

from __future__ import annotations

import torch

from samatch.losses import ce_loss, dice_loss
from samatch.methods.base import Method, register
from samatch.transforms import apply_affine, cutmix_box, random_affine, strong_view, weak_view


def supervised_loss(pred_x: torch.Tensor, mask_x: torch.Tensor) -> torch.Tensor:
    """Half cross-entropy, half Dice, as in the SSL4MIS / UniMatch medical baselines."""
    return (ce_loss(pred_x, mask_x) + dice_loss(pred_x, mask_x)) / 2


def pseudo_label(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,C,H,W) logits -> confidence (B,H,W), hard label (B,H,W) (no gradient)."""
    conf, mask = logits.detach().softmax(dim=1).max(dim=1)
    return conf, mask


def cutmix(
    img_s: torch.Tensor, conf: torch.Tensor, mask: torch.Tensor, box: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste the batch neighbour inside ``box`` (B,H,W): image, and its pseudo-label and confidence."""
    img = torch.where(box[:, None], img_s.roll(1, dims=0), img_s)
    return img, torch.where(box, conf.roll(1, 0), conf), torch.where(box, mask.roll(1, 0), mask)


@register("supervised")
class Supervised(Method):
    uses_unlabeled = False

    def train_step(self, img_x, mask_x, img_u=None, **batch_info):
        img_x, mask_x = weak_view(img_x, mask_x, self.generator)
        loss_x = supervised_loss(self.model(img_x), mask_x)
        return {"loss": loss_x, "loss_x": loss_x}


class _MatchBase(Method):
    """Shared pieces: weak views, strong views with CutMix, and the thresholded unlabeled loss."""

    def views(self, img_x, mask_x, img_u):
        """Weak views; also returns ``theta_u``, the unlabeled affine, so that pseudo-labels can be
        computed in the original frame and warped into the view (see SAM-Match)."""
        img_x, mask_x = weak_view(img_x, mask_x, self.generator)
        theta_u = random_affine(img_u.shape[0], self.generator, img_u.device)
        img_u_w, _ = apply_affine(img_u, None, theta_u)
        return img_x, mask_x, img_u_w, theta_u

    def strong(self, img_u_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        box = cutmix_box(
            img_u_w.shape[0],
            tuple(img_u_w.shape[-2:]),
            self.generator,
            img_u_w.device,
            self.cfg.method.cutmix_prob,
        )
        return strong_view(img_u_w, self.generator), box

    def unsup_loss(self, pred: torch.Tensor, mask: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        """Dice against the pseudo-label on confident pixels only (UniMatch's medical loss)."""
        return dice_loss(pred, mask, weight_mask=(conf >= self.cfg.method.threshold).float())

    def pseudo_targets(self, pred_u_w: torch.Tensor, **ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """conf_u_w, mask_u_w for the weak view; SAM-Match overrides this with SAM refinement.

        ``ctx`` holds ``img_u`` (original frame), ``theta_u`` and ``idx_u``.
        """
        return pseudo_label(pred_u_w)

    def aux_losses(self, **ctx) -> dict[str, torch.Tensor]:
        """Extra losses added to the total (SAM-Match: SAM's own losses). ``ctx`` as above plus
        ``img_x, mask_x, idx_x`` in the original frame."""
        return {}


@register("fixmatch")
class FixMatch(_MatchBase):
    def train_step(self, img_x, mask_x, img_u, **batch_info):
        img_x_w, mask_x_w, img_u_w, theta_u = self.views(img_x, mask_x, img_u)
        img_u_s, box = self.strong(img_u_w)
        bx = img_x.shape[0]
        pred_x, pred_u_w = self.model(torch.cat([img_x_w, img_u_w])).split([bx, img_u_w.shape[0]])
        conf_u_w, mask_u_w = self.pseudo_targets(pred_u_w, img_u=img_u, theta_u=theta_u, **batch_info)
        img_u_s, conf_s, mask_s = cutmix(img_u_s, conf_u_w, mask_u_w, box)
        pred_u_s = self.model(img_u_s)
        loss_x = supervised_loss(pred_x, mask_x_w)
        loss_u_s = self.unsup_loss(pred_u_s, mask_s, conf_s)
        loss = (loss_x + self.cfg.method.unsup_weight * loss_u_s) / 2
        ratio = (conf_u_w >= self.cfg.method.threshold).float().mean()
        return {"loss": loss, "loss_x": loss_x, "loss_u_s": loss_u_s, "mask_ratio": ratio}


@register("unimatch")
class UniMatch(_MatchBase):
    def train_step(self, img_x, mask_x, img_u, **batch_info):
        img_x_w, mask_x_w, img_u_w, theta_u = self.views(img_x, mask_x, img_u)
        img_u_s1, box1 = self.strong(img_u_w)
        img_u_s2, box2 = self.strong(img_u_w)
        bx, bu = img_x.shape[0], img_u_w.shape[0]
        preds, preds_fp = self.model(torch.cat([img_x_w, img_u_w]), feature_perturb=True)
        pred_x, pred_u_w = preds.split([bx, bu])
        pred_u_w_fp = preds_fp[bx:]
        ctx = {"img_u": img_u, "theta_u": theta_u, "img_x": img_x, "mask_x": mask_x, **batch_info}
        conf_u_w, mask_u_w = self.pseudo_targets(pred_u_w, **ctx)
        img_u_s1, conf_1, mask_1 = cutmix(img_u_s1, conf_u_w, mask_u_w, box1)
        img_u_s2, conf_2, mask_2 = cutmix(img_u_s2, conf_u_w, mask_u_w, box2)
        pred_u_s1, pred_u_s2 = self.model(torch.cat([img_u_s1, img_u_s2])).chunk(2)
        loss_x = supervised_loss(pred_x, mask_x_w)
        loss_u_s1 = self.unsup_loss(pred_u_s1, mask_1, conf_1)
        loss_u_s2 = self.unsup_loss(pred_u_s2, mask_2, conf_2)
        loss_u_fp = self.unsup_loss(pred_u_w_fp, mask_u_w, conf_u_w)
        loss_u = 0.25 * loss_u_s1 + 0.25 * loss_u_s2 + 0.5 * loss_u_fp
        loss = (loss_x + self.cfg.method.unsup_weight * loss_u) / 2
        ratio = (conf_u_w >= self.cfg.method.threshold).float().mean()
        out = {
            "loss_x": loss_x,
            "loss_u_s1": loss_u_s1,
            "loss_u_s2": loss_u_s2,
            "loss_u_fp": loss_u_fp,
            "mask_ratio": ratio,
        }
        aux = self.aux_losses(**ctx)  # e.g. SAM-Match's SAM losses; they share one backward pass
        return {"loss": loss + sum(aux.values()), **out, **aux}
