"""Benchmark: one training step of UniMatch, of SAM-Match (joint stage) and of a reference-equivalent
SAM-Match, with the same networks and batch.

Modes (each timed through ``Trainer.step``: batch sampling, forward, backward, optimizer steps):

* ``unimatch``: method ``unimatch``.
* ``joint``: method ``samatch`` past its warm-up (the joint stage), cached fp16 SAM embeddings.
* ``reference``: the same SamMatch networks with the cost structure of the reference implementation:
  four passes through SAM's IMAGE ENCODER per step (no cache: labeled image for SAM's labeled loss,
  unlabeled image for the pseudo-labels, and two re-encodes for the refinement and agreement
  passes), prompt boxes extracted on the host (masks moved to the CPU, a Python loop over images
  and classes with numpy / scipy), and a Dice loss that loops over classes calling ``.item()`` on
  each class's Dice (SSL4MIS's DiceLoss, which UniMatch uses).

Data: the built-in cardiac phantom (4 classes, ``sam.enclosed = "2>3"`` as for ACDC), a pool of a
few slices per set (batches are drawn with replacement). Reports the median ms per timed step
after warm-up steps (``torch.cuda.synchronize`` around each step on CUDA), peak device memory
(``torch.cuda.max_memory_allocated``, reset per case), the peak host RSS rise during a case
(``/proc/self/statm`` sampled every 5 ms after ``malloc_trim``; ``ru_maxrss`` where /proc is
missing), and the ratios joint / UniMatch and reference / joint. Per case also the FLOPs and bytes
of one more step and its roofline floor over the device's measured rates (``benchmarks/step_cost.py``).
Asserts nothing about time. With ``--cuda-graph`` (``schedule.cuda_graph``, CUDA only) the UniMatch and
joint steps are replayed as recorded CUDA graphs (:mod:`samatch.step_graph`; the warm-up steps pay
the recording), while the reference and the one step each of the counters runs eagerly. A step that
cannot be recorded is a row naming the error and where it arose, then timed eagerly; the ratios pair
steps timed the same way (rows and ratios carry ``cuda_graph``).

    python benchmarks/bench_step.py [--device auto|cpu|cuda] [--batch 4,12] [--size 256]
        [--steps N] [--warmup N] [--quick] [--out runs/bench_step.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import samatch  # noqa: E402
from benchmarks.record import provenance, write_json  # noqa: E402
from benchmarks.step_cost import device_rates, eager, floor_ms, step_cost, synced_seconds  # noqa: E402
from samatch import allocator  # noqa: E402
from samatch.config import COMPILE_MODES, TrainConfig, apply_overrides  # noqa: E402
from samatch.data import SliceSet, TrainData, build_train_data  # noqa: E402
from samatch.engine import Trainer  # noqa: E402
from samatch.losses import binary_ce_loss, binary_dice_loss, ce_loss  # noqa: E402
from samatch.methods.match import cutmix  # noqa: E402
from samatch.methods.sam_guided import SAM_GRID, SamMatch, filled_masks  # noqa: E402
from samatch.prompts import confident_masks, jitter_boxes  # noqa: E402
from samatch.step_graph import CaptureFailed  # noqa: E402

# ---- the reference-equivalent pieces ---------------------------------------------------------------


def numpy_boxes(masks: np.ndarray, margin: int = 0, largest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The straightforward path: (B, K, H, W) bool -> boxes (B, K, 4) float32 xyxy inclusive, valid (B, K).

    One image and one class at a time on the host, as the reference does. Same convention as
    :func:`samatch.prompts.boxes_from_masks` (margin, clamped to the image, zeros where empty);
    ``largest`` keeps the largest 8-connected component first (scipy.ndimage.label).
    """
    b, k, h, w = masks.shape
    boxes = np.zeros((b, k, 4), dtype=np.float32)
    valid = np.zeros((b, k), dtype=bool)
    for i in range(b):
        for j in range(k):
            m = masks[i, j]
            if largest and m.any():
                from scipy import ndimage

                lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
                if n > 1:
                    m = lab == (np.bincount(lab.ravel())[1:].argmax() + 1)
            ys, xs = np.nonzero(m)
            if len(ys) == 0:
                continue
            valid[i, j] = True
            boxes[i, j] = (
                max(xs.min() - margin, 0),
                max(ys.min() - margin, 0),
                min(xs.max() + margin, w - 1),
                min(ys.max() + margin, h - 1),
            )
    return boxes, valid


