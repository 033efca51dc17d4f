"""Flower's flat run config -> (TrainConfig, FederationConfig); node config -> the site's data.

Run-config keys are split by name: the hyphenated names of :class:`FederationConfig` fields
(``num-server-rounds``, ``local-iterations``, ``out-dir``, ...) are federation settings; every other
key is a dotted :class:`~samatch.config.TrainConfig` override (``schedule.lr``, ``method.name``)
applied through :func:`samatch.config.apply_overrides`, so unknown keys are errors on both sides.

Site facts come from the node config (STYLE 2): in simulation ``partition-id`` / ``num-partitions``
pick a phantom site or a partition of a manifest; in deployment ``data-root``, ``data-format``,
``site-name`` (and optionally ``splits-file``, ``label-map``, ``site-index``) describe the hospital's
own folder.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samatch.config import TrainConfig, apply_overrides, coerce_value
from samatch.splits import Splits, load_splits, union_splits

WEIGHTS = ("labeled", "unlabeled", "both")
LORA_MODES = ("avg", "ffa")
TRANSPORTS = ("fp32", "fp16")
AGGREGATIONS = ("mean", "median", "trimmed-mean")  # federation.aggregate.AGGREGATORS
SHARE_ADAPTERS = ("all", "task")  # cross-task federation: LoRA averaged over all sites | per task
RESUME_AUTO = "auto"  # resume-from: continue from <out-dir>/last.pt when it exists


@dataclass
class FederationConfig:
    num_server_rounds: int = 3  # rounds of the whole schedule (the poly LR spans all of them)
    local_iterations: int = 20  # optimizer steps per site per round
    stop_after_round: int = 0  # >0: pause after this round (resumable); the schedule still spans all
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    weights: str = "labeled"  # aggregation weight per site: labeled | unlabeled | both (slice counts)
    fedprox_mu: float = 0.0  # >0: proximal term mu/2 ||w - w_global||^2 on the Match network
    fedbn: bool = False  # BatchNorm tensors stay on the site (never sent, never averaged)
    lora_mode: str = "avg"  # avg: average A and B | ffa: A frozen from the shared seed, only B travels
    transport: str = "fp32"  # fp16 halves float bytes on the wire; float32 is restored on receipt
    out_dir: str = "runs/federated"  # results.json, best.pt, last.pt (server side)
    resume_from: str = ""  # a last.pt (or its folder) to continue from its round
    partition_manifest: str = ""  # simulations/ JSON manifest: partition-id -> site data
    round_timeout: float = 3600.0  # seconds the server waits for one phase's replies (and for nodes)
    min_train_replies: int = 1  # fewest valid train replies a round needs to be aggregated
    straggler_timeout: float = 0.0  # >0: once min-train-replies replied, wait at most this for the rest
    reply_poll: float = 0.2  # seconds between the server's looks for replies (Flower's deployment: 3)
    evaluate_every: int = 1  # federated evaluation every N rounds (0: only after the last round)
    pack_arrays: bool = False  # one byte array per message instead of one object per tensor
    keep_global: bool = True  # sites keep the evaluated global state: the next train message has no arrays
    evaluate_then_train: bool = False  # round r's evaluate instruction also trains round r+1: one message
    aggregation: str = "mean"  # mean (weighted) | median | trimmed-mean (coordinate-wise, unweighted)
    trim_fraction: float = 0.25  # trimmed-mean: share of sites cut at each end per coordinate
    max_update_norm: float = 10.0  # reject ||update - global|| > this x ||global|| (0: no check)
    site_state_dir: str = ""  # sites keep FedBN tensors here per round (node config state-dir wins)
    share_adapters: str = "all"  # cross-task: SAM LoRA averaged over all sites, or only within a task
    warmup_rounds: int = (
        0  # SAM-Match: rounds of Match warm-up + SAM adaptation before joint (0: sam.warmup_fraction)
    )
    server_val_root: str = ""  # a validation set on the server (federation/server_eval.py); "" = none
    server_val_format: str = ""  # its format ("" = data.format)
    server_val_label_map: str = ""

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1 or self.local_iterations < 1:
            raise ValueError("num-server-rounds and local-iterations must be >= 1")
        if not 0 <= self.stop_after_round <= self.num_server_rounds:
            raise ValueError("stop-after-round must be in [0, num-server-rounds]")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"lora-mode must be one of {LORA_MODES}, got {self.lora_mode!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.fedprox_mu < 0:
            raise ValueError(f"fedprox-mu must be >= 0, got {self.fedprox_mu}")
        if not 0 <= self.warmup_rounds < self.num_server_rounds:
            raise ValueError(f"warmup-rounds must be in [0, num-server-rounds), got {self.warmup_rounds}")
        if self.share_adapters not in SHARE_ADAPTERS:
            raise ValueError(f"share-adapters must be one of {SHARE_ADAPTERS}, got {self.share_adapters!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.round_timeout <= 0:
            raise ValueError(f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        if self.min_train_replies < 1:
            raise ValueError(f"min-train-replies must be >= 1, got {self.min_train_replies}")
        if self.evaluate_every < 0 or self.max_update_norm < 0 or self.straggler_timeout < 0:
            raise ValueError("evaluate-every, max-update-norm and straggler-timeout must be >= 0")
        if self.reply_poll <= 0:
            raise ValueError(f"reply-poll must be > 0 seconds, got {self.reply_poll}")
        if self.evaluate_then_train and self.fraction_evaluate not in (0.0, self.fraction_train):
            raise ValueError(
                "evaluate-then-train sends one message to the sites of both phases: it needs "
                f"fraction-evaluate == fraction-train (or 0), got {self.fraction_evaluate} and "
                f"{self.fraction_train}"
            )

    @property
    def last_round(self) -> int:
        return self.stop_after_round or self.num_server_rounds

    def evaluates(self, server_round: int) -> bool:
        """Whether round ``server_round`` (absolute) has a federated evaluation."""
        if server_round in (self.last_round, self.num_server_rounds):
            return True
        return self.evaluate_every > 0 and server_round % self.evaluate_every == 0


FED_KEYS = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(FederationConfig)}


APP_ROOT = Path(__file__).resolve().parents[1]  # the app's folder (a FAB carries its .json files)


def _resolve_app_path(path: str) -> str:
    """A relative path that is not under the working directory but is in the app's folder (Flower
    runs the ServerApp and ClientApps elsewhere, from the installed app) -> that absolute path."""
    if path and not Path(path).is_absolute() and not Path(path).exists() and (APP_ROOT / path).exists():
        return str(APP_ROOT / path)
    return path


def parse_run_config(run_config: dict[str, Any]) -> tuple[TrainConfig, FederationConfig]:
    """Flower ``context.run_config`` -> (TrainConfig, FederationConfig), both validated.

    ``schedule.iterations`` is set to ``num-server-rounds * local-iterations`` so that the poly
    learning rate decays over the whole federation; ``sam.lora_freeze_a`` follows ``lora-mode``;
    ``warmup-rounds`` > 0 sets ``sam.warmup_fraction`` so that SAM-Match's joint stage starts exactly
    at the first iteration of round ``warmup-rounds + 1`` (stages 1 and 2, Match warm-up and SAM
    adaptation, run together before it).
    """
    hints = typing.get_type_hints(FederationConfig)
    fed_kwargs, train = {}, {}
    for key, value in run_config.items():
        if key in FED_KEYS:
            name = FED_KEYS[key]
            fed_kwargs[name] = coerce_value(value, hints[name], key)
        else:
            train[key] = value
    fed = FederationConfig(**fed_kwargs)
    fed.partition_manifest = _resolve_app_path(fed.partition_manifest)
    train["schedule.iterations"] = fed.num_server_rounds * fed.local_iterations
    train["sam.lora_freeze_a"] = fed.lora_mode == "ffa"
    if fed.warmup_rounds:
        train["sam.warmup_fraction"] = fed.warmup_rounds / fed.num_server_rounds
    cfg = apply_overrides(TrainConfig(), train)
    return cfg, fed


@dataclass(frozen=True)
class Site:
    """One hospital's data, as the client reads it: enough to build its TrainData."""

    name: str
    index: int  # partition id (simulation) or 0; seeds per-round randomness
    overrides: tuple[tuple[str, Any], ...]  # dotted TrainConfig keys (data.root, data.format, ...)
    task: str = ""  # cross-task federation: the U-Net is aggregated only among sites of this task

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        return apply_overrides(cfg, dict(self.overrides))


