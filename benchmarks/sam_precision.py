"""Benchmark: what SAM's decoder in bf16 (``sam.amp=bf16``) changes against fp32, on a trained run's slices.

``step_ab.py`` times the joint step with the decoder in bf16; this says what the bf16 decoder gives
the step, through the method's own code (``SamMatch.pseudo_targets`` and ``aux_losses``) on the same
inputs in both precisions. The trained run's U-Net prompts SAM from its confident predictions on
``--pool`` slices of each of the run's sets (step_ab's trainer, SAM's embeddings cached), in batches
of ``--batch`` labeled + unlabeled slices, un-augmented (an identity view), the labeled boxes
jittered alike in both. SAM's LoRA adapters are first trained ``--adapt-steps`` steps on the labeled
pool (a run's checkpoint holds adapters only if it trained SAM-Match; at LoRA's start, B = 0, the
decoder is the pretrained one). Reported, fp32 against bf16:

* the fused pseudo-labels of the unlabeled slices: the share of pixels whose label differs, and each
  class's Dice between the two (over all slices); their confidences: the mean and largest change;
* SAM's two losses (supervised on the labeled slices, agreement on the unlabeled): each batch's
  values and their relative change;
* the LoRA gradient of their sum: cosine and norm ratio per batch, and for scale the cosine between
  two fp32 gradients whose labeled boxes were jittered by different draws (as successive steps are);
* seconds of that SAM part (prompts, decode, fusion, losses, backward) per batch.

    python benchmarks/sam_precision.py --run RUN_DIR [--pool 32] [--batch 4] [--adapt-steps 200]
        [--sam-cache DIR] [--out runs/sam_precision.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.record import provenance, write_json  # noqa: E402
from benchmarks.step_ab import add_run_arguments, run_size, trainer_for  # noqa: E402
from samatch import allocator  # noqa: E402
from samatch.evaluate import volume_dice  # noqa: E402

PRECISIONS = ("fp32", "bf16")
OTHER_JITTER = 1_000_000  # seeds of the reference draws: apart from the batches' own
IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def sam_part(method, batch: dict, amp: str, seed: int) -> dict:
    """SAM's side of a joint step on ``batch`` with the decoder in ``amp``: the weak view's
    pseudo-label (B, S, S) and confidence (B, S, S), SAM's two losses and the LoRA gradient (flat)."""
    guide = method.guide
    before, guide.cfg.amp = guide.cfg.amp, amp
    try:
        method.box_gen.manual_seed(seed)  # the same jittered labeled boxes in both precisions
        conf, label = method.pseudo_targets(**batch)
        losses = method.aux_losses(**batch)
    finally:
        guide.cfg.amp = before
    total = losses["loss_sam_x"] + losses["loss_sam_agree"]
    params = [p for p in guide.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)  # a LoRA target off the decode: None
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    return {
        "conf": conf.detach(),
        "label": label,
        "loss_sam_x": float(losses["loss_sam_x"].detach()),
        "loss_sam_agree": float(losses["loss_sam_agree"].detach()),
        "grad": torch.cat([g.flatten() for g in grads]),
    }


def adapt(trainer, steps: int, batch: int) -> dict:
    """SAM's LoRA adapters trained ``steps`` steps on the labeled pool with the method's supervised
    loss (ground-truth boxes, jittered; fp32; the method's own optimizer), so that the comparison
    sees adapted adapters rather than LoRA's start (B = 0: the pretrained SAM, and no gradient for
    A). Returns the first and last losses and the adapters' mean |B|."""
    method, lab = trainer.method, trainer.data.labeled
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        img_x, mask_x, idx = lab.sample(batch, gen, "cpu")
        method.discard_step_state()
        loss = method.aux_losses(img_x=img_x, mask_x=mask_x, idx_x=idx)["loss_sam_x"]
        method.sam_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.sam_optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"adapting SAM's LoRA: step {step + 1}/{steps}, loss {losses[-1]:.4f}", flush=True)
    method.sam_optimizer.zero_grad(set_to_none=True)
    b = [p.detach().abs().mean() for n, p in method.guide.named_parameters() if "lora_B" in n]
    return {
        "steps": steps,
        "loss_first_10": losses[:10],
        "loss_last_10": losses[-10:],
        "lora_b_abs_mean": float(torch.stack(b).mean()) if b else None,
    }


def batches(trainer, batch: int):
    """The pools in order, ``batch`` labeled + ``batch`` unlabeled slices at a time, with the
    un-augmented unlabeled view (identity affine) and the U-Net's logits on it (eval mode)."""
    lab, unl = trainer.data.labeled, trainer.data.unlabeled
    trainer.model.eval()
    for start in range(0, min(len(lab), len(unl)) - batch + 1, batch):
        idx = torch.arange(start, start + batch)
        img_u = unl.images[idx]
        with torch.no_grad():
            pred_u_w = trainer.model(img_u)
        yield {
            "pred_u_w": pred_u_w,
            "img_u": img_u,
            "theta_u": IDENTITY.expand(batch, 2, 3),
            "idx_u": idx,
            "img_x": lab.images[idx],
            "mask_x": lab.labels[idx].long(),
            "idx_x": idx,
        }


def compare(trainer, batch: int) -> dict:
    """Every batch in both precisions -> the comparison (module docstring) and per-batch rows."""
    method = trainer.method
    method.iteration = trainer.iteration  # as Trainer.step sets it: past the warm-up, the joint stage
    if not method.joint():
        raise ValueError("the trainer is in SAM-Match's warm-up: its pseudo-labels would not use SAM")
    num_classes = trainer.cfg.model.num_classes
    rows, labels, confs = [], {a: [] for a in PRECISIONS}, {a: [] for a in PRECISIONS}
    for i, b in enumerate(batches(trainer, batch)):
        if i == 0:  # untimed: the first calls' one-time costs
            for amp in PRECISIONS:
                sam_part(method, b, amp, seed=i)
        row = {"batch": i}
        out = {}
        for amp in PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]:  # each first in every other batch
            t0 = time.perf_counter()  # the CPU's: nothing queued to wait for
            out[amp] = sam_part(method, b, amp, seed=i)
            row[f"{amp}_s"] = time.perf_counter() - t0
            row[f"loss_sam_x_{amp}"] = out[amp]["loss_sam_x"]
            row[f"loss_sam_agree_{amp}"] = out[amp]["loss_sam_agree"]
            labels[amp].append(out[amp]["label"])
            confs[amp].append(out[amp]["conf"])
        g32, g16 = out["fp32"]["grad"], out["bf16"]["grad"]
        row["grad_cosine"] = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
        # The scale to read it against: fp32 again with the labeled boxes jittered by another draw, as
        # the next step would jitter them (sam.box_jitter).
        other = sam_part(method, b, "fp32", seed=OTHER_JITTER + i)["grad"]
        row["grad_cosine_other_jitter"] = float(torch.nn.functional.cosine_similarity(g32, other, dim=0))
        row["grad_norm_ratio"] = float(g16.norm() / g32.norm())
        rows.append(row)
        print(
            f"batch {i + 1}: SAM part fp32 {row['fp32_s']:.2f} s, bf16 {row['bf16_s']:.2f} s;"
            f" loss_sam_x {row['loss_sam_x_fp32']:.4f} / {row['loss_sam_x_bf16']:.4f};"
            f" gradient cosine {row['grad_cosine']:.5f} (fp32 with other box jitter:"
            f" {row['grad_cosine_other_jitter']:.5f})",
            flush=True,
        )
    if not rows:
        raise ValueError(f"fewer than --batch {batch} slices in a pool: nothing to compare")
    label32, label16 = torch.cat(labels["fp32"]), torch.cat(labels["bf16"])
    conf_change = (torch.cat(confs["bf16"]) - torch.cat(confs["fp32"])).abs()
    present = set(torch.cat([label32.unique(), label16.unique()]).tolist())
    agreement = volume_dice(label16.numpy(), label32.numpy(), num_classes)  # (C-1,)
    dice = {str(c): float(d) if c in present else None for c, d in enumerate(agreement, start=1)}
    return {
        "rows": rows,
        "summary": {
            "pseudo_label_pixels_changed": float((label32 != label16).float().mean()),
            "pseudo_label_dice_per_class": dice,
            "confidence_change_mean": float(conf_change.mean()),
            "confidence_change_max": float(conf_change.max()),
            "loss_sam_x_rel_change_max": max(
                abs(r["loss_sam_x_bf16"] / r["loss_sam_x_fp32"] - 1) for r in rows
            ),
            "loss_sam_agree_rel_change_max": max(
                (
                    abs(r["loss_sam_agree_bf16"] / r["loss_sam_agree_fp32"] - 1)
                    for r in rows
                    if r["loss_sam_agree_fp32"] > 0
                ),
                default=None,
            ),
            "grad_cosine_min": min(r["grad_cosine"] for r in rows),
            "grad_cosine_median": statistics.median(r["grad_cosine"] for r in rows),
            "grad_cosine_other_jitter_median": statistics.median(r["grad_cosine_other_jitter"] for r in rows),
            "grad_norm_ratio_median": statistics.median(r["grad_norm_ratio"] for r in rows),
            "fp32_s_median": statistics.median(r["fp32_s"] for r in rows),
            "bf16_s_median": statistics.median(r["bf16_s"] for r in rows),
            "slices": len(label32),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, pool=32, required=True)
    parser.add_argument("--batch", type=int, default=4, help="labeled (and unlabeled) slices per batch")
    parser.add_argument(
        "--adapt-steps",
        type=int,
        default=200,
        help="train SAM's LoRA this many steps on the labeled pool first (0: compare at LoRA's start)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/sam_precision.json"))
    allocator.add_allocator_argument(parser)
    args = parser.parse_args(argv)
    size = run_size(parser, args.run)
    allocator.relaunch(args.allocator, argv, parser)
    trainer = trainer_for("samatch", size, args.batch, "fp32", args.run, args.pool, args.sam_cache)
    adapted = adapt(trainer, args.adapt_steps, args.batch)
    try:
        result = compare(trainer, args.batch)
    except ValueError as err:
        parser.error(str(err))
    result["adapt"] = adapted
    s = result["summary"]
    dice = ", ".join(
        f"class {c} {d:.4f}" for c, d in s["pseudo_label_dice_per_class"].items() if d is not None
    )
    agree = s["loss_sam_agree_rel_change_max"]
    print(
        f"{s['slices']} unlabeled slices: pseudo-label pixels changed"
        f" {100 * s['pseudo_label_pixels_changed']:.3f}%; Dice fp32 vs bf16: {dice};"
        f" confidence change mean {s['confidence_change_mean']:.2e}, max {s['confidence_change_max']:.3f};"
        f" SAM losses' largest relative change {s['loss_sam_x_rel_change_max']:.2e} (supervised),"
        f" {'none prompted' if agree is None else f'{agree:.2e}'} (agreement);"
        f" LoRA gradient cosine median {s['grad_cosine_median']:.5f}, min {s['grad_cosine_min']:.5f}"
        f" (fp32 with other box jitter: median {s['grad_cosine_other_jitter_median']:.5f});"
        f" SAM part median fp32 {s['fp32_s_median']:.2f} s, bf16 {s['bf16_s_median']:.2f} s"
    )
    result |= provenance("sam_precision", __file__, args, argv)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