def host_boxes(
    guide, masks: torch.Tensor, largest: bool, all_classes: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SamGuidance.boxes computed on the host: to CPU, numpy loop, scale to the SAM grid, back."""
    filled = filled_masks(masks, guide.enclosed).cpu().numpy()
    boxes, valid = numpy_boxes(filled, guide.cfg.box_margin, largest)
    refine = getattr(guide, "refine_mask", None)  # sam.refine_classes: the others get no prompt
    if refine is not None and not all_classes:
        valid &= refine.cpu().numpy()
    k = SAM_GRID / masks.shape[-1]
    boxes = np.concatenate([boxes[..., :2] * k, (boxes[..., 2:] + 1) * k - 1], axis=-1) * valid[..., None]
    return torch.from_numpy(boxes).to(masks.device), torch.from_numpy(valid).to(masks.device)


def sync_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, weight_mask: torch.Tensor | None = None, smooth: float = 1e-5
) -> torch.Tensor:
    """samatch.losses.dice_loss's value (batch Dice, background skipped), computed class by class with a
    host synchronisation (``.item()``) per class, as SSL4MIS's DiceLoss logs its class-wise Dice."""
    probs = logits.softmax(dim=1)
    w = torch.ones_like(probs[:, 0]) if weight_mask is None else weight_mask.to(probs.dtype)
    num_classes = logits.shape[1]
    loss = torch.zeros((), device=logits.device)
    class_dice = []
    for c in range(1, num_classes):
        p, t = probs[:, c], (target == c).to(probs.dtype)
        dice = (2 * (p * t * w).sum() + smooth) / ((p * w).sum() + (t * w).sum() + smooth)
        class_dice.append(dice.item())  # the per-class host sync
        loss = loss + (1 - dice)
    return loss / (num_classes - 1)


class ReferenceSamMatch(SamMatch):
    """SamMatch's networks with the reference implementation's cost structure (see the module doc).

    Never registered: the benchmark swaps a SamMatch instance's class to this one and back, so both
    modes run on the very same U-Net, SAM, LoRA tensors and optimizers.
    """

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        g = self.guide
        if g.encoder_trainable():
            return g.sam.encode(images)
        with torch.no_grad():
            return g.sam.encode(images)

    def train_step(self, img_x, mask_x, img_u, **batch_info):
        cfg, g = self.cfg, self.guide
        thr, c = cfg.method.threshold, cfg.model.num_classes
        largest = cfg.sam.largest_component
        img_x_w, mask_x_w, img_u_w, _ = self.views(img_x, mask_x, img_u)
        img_u_s1, box1 = self.strong(img_u_w)
        img_u_s2, box2 = self.strong(img_u_w)
        bx, bu, size = img_x.shape[0], img_u_w.shape[0], img_x.shape[-1]
        preds, preds_fp = self.model(torch.cat([img_x_w, img_u_w]), feature_perturb=True)
        pred_x, pred_u_w = preds.split([bx, bu])
        pred_u_w_fp = preds_fp[bx:]
        probs = pred_u_w.detach().float().softmax(1)

        # SAM pass 1: labeled image, jittered ground-truth boxes, LoRA gradients.
        classes = torch.arange(1, c, device=mask_x.device).view(1, -1, 1, 1)
        target_x = filled_masks(mask_x_w[:, None] == classes, g.enclosed)
        boxes_x, valid_x = host_boxes(g, target_x, largest=False, all_classes=True)
        boxes_x = jitter_boxes(
            boxes_x, valid_x, (SAM_GRID, SAM_GRID), cfg.sam.box_jitter, generator=self.box_gen
        )
        logits_x = g.decode(self.encode(img_x_w), boxes_x, size)
        loss_sam_x = binary_dice_loss(logits_x, target_x.float(), valid_x) + binary_ce_loss(
            logits_x, target_x.float(), valid_x
        )
        # SAM pass 2: unlabeled image, boxes from confident Match pixels -> fused pseudo-label.
        boxes_u, valid_u = host_boxes(g, confident_masks(probs, thr), largest)
        with torch.no_grad():
            sam_logits = g.decode(self.encode(img_u_w), boxes_u, size)
        pseudo, conf = g.refine(probs, sam_logits, valid_u)
        # SAM pass 3: re-encode, prompt with the fused pseudo-label's boxes -> refined pseudo-label.
        masks_r = (pseudo[:, None] == classes) & (conf >= thr)[:, None]
        boxes_r, valid_r = host_boxes(g, masks_r, largest)
        with torch.no_grad():
            ref_logits = g.decode(self.encode(img_u_w), boxes_r, size)
        mask_u_w, conf_u_w = g.refine(probs, ref_logits, valid_r)
        # SAM pass 4: re-encode, agreement with confident Match predictions, LoRA gradients.
        agree_logits = g.decode(self.encode(img_u_w), boxes_u, size)
        target_u = filled_masks(probs.argmax(1)[:, None] == classes, g.enclosed)
        weight = (probs.max(1).values >= thr).float()[:, None].expand_as(agree_logits)
        bce = F.binary_cross_entropy_with_logits(
            agree_logits, target_u.float(), weight=weight, reduction="none"
        )
        agreement = (bce.mean((2, 3)) * valid_u).sum() / valid_u.sum().clamp_min(1)

        # UniMatch's losses, with the per-class-sync Dice.
        img_u_s1, conf_1, mask_1 = cutmix(img_u_s1, conf_u_w, mask_u_w, box1)
        img_u_s2, conf_2, mask_2 = cutmix(img_u_s2, conf_u_w, mask_u_w, box2)
        pred_u_s1, pred_u_s2 = self.model(torch.cat([img_u_s1, img_u_s2])).chunk(2)
        loss_x = (ce_loss(pred_x, mask_x_w) + sync_dice_loss(pred_x, mask_x_w)) / 2

        def unsup(pred, mask, cf):
            return sync_dice_loss(pred, mask, weight_mask=(cf >= thr).float())

        loss_u = (
            0.25 * unsup(pred_u_s1, mask_1, conf_1)
            + 0.25 * unsup(pred_u_s2, mask_2, conf_2)
            + 0.5 * unsup(pred_u_w_fp, mask_u_w, conf_u_w)
        )
        loss = (loss_x + cfg.method.unsup_weight * loss_u) / 2
        loss_sam_agree = cfg.sam.agreement_weight * agreement
        return {
            "loss": loss + loss_sam_x + loss_sam_agree,
            "loss_x": loss_x,
            "loss_sam_x": loss_sam_x,
            "loss_sam_agree": loss_sam_agree,
        }


# ---- measurement -----------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _release_free_heap() -> None:
    """Hand freed heap back to the OS (glibc keeps it), so an earlier case's peak does not hide the
    next case's rise in RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Peak host RSS rise while the block runs (a sampling thread; ru_maxrss delta without /proc)."""

    def __enter__(self):
        _release_free_heap()
        self.start = _rss_bytes()
        self.start_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak = self.start or 0
        self._stop = threading.Event()
        if self.start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes() or 0)

    def __exit__(self, *exc):
        self._stop.set()
        if self.start is not None:
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() or 0)
            self.delta_mib = (self.peak - self.start) / 2**20
        else:  # ru_maxrss is KiB on Linux and only grows: later cases may show ~0
            self.delta_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start_maxrss) / 1024
        return False


