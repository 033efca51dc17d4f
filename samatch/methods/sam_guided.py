"""SAM-Match: UniMatch whose pseudo-labels are refined by a LoRA-adapted SAM, trained jointly.

Per step (shapes for B images, C classes, network size S, SAM grid 256):

1. UniMatch forward on the weak view gives ``pred_u_w`` (B,C,S,S). Its logits are warped back to
   the *original* frame with the inverse of the weak view's affine, so SAM works on un-augmented
   images and a frozen encoder's embeddings can be computed once and cached (``sam.cache_embeddings``).
2. Confident pixels per class -> one box per foreground class (largest component, margin), all
   decoded from the same image embedding: ``sam.decode`` (B, C-1, 256, 256).
3. Nested structures (``sam.enclosed = "2>3"``: ACDC's myocardium surrounds the LV): a box around a
   ring makes SAM segment the filled disk, so the outer class is prompted with the box of
   outer + inner, and its probability is ``p_filled_outer * (1 - p_filled_inner)``: the ring.
4. ``fuse`` turns SAM's per-class probabilities (Match's where a class got no prompt) into one
   pseudo-label and a confidence; both are warped into the weak view and replace UniMatch's.
5. SAM's own loss: Dice + BCE on labeled slices with jittered ground-truth boxes (always), plus,
   after warm-up, agreement with confident Match predictions on unlabeled slices.

Stages: during the first ``sam.warmup_fraction`` of the schedule Match trains on its own
pseudo-labels (stage 1) while SAM adapts on the labeled slices (stage 2, run concurrently because
it does not depend on Match); after that both train jointly (stage 3).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from samatch.embedding_cache import EmbeddingStore
from samatch.fusion import fuse
from samatch.losses import binary_ce_loss, binary_dice_loss
from samatch.methods.base import fused_optimizer, register
from samatch.methods.match import UniMatch
from samatch.models.lora import LoraSettings, add_lora, load_lora_state_dict, lora_state_dict
from samatch.models.sam import build_sam
from samatch.models.tiny_vit import fold_batchnorm
from samatch.prompts import boxes_from_masks, confident_masks, jitter_boxes, largest_component
from samatch.transfer import host_may_read, to_device

SAM_GRID = 256


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) -> the inverse maps, (B, 2, 3).

    The 2 x 2 inverse in closed form, [[d, -b], [-c, a]] / (ad - bc): a few element-wise kernels, where
    torch.linalg's batched solvers may call libraries that a CUDA graph cannot record (and ``inv``
    checks for errors on the host)."""
    a, b, c, d = theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1]
    a_inv = torch.stack([d, -b, -c, a], dim=1).view(-1, 2, 2) / (a * d - b * c).view(-1, 1, 1)
    return torch.cat([a_inv, -a_inv @ theta[:, :, 2:]], dim=2)


def filled_masks(masks: torch.Tensor, enclosed: dict[int, tuple[int, ...]]) -> torch.Tensor:
    """(B, C-1, H, W) per-class masks -> the same with each outer class OR-ed with what it encloses."""
    out = masks.clone()
    for outer, inners in enclosed.items():
        for inner in inners:
            out[:, outer - 1] |= masks[:, inner - 1]
    return out


def ring_probs(filled: torch.Tensor, enclosed: dict[int, tuple[int, ...]]) -> torch.Tensor:
    """(B, C-1, H, W) filled-shape probabilities -> class probabilities (outer minus inner)."""
    out = filled.clone()
    for outer, inners in enclosed.items():
        for inner in inners:
            out[:, outer - 1] = out[:, outer - 1] * (1 - filled[:, inner - 1])
    return out


class SamGuidance(torch.nn.Module):
    """The SAM side, usable by the method during training and by the cascade at inference."""

    # On the CPU decode only the prompts that exist (valid); False decodes all, as a GPU does (kept
    # for the test that compares the two).
    skip_invalid = True

    def __init__(self, cfg, num_classes: int):
        super().__init__()
        sc = cfg.sam
        self.cfg = sc
        self.num_classes = num_classes
        self.enclosed = sc.enclosure()
        for outer, inners in self.enclosed.items():
            if not all(0 < c < num_classes for c in (outer, *inners)):
                raise ValueError(f"sam.enclosed={sc.enclosed!r} names classes outside 1..{num_classes - 1}")
        self.sam = build_sam(sc.backbone, sc.checkpoint or None)
        lora = LoraSettings(
            rank=sc.lora_rank,
            alpha=sc.lora_alpha,
            targets=sc.lora_targets,
            freeze_a=sc.lora_freeze_a,
            seed=cfg.seed,
        )
        add_lora(self.sam, lora)
        if not self.encoder_trainable():  # frozen: its BatchNorm can be folded into the convs
            fold_batchnorm(self.sam.image_encoder)
        self.cache: dict[str, torch.Tensor] = {}  # not a buffer: never saved or sent
        refined = sc.refined()
        # (C-1,) bool: which foreground classes get a SAM prompt at all (pseudo-labels, cascade).
        self.register_buffer(
            "refine_mask",
            torch.tensor([refined is None or c in refined for c in range(1, num_classes)]),
            persistent=False,
        )
        # Fixed by the config, so decode never asks the device which classes to keep (no host sync).
        self.refines_all = refined is None or all(c in refined for c in range(1, num_classes))
        self.register_buffer("refine_index", self.refine_mask.nonzero()[:, 0], persistent=False)

    # ---- embeddings ---------------------------------------------------------------------------
    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.sam.image_encoder.parameters())

    @torch.no_grad()
    def build_cache(self, name: str, images: torch.Tensor, device, batch: int = 16) -> None:
        """Embed a whole slice set once: images (N,1,S,S) -> cache[name] (N,256,64,64) fp16 on device.

        With ``sam.cache_dir`` the embeddings are read from / written to that folder
        (:mod:`samatch.embedding_cache`), so another process on the same data does not encode again.
        """
        self.sam.eval()

        def encode(imgs: torch.Tensor) -> torch.Tensor:
            parts = [
                self.sam.encode(imgs[i : i + batch].to(device)).half() for i in range(0, len(imgs), batch)
            ]
            return torch.cat(parts)

        if self.cfg.cache_dir:
            store = EmbeddingStore(self.cfg.cache_dir, self.sam.image_encoder)
            self.cache[name] = store.get_or_compute(images, encode).to(device)
        else:
            self.cache[name] = encode(images)

    def embed(self, images: torch.Tensor, name: str | None = None, idx: torch.Tensor | None = None):
        """(B,1,S,S) -> (B,256,64,64), from the cache when it has this set."""
        if name in self.cache and idx is not None:
            return self.cache[name][to_device(idx, self.cache[name].device)].float()
        if self.encoder_trainable():
            return self.sam.encode(images)
        with torch.no_grad():
            return self.sam.encode(images)

    # ---- prompts and decoding ----------------------------------------------------------------------
    def boxes(
        self, masks: torch.Tensor, largest: bool, all_classes: bool = False, enclosed: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C-1, S, S) bool class masks -> boxes (B, C-1, 4) on the SAM grid, valid (B, C-1).

        Classes outside ``sam.refine_classes`` get no prompt (invalid) unless ``all_classes``
        (SAM's own supervised loss still trains on every class). ``enclosed`` overrides the
        nested-structure rule (``sam.enclosed``) for this call.
        """
        filled = filled_masks(masks, self.enclosed if enclosed is None else enclosed)
        if largest:
            # 24: the training masks of ACDC, BUSI and CHAOS need at most 8 iterations, 17 with ragged
            # borders like an early U-Net's (benchmarks/lc_iterations.py, docs/performance_log.md).
            filled = largest_component(filled, max_iters=24)
        boxes, valid = boxes_from_masks(filled, margin=self.cfg.box_margin)
        if not all_classes:
            valid = valid & self.refine_mask.to(valid.device)
        # Inclusive pixel extents: x0 -> x0 * k, x1 -> (x1 + 1) * k - 1, so a mask reaching the last
        # column still reaches the last column of the 256 grid.
        k = SAM_GRID / masks.shape[-1]
        scaled = torch.cat([boxes[..., :2] * k, (boxes[..., 2:] + 1) * k - 1], dim=-1)
        return scaled * valid[..., None], valid

    def decode(
        self,
        emb: torch.Tensor,
        boxes: torch.Tensor,
        size: int,
        only_refined: bool = False,
        points=None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Filled-shape logits at network size: (B, C-1, size, size).

        ``only_refined``: decode only the classes of ``sam.refine_classes`` (the others get logits 0
        and must be masked out by ``valid``), which saves their share of SAM's decoder.
        ``points``: optional point prompts on the SAM grid, (coords (B, C-1, P, 2), labels (B, C-1, P)).
        ``valid`` (B, C-1): the prompts that exist; every user of the logits masks the others out, so
        on the CPU (:attr:`skip_invalid`) only these are decoded and the others get logits 0. A GPU
        decodes all: choosing by value would make the host wait for the device.
        """
        keep = self.refine_index if only_refined and not self.refines_all else None
        if keep is not None:
            boxes = boxes[:, keep]
            points = None if points is None else (points[0][:, keep], points[1][:, keep])
            valid = None if valid is None else valid[:, keep]
        with self.precision(boxes.device):
            if self.skip_invalid and valid is not None and points is None and host_may_read(valid):
                logits = self._decode_valid(emb, boxes, valid)
            else:
                logits = self.sam.decode(emb, boxes, points)  # (B, K, 256, 256)
        if self.cfg.amp == "bf16":
            logits = logits.float()  # the fusion and the losses in fp32
        if size != SAM_GRID:
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        if keep is not None:
            full = logits.new_zeros(logits.shape[0], self.refine_mask.numel(), size, size)
            logits = full.index_copy(1, keep, logits)
        return logits

    def precision(self, device: torch.device):
        """The autocast SAM's decoder runs under (``sam.amp``): the step's own for ``step``, else fp32
        or bf16 whatever the step's (an fp32 U-Net with a bf16 decoder, or the reverse)."""
        if self.cfg.amp == "step":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16")

    def _decode_valid(self, emb: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The valid prompts' logits (B, K, 256, 256), each decoded against its own image, 0 elsewhere;
        all of them decoded when all or none are valid (none: the losses keep their graph)."""
        b, k = boxes.shape[:2]
        flat = valid.reshape(-1).nonzero()[:, 0]  # (n,) prompt ids b * K + k
        if flat.numel() in (0, b * k):
            return self.sam.decode(emb, boxes)
        decoded = self.sam.decode(emb[flat // k], boxes.reshape(b * k, 1, 4)[flat])  # (n, 1, 256, 256)
        full = decoded.new_zeros(b * k, *decoded.shape[2:])
        return full.index_copy(0, flat, decoded[:, 0]).view(b, k, *decoded.shape[2:])

    def refine(self, probs: torch.Tensor, filled_logits: torch.Tensor, valid: torch.Tensor):
        """Match probs (B,C,S,S) + SAM filled logits -> fused pseudo-label (B,S,S), conf (B,S,S)."""
        # A class without a prompt decoded a meaningless box: it must not carve a hole in its outer ring.
        p_filled = torch.sigmoid(filled_logits.float()) * valid[:, :, None, None]
        p = ring_probs(p_filled, self.enclosed)
        return fuse(probs, torch.logit(p.clamp(1e-6, 1 - 1e-6)), valid)

    @torch.no_grad()
    def cascade(self, images: torch.Tensor, logits: torch.Tensor, threshold: float) -> torch.Tensor:
        """Inference: Match logits (B,C,S,S) -> boxes -> SAM -> fused probabilities-as-one-hot (B,C,S,S)."""
        probs = logits.float().softmax(1)
        masks = confident_masks(probs, threshold)
        boxes, valid = self.boxes(masks, self.cfg.largest_component)
        filled = self.decode(self.embed(images), boxes, images.shape[-1], only_refined=True, valid=valid)
        pseudo, _ = self.refine(probs, filled, valid)
        return F.one_hot(pseudo, self.num_classes).permute(0, 3, 1, 2).float()


@register("samatch")
class SamMatch(UniMatch):
    # A joint step decodes SAM twice: the unlabeled batch's pseudo-label prompts and the labeled batch's
    # supervised prompts. When both prompt the same classes they go through one decode of 2B images:
    # the same values, half the decoder's operators (what a GPU step waits on, docs/performance_log.md).
    # False: two decodes (kept for the test that compares them).
    batch_decodes = True

    def __init__(self, cfg, model, generator, data=None, device="cpu", **context):
        super().__init__(cfg, model, generator)
        self.guide = SamGuidance(cfg, cfg.model.num_classes)
        self.guide.to(device)
        if cfg.schedule.compile:
            self.guide.sam.compile_decoder(cfg.schedule.compile_mode)
        self.box_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        if cfg.sam.cache_embeddings and data is not None:
            self.guide.build_cache("labeled", data.labeled.images, device)
            if data.unlabeled is not None:
                self.guide.build_cache("unlabeled", data.unlabeled.images, device)
        params = [p for p in self.guide.parameters() if p.requires_grad]
        # capturable: a recorded step (schedule.cuda_graph) keeps AdamW's step counts on the device.
        self.sam_optimizer = torch.optim.AdamW(
            params,
            lr=cfg.sam.lr,
            weight_decay=0.01,
            capturable=cfg.schedule.cuda_graph,
            **fused_optimizer(device),
        )

    def extra_optimizers(self):
        return [self.sam_optimizer]

    def generators(self):
        return {"box_jitter": self.box_gen}

    def joint_start(self) -> int:
        """First iteration of the joint stage. round, not int: 1/3 * 30 is 9.999... in floating
        point, and ``warmup-rounds = 1`` of 3 x 10 iterations must start the joint stage at 10."""
        return round(self.cfg.sam.warmup_fraction * self.cfg.schedule.iterations)

    def joint(self) -> bool:
        return self.iteration >= self.joint_start()

    def stage(self) -> str:
        return "joint" if self.joint() else "warmup"

    def pseudo_targets(
        self, pred_u_w, img_u=None, theta_u=None, idx_u=None, img_x=None, mask_x=None, idx_x=None, **ctx
    ):
        self.discard_step_state()
        if not self.joint():
            return super().pseudo_targets(pred_u_w)
        g = self.guide
        size = img_u.shape[-1]
        # Match's view of the original frame: warp logits back (outside the view: uniform, unconfident).
        grid = F.affine_grid(invert_affine(theta_u), list(pred_u_w.shape), align_corners=False)
        logits_raw = F.grid_sample(pred_u_w.detach().float(), grid, mode="bilinear", align_corners=False)
        probs_raw = logits_raw.softmax(1)  # (B, C, S, S)
        masks = confident_masks(probs_raw, self.cfg.method.threshold)  # (B, C-1, S, S)
        boxes, valid = g.boxes(masks, self.cfg.sam.largest_component)
        emb = g.embed(img_u, "unlabeled", idx_u)
        if self.batch_decodes and g.refines_all and mask_x is not None:
            # The labeled prompts too (aux_losses takes their logits): one decode for both batches.
            target_x, boxes_x, valid_x = self.labeled_prompts(mask_x)
            both = g.decode(
                torch.cat([emb, g.embed(img_x, "labeled", idx_x)]),
                torch.cat([boxes, boxes_x]),
                size,
                valid=torch.cat([valid, valid_x]),
            )
            filled_logits, logits_x = both.split([emb.shape[0], both.shape[0] - emb.shape[0]])
            self._labeled_sam = (logits_x, target_x, valid_x)
        else:
            filled_logits = g.decode(emb, boxes, size, only_refined=True, valid=valid)  # with grad (LoRA)
        pseudo_raw, conf_raw = g.refine(probs_raw, filled_logits.detach(), valid)
        # SAM learns from confident Match predictions (agreement), on the prompts it was given.
        # One max for both (an argmax over the classes, a strided reduction, took 15x as long on the CPU).
        top, label_raw = probs_raw.max(1)  # (B, S, S) each
        target = filled_masks(self.class_masks(label_raw), g.enclosed)
        weight = (top >= self.cfg.method.threshold).float()[:, None].expand_as(filled_logits)
        bce = F.binary_cross_entropy_with_logits(
            filled_logits, target.float(), weight=weight, reduction="none"
        )
        per_prompt = bce.mean((2, 3))  # (B, C-1)
        self._agreement = (per_prompt * valid).sum() / valid.sum().clamp_min(1)
        # Into the weak view: nearest for the label, bilinear for the confidence (0 outside the view).
        theta_grid = F.affine_grid(theta_u, [img_u.shape[0], 1, size, size], align_corners=False)
        mask_u_w = F.grid_sample(pseudo_raw[:, None].float(), theta_grid, mode="nearest", align_corners=False)
        conf_u_w = F.grid_sample(conf_raw[:, None], theta_grid, mode="bilinear", align_corners=False)
        return conf_u_w[:, 0], mask_u_w[:, 0].long()

    def discard_step_state(self) -> None:
        """pseudo_targets leaves SAM's labeled logits (when it batched) and the agreement loss for
        aux_losses."""
        self.__dict__.pop("_labeled_sam", None)
        self.__dict__.pop("_agreement", None)

    def class_masks(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (B, S, S) -> one mask per foreground class (B, C-1, S, S) bool. A comparison, not
        F.one_hot, whose range check reads the labels on the host."""
        classes = torch.arange(1, self.cfg.model.num_classes, device=labels.device).view(1, -1, 1, 1)
        return labels[:, None] == classes

    def labeled_prompts(self, mask_x: torch.Tensor):
        """Labels (B, S, S) -> SAM's supervised targets (B, C-1, S, S) bool, their ground-truth boxes
        randomly jittered (B, C-1, 4), valid (B, C-1)."""
        g = self.guide
        target = filled_masks(self.class_masks(mask_x), g.enclosed)
        boxes, valid = g.boxes(target, largest=False, all_classes=True)
        boxes = jitter_boxes(
            boxes, valid, (SAM_GRID, SAM_GRID), self.cfg.sam.box_jitter, generator=self.box_gen
        )
        return target, boxes, valid

    def aux_losses(self, img_x=None, mask_x=None, idx_x=None, **ctx):
        decoded = self.__dict__.pop("_labeled_sam", None)  # set by pseudo_targets when it batched
        if decoded is None:
            target, boxes, valid = self.labeled_prompts(mask_x)
            logits = self.guide.decode(
                self.guide.embed(img_x, "labeled", idx_x), boxes, mask_x.shape[-1], valid=valid
            )
        else:
            logits, target, valid = decoded
        loss_sam = binary_dice_loss(logits, target.float(), valid) + binary_ce_loss(
            logits, target.float(), valid
        )
        agreement = self.__dict__.pop("_agreement", None)  # set by pseudo_targets in the joint stage
        if agreement is None:
            agreement = torch.zeros((), device=logits.device)
        return {"loss_sam_x": loss_sam, "loss_sam_agree": self.cfg.sam.agreement_weight * agreement}

    # Checkpoints hold the U-Net and the LoRA tensors only: the frozen SAM base is rebuilt from its file.
    def checkpoint_state(self):
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        state.update({f"sam_lora.{k}": v for k, v in lora_state_dict(self.guide.sam).items()})
        return state

    def load_checkpoint_state(self, state):
        self.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        lora = {k[9:]: v for k, v in state.items() if k.startswith("sam_lora.")}
        load_lora_state_dict(
            self.guide.sam, {k: v.to(next(self.guide.parameters()).device) for k, v in lora.items()}
        )
