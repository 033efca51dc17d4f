"""The method registry and the interface every method implements."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn as nn


class Registry(Mapping):
    """Method name -> class. Names in ``lazy`` are listed at once but their module is imported on
    first lookup: SAM-Match pulls peft and transformers (about 4 s), which a UniMatch site, a CLI
    listing or a ClientApp process answering an evaluation should not pay for."""

    def __init__(self, lazy: Mapping[str, str]):
        self._classes: dict[str, type] = {}
        self._lazy = dict(lazy)

    def add(self, name: str, cls: type) -> None:
        if name in self._classes:
            raise ValueError(f"method {name!r} registered twice")
        self._classes[name] = cls

    def __getitem__(self, name: str) -> type:
        if name not in self._classes and name in self._lazy:
            importlib.import_module(self._lazy[name])
        return self._classes[name]

    def __contains__(self, name: object) -> bool:  # no import just to answer "is it a method?"
        return name in self._classes or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._classes) | set(self._lazy)))

    def __len__(self) -> int:
        return len(set(self._classes) | set(self._lazy))


METHODS = Registry({"samatch": "samatch.methods.sam_guided"})


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS.add(name, cls)
        return cls

    return deco


class Method(nn.Module):
    """Owns the networks it trains; ``train_step`` computes the losses of one iteration.

    ``uses_unlabeled`` tells the engine whether to draw unlabeled batches at all.
    """

    name = "method"
    uses_unlabeled = True

    def __init__(self, cfg, model: nn.Module, generator: torch.Generator, **context):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.generator = generator
        self.iteration = 0  # set by the engine before each step (for staged methods)

    def train_step(
        self, img_x: torch.Tensor, mask_x: torch.Tensor, img_u: torch.Tensor | None, **batch_info
    ) -> dict[str, torch.Tensor]:
        """img_x (B,1,H,W), mask_x (B,H,W) long, img_u (B,1,H,W) or None -> {"loss": ..., ...}.

        ``batch_info`` carries ``idx_x`` / ``idx_u``, the batch's indices into the slice sets.
        """
        raise NotImplementedError

    def stage(self) -> str:
        """The training stage at ``self.iteration``; staged methods name theirs, so that a time
        budget re-times the steps when their cost changes."""
        return "train"

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def discard_step_state(self) -> None:
        """Drop what one part of a train step keeps for a later part (none here); a step that
        failed in between must not pass it on to the next."""

    def generators(self) -> dict[str, torch.Generator]:
        """Random generators of the method besides the engine's (saved for exact resume)."""
        return {}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of this method (U-Net tensors under ``model.``)."""
        return self.state_dict()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups; methods with extra trainable parts add theirs."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": lr}]


def fused_optimizer(device: torch.device | str) -> dict[str, bool]:
    """Optimizer keyword arguments for ``device``: torch's fused kernels where it has them.

    One kernel updates every tensor, where the default runs a loop per tensor on the CPU (562
    operators per AdamW step of SAM's 56 LoRA tensors) and, on CUDA, reads each tensor's step count
    with ``.item()`` (124 operators, 112 of them those reads); fused: 4 (docs/performance_log.md). The
    updates equal the default's to float rounding.
    """
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {}


def build_method(cfg, model: nn.Module, generator: torch.Generator, **extra) -> Method:
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name](cfg, model, generator, **extra)