class PassCounter:
    """Counts forward calls of SAM's image encoder and mask decoder, and the prompts decoded (hooks)."""

    def __init__(self, sam):
        self.encoder = self.decoder = self.prompts = 0
        self._hooks = [
            sam.image_encoder.register_forward_hook(lambda *a: self._add("encoder")),
            # Called once per decode by every path (outside a compiled decoder, where hooks stay silent).
            sam.prompt_encoder.register_forward_hook(self._decoded),
        ]

    def _add(self, name):
        setattr(self, name, getattr(self, name) + 1)

    def _decoded(self, module, args, output):
        self.decoder += 1
        self.prompts += output[0].shape[0]  # sparse embeddings (prompts, tokens, 256)

    def remove(self):
        for h in self._hooks:
            h.remove()


def sampling_seconds(trainer: Trainer, steps: int) -> float:
    """Seconds ``steps`` steps' batch draws take on their own (``SliceSet.sample``, as ``Trainer.step``
    calls it, synchronised on CUDA). Timed apart from the steps: a synchronisation inside a timed step
    would stop the host from running ahead of the GPU."""
    sets = [s for s in (trainer.data.labeled, trainer.data.unlabeled) if s is not None]
    batch = trainer.cfg.schedule.batch_size
    return synced_seconds(
        lambda: [s.sample(batch, trainer.generator, trainer.device) for _ in range(steps) for s in sets],
        trainer.device,
    )


