"""LoRA adapters on a SamGuide through peft, with a frozen base and adapter-only state.

Only the adapter tensors train and travel (STYLE item 4): `lora_state_dict` is what a client ships
and what the server averages. With `freeze_a=True` (FFA-LoRA) every A matrix is drawn from
`seed` and frozen, so all sites share A and averaging the B matrices is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

_ADAPTER = "default"

# Regexes over module names (peft full-matches a string target_modules).
_DECODER = r"mask_decoder\.transformer\..*\.(q_proj|k_proj|v_proj|out_proj)"
# TinyViT's `layers.N.blocks.M.attn.{qkv,proj}` and SAM ViT's `blocks.M.attn.{qkv,proj}` alike.
_ENCODER = r"image_encoder\..*\.attn\.(qkv|proj)"

LORA_TARGETS: dict[str, str] = {
    "decoder": _DECODER,
    "encoder+decoder": f"({_ENCODER})|({_DECODER})",
}


@dataclass
class LoraSettings:
    """LoRA hyper-parameters for the SAM guide (run config, `sam.lora.*`)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r of each adapted projection."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator: update = alpha / r * B A."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input, in [0, 1)."})
    targets: str = field(
        default="decoder", metadata={"help": f"Adapted layers, one of {sorted(LORA_TARGETS)}."}
    )
    freeze_a: bool = field(default=False, metadata={"help": "FFA-LoRA: A from `seed` and frozen, train B."})
    seed: int = field(default=0, metadata={"help": "Seed of the A matrices; equal on every site."})

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets not in LORA_TARGETS:
            raise ValueError(f"targets must be one of {sorted(LORA_TARGETS)}, got {self.targets!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def add_lora(sam: nn.Module, cfg: LoraSettings) -> nn.Module:
    """Inject LoRA into `sam` in place, freeze everything else, and return it.

    A matrices are re-drawn from `cfg.seed` (peft's own init uses the global RNG), so two
    processes with the same settings start from identical adapters; B starts at zero.
    """
    if _lora_layers(sam):
        raise ValueError("model already has LoRA layers")
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=LORA_TARGETS[cfg.targets],
        bias="none",
    )
    inject_adapter_in_model(config, sam, adapter_name=_ADAPTER)
    for p in sam.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        # named_modules order is fixed by the architecture, so the draws land on the same layers everywhere.
        for _, layer in _lora_layers(sam):
            a = layer.lora_A[_ADAPTER].weight  # (r, in_features)
            # peft's default: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = 1.0 / math.sqrt(a.shape[1])
            a.copy_(torch.rand(a.shape, generator=gen) * 2 * bound - bound)
            a.requires_grad_(not cfg.freeze_a)
            layer.lora_B[_ADAPTER].weight.requires_grad_(True)
    return sam


def lora_state_dict(sam: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only (lora_A / lora_B of every adapted layer), detached CPU copies."""
    sd = get_peft_model_state_dict(sam, adapter_name=_ADAPTER)
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def load_lora_state_dict(sam: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors strictly: the key set must equal `lora_state_dict(sam)`'s, shapes too."""
    expected = get_peft_model_state_dict(sam, adapter_name=_ADAPTER)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"LoRA state mismatch: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    bad = [k for k in sd if sd[k].shape != expected[k].shape]
    if bad:
        raise ValueError(
            f"LoRA shape mismatch for {bad[:5]}: e.g. {tuple(sd[bad[0]].shape)} "
            f"vs {tuple(expected[bad[0]].shape)}"
        )
    result = set_peft_model_state_dict(sam, sd, adapter_name=_ADAPTER)
    if result.unexpected_keys:
        raise KeyError(f"peft did not place LoRA keys {result.unexpected_keys[:5]}")


def save_lora(sam: nn.Module, path: str | Path) -> None:
    """Write the adapter tensors (only) to a safetensors file."""
    save_file({k: v.contiguous() for k, v in lora_state_dict(sam).items()}, str(path))


def load_lora(sam: nn.Module, path: str | Path) -> None:
    """Read a `save_lora` file into a SamGuide that already has the same adapters (strict)."""
    load_lora_state_dict(sam, load_file(str(path)))