def site_from_node_config(node_config: dict[str, Any], cfg: TrainConfig, fed: FederationConfig) -> Site:
    """Node config -> :class:`Site`.

    * deployment: ``data-root`` (+ ``data-format``, ``site-name``, ``splits-file``, ``label-map``,
      ``site-index``, ``state-dir``: site-local FedBN state and SAM embedding cache);
    * simulation with ``partition-manifest``: the manifest's entry for ``partition-id``;
    * simulation on phantoms: phantom site ``partition-id`` (``data.root`` = "<id>").
    """
    if "data-root" in node_config:
        over = {"data.root": str(node_config["data-root"])}
        if node_config.get("data-format"):
            over["data.format"] = str(node_config["data-format"])
        if node_config.get("splits-file"):
            over["data.splits_file"] = str(node_config["splits-file"])
        if node_config.get("label-map"):
            over["data.label_map"] = str(node_config["label-map"])
        if node_config.get("state-dir"):  # the site's own folder also keeps its slices and SAM embeddings
            state_dir = Path(str(node_config["state-dir"]))
            over["data.cache_dir"] = str(state_dir / "slices")
            over["sam.cache_dir"] = str(state_dir / "sam_embeddings")
        name = str(node_config.get("site-name") or Path(over["data.root"]).name)
        task = str(node_config.get("task", ""))
        task_over = {
            k: v for k, v in task_overrides(fed.partition_manifest, task).items() if k != "data.root"
        }
        over = {**task_over, **over}  # the hospital's own folder and format win over the task's
        return Site(name, int(node_config.get("site-index", 0)), tuple(sorted(over.items())), task)
    if "partition-id" not in node_config:
        raise ValueError("node config needs 'data-root' (deployment) or 'partition-id' (simulation)")
    pid, n = int(node_config["partition-id"]), int(node_config.get("num-partitions", 1))
    if fed.partition_manifest:
        manifest = json.loads(Path(fed.partition_manifest).read_text())
        sites = manifest["sites"]
        if len(sites) != n:
            raise ValueError(f"{fed.partition_manifest}: {len(sites)} sites but {n} partitions (supernodes)")
        entry = sites[pid]
        task = str(entry.get("task", ""))
        if task:  # cross-task: the task's settings, then the site's own (data.root = the site's data)
            over = {**task_overrides(fed.partition_manifest, task), **entry.get("overrides", {})}
        else:  # the run config's data.root wins over the manifest's (the same dataset elsewhere)
            over = {"data.root": cfg.data.root or manifest["root"], "data.format": manifest.get("format", "")}
        if entry.get("splits_file"):
            over["data.splits_file"] = str(Path(fed.partition_manifest).parent / entry["splits_file"])
        return Site(entry["name"], pid, tuple(sorted(over.items())), task)
    if not cfg.data.format.startswith("phantom-"):
        raise ValueError("simulation on a real dataset needs run config 'partition-manifest'")
    return Site(f"phantom-site{pid}", pid, (("data.root", str(pid)),))