def make_config(
    method: str,
    size: int,
    batch: int,
    device: str,
    amp: str = "fp32",
    encoder_trainable: bool = False,
    settings: dict | None = None,
) -> TrainConfig:
    """The benchmark's config; ``settings`` are further overrides shared by every case (the command
    line's ``schedule.channels_last``, ``schedule.compile``, ``sam.checkpoint``, ...)."""
    return apply_overrides(
        TrainConfig(),
        {
            "data.format": "phantom-cardiac",
            "data.root": "0",
            "data.size": size,
            "data.max_val_cases": 1,
            "method.name": method,
            "sam.enclosed": "2>3",
            # encoder_trainable: LoRA in the image encoder too, so no embedding cache is possible.
            "sam.lora_targets": "encoder+decoder" if encoder_trainable else "decoder",
            "sam.cache_embeddings": not encoder_trainable,
            "schedule.batch_size": batch,
            "schedule.iterations": 100_000,
            "schedule.amp": amp,
            "device": device,
            **(settings or {}),
        },
    )


def make_data(cfg: TrainConfig, pool: int) -> TrainData:
    """Phantom slices, each set cut to ``pool`` slices (SAM-Match embeds every slice once)."""
    data = build_train_data(cfg)

    def cut(s: SliceSet) -> SliceSet:
        return SliceSet(s.images[:pool], None if s.labels is None else s.labels[:pool], s.patient_ids[:pool])

    return TrainData(cut(data.labeled), cut(data.unlabeled), [], data.num_classes, data.class_names)


def time_steps(trainer: Trainer, steps: int, warmup: int) -> dict:
    dev = trainer.device
    cuda = dev.type == "cuda"
    guide = getattr(trainer.method, "guide", None)
    for _ in range(warmup):
        trainer.step()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    counter = PassCounter(guide.sam) if guide is not None else None
    times = []
    try:
        with RssPeak() as rss:
            for _ in range(steps):
                times.append(synced_seconds(trainer.step, dev) * 1e3)
    finally:
        if counter is not None:
            counter.remove()
    # The same number of steps back to back, synchronised once: the host may queue step i + 1 while
    # the GPU still runs step i, as in training (the engine reads losses back every schedule.log_every steps).
    pipelined = synced_seconds(lambda: [trainer.step() for _ in range(steps)], dev) * 1e3 / steps
    cost = step_cost(trainer)  # one more step, under FLOP and byte counters
    syncs = host_syncs(trainer)  # and one more on CUDA, counting the host's waits for the device
    return {
        **cost,
        "ms_median": statistics.median(times),
        # Batches come from slices held in memory (a gather and a copy to the device): per step.
        "sample_ms_per_step": sampling_seconds(trainer, steps) * 1e3 / steps,
        "ms_all": [round(t, 3) for t in times],
        "ms_pipelined": pipelined,
        "peak_device_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None,
        "peak_rss_delta_mib": round(rss.delta_mib, 1),
        "encoder_passes_per_step": counter.encoder / steps if counter else 0.0,
        "decoder_passes_per_step": counter.decoder / steps if counter else 0.0,
        **syncs,
    }


def host_syncs(trainer: Trainer) -> dict:
    """One more step with ``torch.cuda.set_sync_debug_mode("warn")``: how many operations made the
    host wait for the GPU (``.item()``, nonzero, a device-to-host copy), and where (file:line, counted).
    Empty on CPU, where there is nothing to wait for."""
    if trainer.device.type != "cuda":
        return {}
    with eager(trainer), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"host_syncs_per_step": sum(where.values()), "host_sync_sites": dict(where.most_common(12))}


NOT_RECORDED = "not recordable as a CUDA graph"
SAMATCH = Path(samatch.__file__).resolve().parent


def why(err: BaseException) -> str:
    """One line per exception, outermost first, then the one it was raised while handling (a broken
    capture: the capture's end, then the operator that broke it), each with its deepest frame in the
    project's ``samatch`` package."""
    parts = []
    while err is not None and len(parts) < 3:
        tb = traceback.extract_tb(err.__traceback__)
        frames = [f for f in tb if Path(f.filename).resolve().is_relative_to(SAMATCH)]
        where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        parts.append(f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}{where}")
        err = err.__context__
    return " <- ".join(parts)


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _joint_trainer(cfg: TrainConfig, pool: int, log) -> Trainer:
    t0 = time.perf_counter()
    trainer = Trainer(cfg, make_data(cfg, pool))  # builds the embedding cache when it may
    log(f"  {cfg.device}: SAM-Match set-up ({cfg.sam.lora_targets} LoRA): {time.perf_counter() - t0:.1f} s")
    # Past warm-up: the joint stage (Trainer.step copies trainer.iteration to method.iteration).
    trainer.iteration = trainer.method.joint_start()
    return trainer


def bench_device(
    device: str,
    size: int,
    batches: list[int],
    steps: int,
    warmup: int,
    pool: int,
    log,
    rows: list,
    amps: tuple[str, ...] = ("fp32",),
    encoder_trainable: bool = False,
    profile: bool = False,
    settings: dict | None = None,
) -> dict | None:
    """Appends a row for every (precision, batch, mode) to ``rows`` as each case finishes (so a crash
    keeps them); returns a profile of the first joint case if asked."""
    prof = None

    def record(mode, batch, amp, trainer):
        """Time one case; a case that does not fit in device memory is recorded as such, not fatal. A
        step that cannot be recorded as a CUDA graph (only a GPU tells) is a row saying why, and the
        case is timed again eagerly, as are the trainer's later cases: rows marked ``fallback``, eager
        steps of a trainer set up for recording (capturable AdamW, the learning rate and the
        augmentations' generator on the GPU)."""
        graphed = getattr(trainer, "graph", None) is not None
        try:
            r = time_steps(trainer, steps, warmup)
        except torch.OutOfMemoryError as err:
            r = {"ms_median": None, "error": f"out of memory: {str(err).splitlines()[0]}"}
        except CaptureFailed as err:  # the recording itself, not the warm-up steps or the counters
            r = {"ms_median": None, "error": f"{NOT_RECORDED}: {why(err.__cause__ or err)}"}
            trainer.graph = None
        if r["ms_median"] is None:  # after the except block: its traceback no longer holds the step
            trainer.method.discard_step_state()
            try:
                _free(device)
            except RuntimeError as err:  # a torch that still counts the broken capture as underway
                log(f"  could not empty the CUDA cache: {str(err).splitlines()[0]}")
        row = {"device": device, "batch": batch, "mode": mode, "amp": amp, "cuda_graph": graphed}
        if not graphed and mode != "reference" and trainer.cfg.schedule.cuda_graph:  # recording failed
            row["fallback"] = True
        rows.append({**row, **r})
        ms = r["error"] if r["ms_median"] is None else f"{r['ms_median']:10.1f} ms/step"
        label = mode + (" graph" if graphed else " fallback" if row.get("fallback") else "")
        log(f"  {device} batch {batch:>2} {amp} {label:<18} {ms}")
        if graphed and trainer.graph is None:  # its recording failed: the same case, eagerly
            record(mode, batch, amp, trainer)

    for amp in amps:

        def conf(method: str, encoder_trainable: bool = False, amp: str = amp) -> TrainConfig:
            return make_config(method, size, batches[0], device, amp, encoder_trainable, settings)

        # UniMatch first, then dropped, so its memory does not count in the SAM-Match cases.
        cfg = conf("unimatch")
        trainer = Trainer(cfg, make_data(cfg, pool))
        for b in batches:
            cfg.schedule.batch_size = b
            record("unimatch", b, amp, trainer)
        del trainer
        _free(device)

        cfg = conf("samatch")
        trainer = _joint_trainer(cfg, pool, log)
        method = trainer.method
        assert isinstance(method, SamMatch)
        for b in batches:
            cfg.schedule.batch_size = b
            method.iteration = trainer.iteration
            assert method.joint()
            record("joint", b, amp, trainer)
            if profile and prof is None:
                try:
                    prof = profile_steps(trainer, steps=3)
                except Exception as err:  # a profiler problem must not cost the timings
                    prof = {"error": f"{type(err).__name__}: {err}"}
            if amp != "fp32":
                continue  # the reference's cost structure is timed once, in fp32
            method.__class__ = ReferenceSamMatch
            method.guide.sam.folded = False  # segment_anything's decoder as written
            try:
                with eager(trainer):  # its host syncs could not be recorded
                    record("reference", b, amp, trainer)
            finally:
                method.__class__ = SamMatch
                method.guide.sam.folded = True
        del trainer, method
        _free(device)

        if encoder_trainable:  # LoRA in the encoder: no cache, one encoder pass per image per step
            cfg = conf("samatch", encoder_trainable=True)
            trainer = _joint_trainer(cfg, pool, log)
            for b in batches:
                cfg.schedule.batch_size = b
                record("joint_enc", b, amp, trainer)
            del trainer
            _free(device)
    return prof


