"""Typed configuration: one dataclass per concern, nested in :class:`TrainConfig`.

Overrides are dotted keys (``"method.threshold=0.9"``, ``"schedule.iterations": 200``), the same
form Flower's run config uses, so a TOML file, a CLI ``--set`` and a federation run config all go
through :func:`apply_overrides`. Unknown keys and wrong types are errors, not silent no-ops.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomllib


@dataclass
class DataConfig:
    root: str = ""  # dataset folder; empty = built-in phantoms
    format: str = ""  # acdc-h5 | acdc-nifti | busi | nifti | phantom-cardiac | phantom-lesion
    label_map: str = ""  # e.g. "chaos-liver" or "1=1"
    labeled: int = 3  # budget in the dataset's unit (patients, images, cases)
    size: int = 256  # network input size (square)
    seed: int = 0
    splits_file: str = ""  # reuse a splits JSON instead of making one
    max_unlabeled: int = 0  # 0 = all; >0 caps the unlabeled pool (CPU smoke runs)
    max_val_cases: int = 0  # 0 = all
    cache_dir: str = ""  # keep the prepared training slices in this site-local folder (reused)

    def __post_init__(self) -> None:
        if self.labeled < 1:
            raise ValueError(f"data.labeled must be >= 1, got {self.labeled}")
        if self.size < 32 or self.size % 16:
            raise ValueError(f"data.size must be a multiple of 16 and >= 32, got {self.size}")


@dataclass
class ModelConfig:
    in_channels: int = 1
    num_classes: int = 0  # 0 = from the dataset (set when the data is opened)
    base_channels: int = 16  # U-Net widths are base * (1, 2, 4, 8, 16)
    dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)

    def __post_init__(self) -> None:
        if self.num_classes == 1 or self.num_classes < 0:
            raise ValueError("model.num_classes must be >= 2 (background + one class), or 0 for auto")
        if len(self.dropout) != 5:
            raise ValueError("model.dropout needs one rate per encoder level (5)")


@dataclass
class MethodConfig:
    name: str = "unimatch"  # supervised | fixmatch | unimatch | samatch
    threshold: float = 0.95  # confidence for pseudo-labels (and SAM prompts)
    cutmix_prob: float = 0.5
    feature_dropout: float = 0.5  # UniMatch's Dropout2d on encoder features
    unsup_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"method.threshold must be in [0, 1], got {self.threshold}")


@dataclass
class SamConfig:
    """The SAM guide of SAM-Match (used by method ``samatch`` and the SAM cascade at inference)."""

    backbone: str = "litemedsam"  # litemedsam | vit_b | vit_l | vit_h
    checkpoint: str = ""  # empty = the packaged LiteMedSAM weights; required for vit_*
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "decoder"  # decoder | encoder+decoder
    lora_freeze_a: bool = False  # FFA-LoRA: A frozen from a shared seed, only B trained
    lr: float = 1e-4  # AdamW on the LoRA tensors, constant (the poly decay applies to the U-Net's SGD)
    warmup_fraction: float = 0.2  # first part of the schedule: Match pseudo-labels, SAM adapts on labels
    agreement_weight: float = 0.5  # SAM's loss towards confident Match predictions (joint stage)
    box_margin: int = 2  # pixels (network grid) added around prompt boxes
    box_jitter: int = 5  # max random shift of ground-truth box edges when adapting SAM
    largest_component: bool = True  # prompt boxes around the largest confident component only
    cache_embeddings: bool = True  # frozen encoder: embed every training slice once
    cache_dir: str = ""  # with cache_embeddings: also keep them in this site-local folder (reused)
    enclosed: str = ""  # nested structures, "2>3": class 2 surrounds class 3 (ACDC myocardium / LV)
    refine_classes: str = ""  # classes SAM refines, e.g. "1,3"; empty = all; the others keep Match's
    # The mask decoder's precision: "step" as the step's forward (schedule.amp), or "fp32" / "bf16"
    # whatever the step's. bf16 with an fp32 U-Net: the decoder 1.5x faster on a CPU with bf16 units
    # (AVX-512 bf16, AMX), the U-Net's numerics untouched (docs/performance.md).
    amp: str = "step"

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"sam.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.cache_embeddings and self.lora_targets != "decoder":
            raise ValueError("sam.cache_embeddings needs a frozen encoder (sam.lora_targets=decoder)")
        if self.amp not in ("step", "fp32", "bf16"):
            raise ValueError(f"sam.amp must be step, fp32 or bf16, got {self.amp!r}")
        parse_enclosed(self.enclosed)
        self.refined()

    def refined(self) -> tuple[int, ...] | None:
        """Classes SAM refines (None = all)."""
        try:
            return tuple(int(c) for c in self.refine_classes.split(",") if c.strip()) or None
        except ValueError:
            raise ValueError(
                f"sam.refine_classes: expected class indices like '1,3', got {self.refine_classes!r}"
            ) from None

    def enclosure(self) -> dict[int, tuple[int, ...]]:
        return parse_enclosed(self.enclosed)


def parse_enclosed(spec: str) -> dict[int, tuple[int, ...]]:
    """``"2>3"`` -> {2: (3,)}; ``"2>3,4>5+6"`` -> {2: (3,), 4: (5, 6)}."""
    out: dict[int, tuple[int, ...]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        outer, sep, inner = part.partition(">")
        try:
            out[int(outer)] = tuple(int(v) for v in inner.split("+"))
        except ValueError:
            raise ValueError(f"sam.enclosed: expected 'OUTER>INNER[+INNER]', got {part!r}") from None
        if not sep:
            raise ValueError(f"sam.enclosed: expected 'OUTER>INNER', got {part!r}")
    return out


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs


@dataclass
class ScheduleConfig:
    iterations: int = 30000
    batch_size: int = 12  # labeled images per step; the same number of unlabeled images
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    eval_every: int = 500
    log_every: int = 20
    num_workers: int = 0
    minutes: float = 0.0  # >0: fit the run into this wall time (iterations set from a timed probe)
    amp: str = "fp32"  # fp32 | bf16 (autocast of the training forward passes; losses stay fp32)
    channels_last: bool = False  # U-Net weights and inputs in channels-last memory format
    keep_host_memory: bool = False  # CPU: reuse freed memory, never give it back (samatch.hostmem)
    # torch.compile the U-Net and SAM's folded mask decoder: fewer, fused kernels. Each new batch shape
    # pays a compile first (a minute or more); worth it on a GPU, where the eager step waits on the host.
    compile: bool = False
    # torch.compile's mode: "reduce-overhead" also replays the compiled graphs as CUDA graphs (one
    # launch for a graph's kernels; CUDA only, the CPU compiles as "default").
    compile_mode: str = "default"
    # CUDA: record the whole step (forward, backward, optimizer updates) once per stage as a CUDA graph
    # and replay it, one launch per step instead of one per kernel (samatch.step_graph). Augmentations
    # then draw from a generator on the GPU (a different random stream from the eager step's).
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("schedule.iterations and schedule.batch_size must be >= 1")
        if self.amp not in ("fp32", "bf16"):
            raise ValueError(f"schedule.amp must be fp32 or bf16, got {self.amp!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"schedule.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"
            )
        if self.cuda_graph and self.compile and self.compile_mode in CUDA_GRAPH_MODES:
            raise ValueError(
                "schedule.cuda_graph records the whole step as one graph; "
                f"compile_mode={self.compile_mode!r} would record graphs inside it: use compile_mode=default"
            )


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return from_dict(cls, json.loads(Path(path).read_text()))


def coerce_value(value: Any, typ: Any, key: str) -> Any:
    """Convert ``value`` (from TOML / JSON / a CLI string) to the declared field type."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        inner = typing.get_args(typ)[0]
        return tuple(coerce_value(v, inner, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else coerce_value(value, args[0], key)
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if typ is str and not isinstance(value, (str, int, float)):
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if typ in (int, float, str):
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return out
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a plain dict; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, value, prefix + name + ".")
        else:
            kwargs[name] = coerce_value(value, typ, prefix + name)
    return cls(**kwargs)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a new config with dotted-key overrides applied (nested dicts are flattened first)."""
    tree = cfg.to_dict()
    for key, value in _flatten(overrides).items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"unknown config key: {key}")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ValueError(f"unknown config key: {key}")
        node[parts[-1]] = value
    return from_dict(TrainConfig, tree)


def parse_set_args(items: list[str]) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}`` (values converted later by type)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- TOML/JSON file <- overrides."""
    cfg = TrainConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: config file not found")
        try:
            data = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{p}: cannot parse config: {err}") from None
        cfg = apply_overrides(cfg, data)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg
