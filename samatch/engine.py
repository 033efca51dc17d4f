"""The training loop: ``Trainer(cfg, data).run()``, shared by the CLI and the federated client.

One iteration = one labeled batch (+ one unlabeled batch) -> ``method.train_step`` -> SGD with a
poly learning rate. The run stops exactly at ``schedule.iterations``; checkpoints hold everything
needed to resume bit-for-bit on the same device (networks, optimizer, iteration, RNG states).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from samatch.config import CUDA_GRAPH_MODES, TrainConfig
from samatch.data import TrainData
from samatch.evaluate import evaluate_cases, summarize_dice
from samatch.hardware import cpu_matmul_gflops
from samatch.hostmem import keep_freed_host_memory
from samatch.methods import METHODS, Method, build_method
from samatch.methods.base import fused_optimizer
from samatch.models.unet import batchnorm_state_keys, build_unet
from samatch.step_graph import CudaGraphs, StepGraph
from samatch.transfer import to_device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: U-Net / SAM do not need full fp32
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def poly_lr(base: float, it: int, total: int, power: float) -> float:
    """Poly decay; never negative, also if called past the end."""
    return base * max(0.0, 1.0 - it / total) ** power


def slow_bf16(cfg: TrainConfig, device: torch.device) -> str | None:
    """Why ``cfg`` asks for bf16 where it is likely slower than fp32 (a CPU whose bf16 matrix products,
    measured, are slower than its fp32 ones), or None: ``schedule.amp``, and ``sam.amp`` for the
    method that has SAM."""
    asked = [
        ("schedule.amp", cfg.schedule.amp),
        ("sam.amp", cfg.sam.amp if cfg.method.name == "samatch" else ""),
    ]
    bf16 = [key for key, value in asked if value == "bf16"]
    if device.type != "cpu" or not bf16:
        return None
    rates = cpu_matmul_gflops()
    if rates["bf16"] >= rates["fp32"]:
        return None
    return (
        f"{' and '.join(bf16)}=bf16 on a CPU whose bf16 matrix products are slower than fp32 ones "
        f"(measured {rates['bf16']:.0f} against {rates['fp32']:.0f} GFLOP/s): fp32 is likely faster here"
    )


class Trainer:
    """``graph_backend``: how ``schedule.cuda_graph`` records the step (:mod:`samatch.step_graph`),
    called with the generators the step draws from; the tests pass a CPU stand-in."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: TrainData,
        out_dir: str | Path | None = None,
        graph_backend=CudaGraphs,
        **method_extra,
    ):
        if cfg.model.num_classes == 0:  # "from the dataset"
            cfg.model.num_classes = data.num_classes
        self.cfg = cfg
        self.data = data
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu" and cfg.schedule.keep_host_memory:
            keep_freed_host_memory()  # process-wide (samatch.hostmem)
        if (why := slow_bf16(cfg, self.device)) is not None:
            warnings.warn(why, stacklevel=2)
        self.out = Path(out_dir) if out_dir else None
        seed_everything(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # batches (and augmentations, eager)
        self.augment_generator = self.generator
        if cfg.schedule.cuda_graph:
            if graph_backend is CudaGraphs and self.device.type != "cuda":
                raise ValueError(f"schedule.cuda_graph needs a CUDA device, got {self.device}")
            # On the device: a recorded step cannot take numbers from the host at each replay.
            self.augment_generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        if METHODS.get(cfg.method.name, Method).uses_unlabeled and data.unlabeled is None:
            raise ValueError(f"method {cfg.method.name!r} needs unlabeled data, and the split has none")
        self.model = build_unet(cfg).to(self.device)
        if cfg.schedule.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.schedule.compile:
            # in place: parameter names (checkpoints) unchanged
            self.model.compile(mode=cfg.schedule.compile_mode)
        self.method = build_method(
            cfg, self.model, self.augment_generator, data=data, device=self.device, **method_extra
        )
        self.method.to(self.device)
        s = cfg.schedule
        self.optimizer = torch.optim.SGD(
            self.method.param_groups(s.lr),
            lr=s.lr,
            momentum=s.momentum,
            weight_decay=s.weight_decay,
            **fused_optimizer(self.device),
        )
        # Methods with extra trainable parts (SAM-Match's LoRA) bring their own optimizers.
        self.optimizers = [self.optimizer, *self.method.extra_optimizers()]
        self.graph = None
        if s.cuda_graph:
            generators = [self.augment_generator, *self.method.generators().values()]
            self.graph = StepGraph(self._update, graph_backend(generators))
        self.iteration = 0
        self.best = {"dice": -1.0, "iteration": 0}
        self.history: list[dict] = []
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        s = self.cfg.schedule
        lr = poly_lr(s.lr, self.iteration, s.iterations, s.poly_power)
        self._set_lr(lr)
        if s.compile and s.compile_mode in CUDA_GRAPH_MODES:
            # A new step: the CUDA graphs may reuse the memory of the last step's graph outputs.
            torch.compiler.cudagraph_mark_step_begin()
        batch = self._batch()
        self.method.train()
        self.method.iteration = self.iteration
        if self.graph is None:
            losses = self._update(batch)
        else:  # one recording per stage: its Python control flow differs
            losses = self.graph(batch, key=self.method.stage())
        self.iteration += 1
        return {"lr": lr, **{k: v.detach() for k, v in losses.items()}}

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            value = lr * group.get("lr_scale", 1.0)
            current = group["lr"]
            if isinstance(current, torch.Tensor) and current.device == self.device:
                current.fill_(value)  # in place: a recorded update reads this tensor
            elif self.graph is not None:
                # A float, or a host tensor (as a checkpoint loads it), would be read once by the
                # recording and frozen into it.
                group["lr"] = torch.tensor(value, device=self.device)
            else:
                group["lr"] = value

    def _batch(self) -> dict[str, torch.Tensor | None]:
        """The next labeled (and unlabeled) batch, on the device; indices into the slice sets."""
        s = self.cfg.schedule
        img_x, mask_x, idx_x = self.data.labeled.sample(s.batch_size, self.generator, self.device)
        img_u = idx_u = None
        if self.method.uses_unlabeled and self.data.unlabeled is not None:
            img_u, _, idx_u = self.data.unlabeled.sample(s.batch_size, self.generator, self.device)
        if s.channels_last:
            img_x = img_x.contiguous(memory_format=torch.channels_last)
            img_u = None if img_u is None else img_u.contiguous(memory_format=torch.channels_last)
        if self.graph is not None:  # a recorded step looks them up on the device
            idx_x = to_device(idx_x, self.device)
            idx_u = None if idx_u is None else to_device(idx_u, self.device)
        return {"img_x": img_x, "mask_x": mask_x, "img_u": img_u, "idx_x": idx_x, "idx_u": idx_u}

    def _update(self, batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """The method's losses on ``batch``, backward, every optimizer's update; returns the losses."""
        s = self.cfg.schedule
        # bf16 autocast: matmuls / convolutions in bf16, softmax and losses in fp32 (autocast's lists);
        # no gradient scaler needed (bf16 has fp32's exponent range). Backward runs outside. A recorded
        # step must not keep autocast's cast weights from one call to the next.
        amp = {"dtype": torch.bfloat16, "enabled": s.amp == "bf16", "cache_enabled": self.graph is None}
        with torch.autocast(self.device.type, **amp):
            losses = self.method.train_step(
                batch["img_x"], batch["mask_x"], batch["img_u"], idx_x=batch["idx_x"], idx_u=batch["idx_u"]
            )
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        for opt in self.optimizers:
            opt.step()
        return losses

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, until: int | None = None, progress: bool = True) -> dict:
        """Train up to iteration ``until`` (default: the schedule's end), evaluating and saving."""
        s = self.cfg.schedule
        until = min(until or s.iterations, s.iterations)
        writer = self._tensorboard()
        bar = tqdm(total=until, initial=self.iteration, desc=self.cfg.method.name, disable=not progress)
        t0 = self._t_run0 = time.perf_counter()
        t_probe = t0
        # Time budget: time steps 10..30 (the first ones pay for CUDA / cuDNN start-up), and again
        # whenever the method enters a stage whose steps cost differently (SAM-Match's joint stage).
        probe_start, probe_end = (self.iteration + 10, self.iteration + 30) if s.minutes > 0 else (-1, -1)
        self.method.iteration = self.iteration
        stage = self.method.stage()
        while self.iteration < until:
            logs = self.step()
            bar.update(1)
            self.method.iteration = self.iteration
            if s.minutes > 0 and self.method.stage() != stage:
                stage = self.method.stage()
                probe_start, probe_end = self.iteration + 10, self.iteration + 30
            if self.iteration == probe_start:
                self._sync()
                t_probe = time.perf_counter()
            if self.iteration == probe_end:
                self._sync()
                until = self._fit_time_budget(time.perf_counter() - t_probe, 20, until)
                bar.total = until
            if self.iteration % s.log_every == 0 or self.iteration == until:
                row = {"iteration": self.iteration, **{k: float(v) for k, v in logs.items()}}
                row["seconds"] = time.perf_counter() - t0
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                self._log(row, writer)
            if self.iteration % s.eval_every == 0 or self.iteration == s.iterations:
                if self.data.val:
                    self.validate(writer)
                if self.out:
                    self.save(self.out / "last.pt")
        bar.close()
        if writer:
            writer.close()
        if self.out and self.iteration % s.eval_every:
            self.save(self.out / "last.pt")
        return {"iteration": self.iteration, "best": self.best}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _fit_time_budget(self, seconds: float, steps: int, until: int) -> int:
        """After a timed probe, cut schedule.iterations so the run fits ``schedule.minutes``.

        The wall time counts from the start of ``run``; the poly schedule then decays over the new
        length, and config.json records it. Staged methods whose later steps cost more (SAM-Match's
        joint stage) can overrun: give them their own budget.
        """
        s = self.cfg.schedule
        spent = time.perf_counter() - self._t_run0
        left = s.minutes * 60 * 0.9 - spent  # 10% kept for validation and saving
        fit = self.iteration + int(max(0.0, left) / (seconds / steps))
        new_total = max(self.iteration + 1, min(s.iterations, fit))
        if new_total < s.iterations:
            tqdm.write(
                f"[{self.cfg.method.name}] {seconds / steps:.3f} s/it: {new_total} iterations "
                f"fit {s.minutes} min (schedule asked {s.iterations})"
            )
            s.iterations = new_total
            if self.out:
                self.cfg.save(self.out / "config.json")
        return min(until, s.iterations)

    def validate(self, writer=None) -> dict:
        rows = evaluate_cases(
            self.model, self.data.val, self.data.num_classes, self.cfg.data.size, self.device, distances=False
        )
        summary = summarize_dice(rows, self.data.class_names)
        entry = {"iteration": self.iteration, **summary}
        self.history.append(entry)
        if writer:
            for k, v in summary.items():
                writer.add_scalar(f"val/{k}", v, self.iteration)
        if summary["dice_mean"] > self.best["dice"]:
            self.best = {"dice": summary["dice_mean"], "iteration": self.iteration}
            if self.out:
                self.save(self.out / "best.pt")
        if self.out:
            (self.out / "val_history.json").write_text(json.dumps(self.history, indent=1))
        tqdm.write(
            f"[{self.cfg.method.name}] it {self.iteration}: val Dice {summary['dice_mean']:.4f} "
            + " ".join(
                f"{k[5:]}={v:.3f}" for k, v in summary.items() if k.startswith("dice_") and k != "dice_mean"
            )
        )
        return summary

    # ---- logging ------------------------------------------------------------------------------
    def _tensorboard(self):
        if not self.out:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a declared dependency; degrade rather than crash
            return None
        return SummaryWriter(str(self.out / "tb"))

    def _log(self, row: dict, writer) -> None:
        if writer:
            for k, v in row.items():
                if k != "iteration" and math.isfinite(v):
                    writer.add_scalar(f"train/{k}", v, row["iteration"])
        if not self.out:
            return
        path = self.out / "metrics.csv"
        rows = []
        if path.exists():
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        fields = list(rows[0]) if rows else []
        if set(row) - set(fields):  # a loss that appears later (a stage change): widen the table
            fields += [k for k in row if k not in fields]
            rows.append(row)
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields, restval="")
                w.writeheader()
                w.writerows(rows)
            return
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields, restval="").writerow(row)

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {
            "torch": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rng["method"] = {k: g.get_state().cpu() for k, g in self.method.generators().items()}
        if self.augment_generator is not self.generator:
            rng["augment"] = self.augment_generator.get_state().cpu()
        return {
            "config": self.cfg.to_dict(),
            "method": self.method.checkpoint_state(),
            "optimizer": self.optimizer.state_dict(),
            "extra_optimizers": [o.state_dict() for o in self.optimizers[1:]],
            "iteration": self.iteration,
            "best": self.best,
            "history": self.history,
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.method.load_checkpoint_state(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        for opt, sd in zip(self.optimizers[1:], state.get("extra_optimizers", []), strict=True):
            opt.load_state_dict(sd)
        self.iteration = int(state["iteration"])
        self.best = state["best"]
        self.history = state.get("history", [])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        for k, g in self.method.generators().items():
            g.set_state(rng["method"][k])
        if "augment" in rng and self.augment_generator is not self.generator:
            self.augment_generator.set_state(rng["augment"])
        if self.graph is not None:
            self.graph.reset()  # the optimizers' state tensors were replaced
        for opt in self.optimizers[1:]:  # a checkpoint of an unrecorded run says capturable=False
            for group in opt.param_groups:
                if "capturable" in group:
                    group["capturable"] = self.cfg.schedule.cuda_graph

    def save(self, path: str | Path) -> None:
        tmp = Path(str(path) + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)  # atomic: a crash mid-save never leaves a truncated checkpoint

    def resume(self, path: str | Path) -> None:
        # CPU first: RNG states must stay CPU byte tensors; parameters and optimizer moments are
        # copied / cast onto the training device by load_state_dict.
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))


def load_run_model(run_dir: str | Path, checkpoint: str = "best", device: str = "auto"):
    """(cfg, U-Net in eval mode) from a run folder's ``config.json`` and ``<checkpoint>.pt``."""
    run_dir = Path(run_dir)
    for need in ("config.json", f"{checkpoint}.pt"):
        if not (run_dir / need).is_file():
            raise FileNotFoundError(f"{run_dir / need}: not found (is this a run folder?)")
    cfg = TrainConfig.load(run_dir / "config.json")
    dev = resolve_device(device)
    path = run_dir / f"{checkpoint}.pt"
    state = torch.load(path, map_location=dev, weights_only=False)
    prefix = "model."
    own = {k[len(prefix) :]: v for k, v in state["method"].items() if k.startswith(prefix)}
    if not own and any(k.startswith("task.") for k in state["method"]):
        raise ValueError(f"{path}: a cross-task run's global state: each task's U-Net is in tasks/<task>/")
    model = build_unet(cfg).to(dev)
    missing = model.state_dict().keys() - own.keys()
    absent = sorted(missing - batchnorm_state_keys(model))  # FedBN keeps only BatchNorm on the sites
    if absent:
        raise ValueError(f"{path}: no U-Net tensor {absent[0]} ({len(absent)} missing)")
    if missing:  # a FedBN run's global model
        print(
            f"note: {path} has no BatchNorm tensors (FedBN keeps them on the sites): the U-Net uses its"
            " initial BatchNorm parameters and statistics",
            file=sys.stderr,
        )
        own = model.state_dict() | own
    model.load_state_dict(own)
    model.eval()
    return cfg, model, dev


def load_run_guide(run_dir: str | Path, cfg: TrainConfig, checkpoint: str, device, adapted: bool = True):
    """The SAM guide of a run: cfg.sam's backbone with the run's LoRA adapters when it trained them
    (method samatch) and ``adapted``, else with zero-initialised adapters (= the pretrained SAM).

    Returns (SamGuidance in eval mode, whether adapters were loaded). Its decoder runs in the
    evaluation's precision (fp32), whatever ``sam.amp`` the run trained with, as ``schedule.amp``
    concerns training only.
    """
    from samatch.methods.sam_guided import SamGuidance
    from samatch.models.lora import load_lora_state_dict, lora_state_dict

    path = Path(run_dir) / f"{checkpoint}.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    lora = {k[len("sam_lora.") :]: v for k, v in state["method"].items() if k.startswith("sam_lora.")}
    cfg = dataclasses.replace(cfg, sam=dataclasses.replace(cfg.sam, amp="step"))
    guide = SamGuidance(cfg, cfg.model.num_classes)
    if lora and adapted:
        if cfg.sam.lora_freeze_a and not any(".lora_A." in k for k in lora):
            # FFA-LoRA: the A matrices are drawn from the run's seed and never sent (a federated
            # checkpoint); this guide drew the same ones.
            print(
                f"note: {path} has no LoRA A (FFA-LoRA): using the ones drawn from seed {cfg.seed}",
                file=sys.stderr,
            )
            lora = lora_state_dict(guide.sam) | lora
        load_lora_state_dict(guide.sam, lora)
    return guide.to(device).eval(), bool(lora and adapted)


def load_run_cascade(run_dir: str | Path, cfg: TrainConfig, checkpoint: str, device, threshold: float):
    """A callable for :func:`samatch.evaluate.predict_volume`'s ``cascade`` (see load_run_guide)."""
    guide, _ = load_run_guide(run_dir, cfg, checkpoint, device)
    return lambda images, logits: guide.cascade(images, logits, threshold)