def profile_steps(trainer: Trainer, steps: int = 3, top: int = 25) -> dict:
    """torch.profiler over a few steps: the ``top`` operators by self time on the step's device.

    On CUDA also ``device_busy_ms_per_step``: the summed time of the GPU's kernels and copies (one
    stream, so they do not overlap). Far below the step's wall time, the GPU waits for the host.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as p:
        for _ in range(steps):
            trainer.step()
        if cuda:
            torch.cuda.synchronize(trainer.device)
    events = p.key_averages()
    key = "self_cpu_time_total"
    if cuda:  # renamed "device" in newer torch; the old "cuda" name is kept as an alias for a while
        key = (
            "self_device_time_total"
            if hasattr(events[0], "self_device_time_total")
            else "self_cuda_time_total"
        )
    table = events.table(sort_by=key, row_limit=top)
    ops = [
        {"op": e.key, "calls": e.count, "self_ms_per_step": getattr(e, key) / 1e3 / steps}
        for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    ]
    out = {"steps": steps, "sort_by": key, "ops": ops, "table": table}
    if cuda:
        busy = sum(getattr(e, key) for e in events if e.device_type == DeviceType.CUDA)
        out["device_busy_ms_per_step"] = busy / 1e3 / steps
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """joint / UniMatch at the same precision, both replayed as CUDA graphs or both eager; the fp32
    reference (always eager) / joint at each precision."""
    out = []
    by = {
        (r["device"], r["batch"], r["amp"], r["mode"], r.get("cuda_graph", False)): r["ms_median"]
        for r in rows
    }

    def over(a, b):  # None where either case is missing or did not fit
        return None if a is None or b is None else a / b

    ours = [r for r in rows if r["mode"] != "reference"]
    for dev, b, amp, g in dict.fromkeys(
        (r["device"], r["batch"], r["amp"], r.get("cuda_graph", False)) for r in ours
    ):
        joint = by.get((dev, b, amp, "joint", g))
        out.append(
            {
                "device": dev,
                "batch": b,
                "amp": amp,
                "cuda_graph": g,
                "joint_over_unimatch": over(joint, by.get((dev, b, amp, "unimatch", g))),
                "reference_over_ours": over(by.get((dev, b, "fp32", "reference", False)), joint),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CPU, and CUDA too"
    )
    parser.add_argument("--batch", default=None, help='comma-separated batch sizes (default "4,12")')
    parser.add_argument("--size", type=int, default=None, help="network input size (default 256)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CPU, 20 on CUDA)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 2 CPU, 5 CUDA)"
    )
    parser.add_argument("--pool", type=int, default=4, help="slices per labeled / unlabeled set")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny run for tests: size 64, batch 2, 2 steps")
    parser.add_argument("--amp", default="fp32", help="comma-separated precisions: fp32, bf16 (default fp32)")
    parser.add_argument("--channels-last", action="store_true", help="U-Net in channels-last memory format")
    parser.add_argument(
        "--encoder-trainable",
        action="store_true",
        help="also time SAM-Match with LoRA in the encoder (no cache)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile 3 joint steps (first precision, batch)"
    )
    parser.add_argument(
        "--sam-checkpoint", default="", help="LiteMedSAM weights (default: the packaged file)"
    )
    parser.add_argument(
        "--keep-host-memory",
        action="store_true",
        help="schedule.keep_host_memory: the CPU heap keeps freed memory (samatch.hostmem)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="schedule.compile: torch.compile the U-Net and SAM's folded decoder (warm-up pays the compile)",
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="schedule.compile_mode with --compile (reduce-overhead: CUDA graphs on a GPU)",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="schedule.cuda_graph: each step replayed as one recorded CUDA graph (the reference eagerly)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_step.json"))
    allocator.add_allocator_argument(parser)
    args = parser.parse_args(argv)
    allocator.relaunch(args.allocator, argv, parser)  # from the command line: start again on it
    amps = tuple(a.strip() for a in args.amp.split(",") if a.strip())
    if not amps or any(a not in ("fp32", "bf16") for a in amps):
        raise SystemExit(f"--amp: expected fp32 and/or bf16, got {args.amp!r}")
    if args.quick:
        args.size = args.size or 64
        args.batch = args.batch or "2"
        args.steps = args.steps or 2
        args.warmup = 0 if args.warmup is None else args.warmup
    size = args.size or 256
    settings = {
        "sam.checkpoint": args.sam_checkpoint,
        "schedule.channels_last": args.channels_last,
        "schedule.keep_host_memory": args.keep_host_memory,
        "schedule.compile": args.compile,
        "schedule.compile_mode": args.compile_mode,
        "schedule.cuda_graph": args.cuda_graph,
    }
    batches = [int(b) for b in (args.batch or "4,12").split(",") if b.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "auto" and torch.cuda.is_available():
        devices.append("cuda")
    result = provenance("train_step", __file__, args, argv) | {
        "size": size,
        "batches": batches,
        "results": [],
    }
    result["settings"]["overrides"] = settings
    t_start = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2)

    def save() -> None:  # after every device, and on a crash (a GPU session keeps what finished)
        result["ratios"] = ratios(result["results"])
        result["seconds_total"] = round(time.perf_counter() - t_start, 1)
        # Other processes on the machine skew CPU timings: the 1-min load average before and after.
        result["load_average_1min"] = [load_before, round(os.getloadavg()[0], 2)]
        write_json(args.out, result)

    try:
        for dev in devices:
            steps = args.steps or (20 if dev == "cuda" else 5)
            warmup = args.warmup if args.warmup is not None else (5 if dev == "cuda" else 2)
            pool = max(1, min(args.pool, max(batches)))
            result["settings"][dev] = {"steps": steps, "warmup": warmup, "pool": pool}
            print(f"{dev}: size {size}, batches {batches}, {warmup} warm-up + {steps} timed", flush=True)
            rows: list[dict] = []
            try:
                prof = bench_device(
                    dev,
                    size,
                    batches,
                    steps,
                    warmup,
                    pool,
                    lambda s: print(s, flush=True),
                    rows,
                    amps=amps,
                    encoder_trainable=args.encoder_trainable,
                    profile=args.profile,
                    settings=settings,
                )
            finally:
                result["results"] += rows
            rates = result.setdefault("device_rates", {})[dev] = device_rates(dev)
            for r in rows:
                if r["ms_median"] is not None:
                    r["floor_ms"] = floor_ms(r, rates, r["amp"])
            if prof is not None:
                result.setdefault("profile", {})[dev] = prof
                print(prof.get("table", prof.get("error")), flush=True)
                if "device_busy_ms_per_step" in prof:
                    print(f"GPU busy {prof['device_busy_ms_per_step']:.1f} ms per profiled step", flush=True)
            save()
    except BaseException:
        result["incomplete"] = True
        save()
        print(f"stopped early; the finished cases are in {args.out}", file=sys.stderr)
        raise
    print(format_table(result))
    return 0


def format_table(result: dict) -> str:
    hdr = (
        "| device | batch | precision | mode | ms / step | pipelined | peak device MiB | peak RSS rise MiB "
        "| SAM enc / dec passes | GFLOP | GB touched | ops | floor ms | batch sampling ms | host syncs |"
    )
    lines = [hdr, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        mode = r["mode"] + (" (graph)" if r.get("cuda_graph") else " (fallback)" if r.get("fallback") else "")
        if r["ms_median"] is None:
            lines.append(f"| {r['device']} | {r['batch']} | {r['amp']} | {mode} | {r['error']} |")
            continue
        mem = "-" if r["peak_device_mib"] is None else f"{r['peak_device_mib']:.0f}"
        lines.append(
            f"| {r['device']} | {r['batch']} | {r['amp']} | {mode} | {r['ms_median']:.1f} | "
            f"{r['ms_pipelined']:.1f} | {mem} | "
            f"{r['peak_rss_delta_mib']:.0f} | "
            f"{r['encoder_passes_per_step']:g} / {r['decoder_passes_per_step']:g} | "
            f"{r['gflop']:.1f} | {r['gbytes']:.1f} | {r.get('ops', '-')} | "
            f"{r.get('floor_ms', float('nan')):.0f} | "
            f"{r['sample_ms_per_step']:.2f} | {r.get('host_syncs_per_step', '-')} |"
        )
    lines += [
        "",
        "| device | batch | precision | joint / UniMatch | fp32 reference / ours |",
        "|---|---|---|---|---|",
    ]
    for q in result["ratios"]:
        ref, own = (
            "-" if q[k] is None else f"{q[k]:.2f}" for k in ("reference_over_ours", "joint_over_unimatch")
        )
        amp = q["amp"] + (" (graph)" if q.get("cuda_graph") else "")
        lines.append(f"| {q['device']} | {q['batch']} | {amp} | {own} | {ref} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