def uncached_sam_warning(node_config: dict[str, Any], site: Site, cfg: TrainConfig) -> str | None:
    """A deployed SAM-Match site with nowhere to keep its SAM embeddings -> the warning to log, else None.

    A deployment runs every message in a fresh process, so without a site-local folder (node config
    ``state-dir``, which ``deploy supernode`` sets by default) each message encodes all the site's
    slices again: a SAM-Match round took 118 s instead of 12 s on the 2-core CPU (docs/performance_log.md).
    """
    site_cfg = site.apply(cfg)
    if "data-root" not in node_config or site_cfg.method.name != "samatch":
        return None
    if not site_cfg.sam.cache_embeddings or site_cfg.sam.cache_dir:
        return None
    return (
        f"site {site.name}: SAM-Match without a node config 'state-dir': every message encodes the "
        "site's slices again; start the SuperNode with 'deploy supernode' or give it a state-dir"
    )


def manifest_tasks(manifest_path: str) -> dict[str, dict[str, Any]]:
    """A cross-task manifest's ``tasks``: name -> dotted TrainConfig overrides ({} when single-task).

    Relative ``data.root`` values are taken from the manifest's folder, so the manifest works from
    any working directory.
    """
    if not manifest_path:
        return {}
    path = Path(manifest_path)
    try:
        tasks = json.loads(path.read_text()).get("tasks", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the partition manifest: {exc}") from exc
    out = {}
    for name, over in tasks.items():
        if not isinstance(over, dict) or "model.num_classes" not in over:
            raise ValueError(f"{path}: task {name!r} needs a table with model.num_classes")
        over = dict(over)
        root = over.get("data.root")
        if (
            root
            and not str(over.get("data.format", "")).startswith("phantom-")
            and not Path(root).is_absolute()
        ):
            over["data.root"] = str((path.parent / root).resolve())
        out[name] = over
    return out


def manifest_splits(manifest_path: str) -> dict[str, Splits]:
    """{task ("" in a single-task manifest): the union of its sites' splits files}, for each task
    whose every site names one (``simulations.partition`` writes them); the other tasks' sites make
    their splits from the run's settings, and their run folder goes without."""
    if not manifest_path:
        return {}
    path = Path(manifest_path)
    files: dict[str, list[str]] = {}
    for site in json.loads(path.read_text()).get("sites", []):
        files.setdefault(site.get("task", ""), []).append(site.get("splits_file", ""))
    return {
        task: union_splits([load_splits(path.parent / name) for name in names])
        for task, names in files.items()
        if all(names)
    }


def task_overrides(manifest_path: str, task: str) -> dict[str, Any]:
    """The overrides of ``task`` in the manifest ({} for no task); an unknown task is an error."""
    if not task:
        return {}
    tasks = manifest_tasks(manifest_path)
    if task not in tasks:
        raise ValueError(
            f"task {task!r} is not in the partition manifest {manifest_path!r} ({sorted(tasks)})"
        )
    return tasks[task]


def toml_as_config_line(path: str | Path) -> str:
    """A run-config TOML file -> one ``flwr run -c`` string ("k=v k=v"), so that a file can be given
    together with other ``-c`` overrides (Flower refuses a TOML file beside key=value pairs)."""
    import tomllib
    from flwr.common.config import flatten_dict

    p = Path(path)
    try:
        data = flatten_dict(tomllib.loads(p.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{p}: cannot read the run config: {exc}") from None
    parts = []
    for key, value in data.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            if '"' in value or "\\" in value:
                raise ValueError(f"{p}: {key}: quotes and backslashes are not supported in values")
            text = f'"{value}"'
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            raise ValueError(f"{p}: {key}: only strings, numbers and booleans are run-config values")
        parts.append(f"{key}={text}")
    return " ".join(parts)
