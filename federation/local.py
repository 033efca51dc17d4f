"""One site's side of a round, on top of :class:`samatch.engine.Trainer` (no Flower here).

A :class:`SiteSession` builds the site's data and trainer once per process and keeps the state the
trainer started from, so every round starts from (initial state <- global tensors <- site-local
tensors) no matter what an earlier round or run left in the cached trainer. Per-round randomness is
re-seeded from (seed, round, site), and optimizer moments are cleared, so a resumed federation
repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from federation.config import FederationConfig, Site
from samatch.config import TrainConfig
from samatch.data import build_train_data
from samatch.engine import Trainer, seed_everything
from samatch.evaluate import evaluate_cases, summarize_dice
from samatch.methods import build_method
from samatch.models.unet import build_unet
from samatch.phantoms import KINDS

_SESSIONS: dict[str, SiteSession] = {}


def resolve_num_classes(cfg: TrainConfig) -> TrainConfig:
    """The server has no data: take ``model.num_classes`` from the phantom kind, or require it."""
    if cfg.model.num_classes == 0:
        if not cfg.data.format.startswith("phantom-"):
            raise ValueError("set model.num_classes in the run config (the server does not open the data)")
        cfg.model.num_classes = len(KINDS[cfg.data.format.split("-", 1)[1]])
    return cfg


def initial_state(cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """The global starting point (seeded as the sites seed) and the method it came from."""
    cfg = resolve_num_classes(cfg)
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    method = build_method(cfg, build_unet(cfg), gen, data=None, device=torch.device("cpu"))
    return method.checkpoint_state(), method


@dataclass
class SiteSession:
    site: Site
    cfg: TrainConfig
    trainer: Trainer
    initial: dict[str, torch.Tensor] = field(repr=False)
    # The U-Net alone (method "supervised"): built to answer an evaluate message in a process that
    # has not trained this site, e.g. a deployment's fresh process per message. No SAM, no cache.
    evaluate_only: bool = False

    @property
    def num_labeled(self) -> int:
        return len(self.trainer.data.labeled)

    @property
    def num_unlabeled(self) -> int:
        unl = self.trainer.data.unlabeled
        return len(unl) if unl is not None and self.trainer.method.uses_unlabeled else 0


def get_session(site: Site, cfg: TrainConfig, evaluate_only: bool = False) -> SiteSession:
    """Data + trainer of ``site``, built once per process (keyed by site and settings).

    ``evaluate_only``: a session this process already built for training serves; otherwise one with
    the U-Net alone (:attr:`SiteSession.evaluate_only`), which for SAM-Match skips building SAM,
    importing peft and embedding the training slices.
    """
    site_cfg = site.apply(cfg)
    key = json.dumps([site.name, site_cfg.to_dict()], sort_keys=True, default=str)
    if key in _SESSIONS:
        return _SESSIONS[key]
    if not evaluate_only:
        _SESSIONS[key] = _build_session(site, site_cfg)
        return _SESSIONS[key]
    eval_key = "evaluate-only " + key
    if eval_key not in _SESSIONS:
        eval_cfg = copy.deepcopy(site_cfg)
        eval_cfg.method.name = "supervised"  # the same U-Net (model and method.feature_dropout settings)
        _SESSIONS[eval_key] = _build_session(site, eval_cfg, evaluate_only=True)
    return _SESSIONS[eval_key]


def _build_session(site: Site, cfg: TrainConfig, evaluate_only: bool = False) -> SiteSession:
    # Validation volumes read when a message first evaluates: a train message without an evaluation
    # never reads them (ACDC's 20: 0.2 s from their files, 0.006 s mapped from data.cache_dir).
    data = build_train_data(cfg, lazy_val=True)  # sets model.num_classes when it is 0
    trainer = Trainer(cfg, data)
    initial = {k: v.detach().clone() for k, v in trainer.method.checkpoint_state().items()}
    return SiteSession(site, cfg, trainer, initial, evaluate_only)


def load_state(session: SiteSession, *parts: Mapping[str, torch.Tensor]) -> None:
    """initial state <- each part in order (global, then site-local), loaded strictly."""
    state = dict(session.initial)
    for part in parts:
        if session.evaluate_only:  # the U-Net's tensors only: SAM's adapters are not needed here
            part = {k: v for k, v in part.items() if k.startswith("model.")}
        unknown = set(part) - set(state)
        if unknown:
            raise KeyError(f"state has keys the model does not: {sorted(unknown)[:5]}")
        state.update({k: v.to(state[k].dtype) for k, v in part.items()})
    session.trainer.method.load_checkpoint_state(state)


def _reseed(session: SiteSession, server_round: int) -> None:
    seed = session.cfg.seed + 1009 * server_round + 7919 * session.site.index
    seed_everything(seed)
    for i, value in enumerate(vars(session.trainer.method).values()):  # method's own generators
        if isinstance(value, torch.Generator):
            value.manual_seed(seed + i)
    session.trainer.generator.manual_seed(seed)
    for opt in session.trainer.optimizers:
        opt.state.clear()  # FedAvg semantics: no momentum carried across rounds


def _add_proximal_term(method: torch.nn.Module, mu: float) -> None:
    """FedProx on the Match network: loss += mu/2 * ||w - w_global||^2 (w_global = weights at round
    start). The core has no loss hook, so the instance's ``train_step`` is wrapped once."""
    anchor = [p.detach().clone() for p in method.model.parameters()]
    method._fedprox_anchor = anchor  # refreshed every round; read by the wrapper
    if getattr(method, "_fedprox_wrapped", False):
        return
    inner = method.train_step

    def train_step(*args, **kwargs):
        losses = inner(*args, **kwargs)
        params = [p for p in method.model.parameters()]
        prox = sum(((p - a) ** 2).sum() for p, a in zip(params, method._fedprox_anchor, strict=True))
        losses["loss_prox"] = 0.5 * method._fedprox_mu * prox
        losses["loss"] = losses["loss"] + losses["loss_prox"]
        return losses

    method.train_step = train_step
    method._fedprox_wrapped = True


def train_round(
    session: SiteSession,
    global_state: Mapping[str, torch.Tensor],
    local_state: Mapping[str, torch.Tensor],
    server_round: int,
    fed: FederationConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train rounds' iterations ``(round-1)*L .. round*L`` of the global schedule.

    Returns the full checkpoint state after training and mean losses (plus counts and seconds).
    """
    load_state(session, global_state, local_state)
    _reseed(session, server_round)
    trainer = session.trainer
    if fed.fedprox_mu > 0:
        trainer.method._fedprox_mu = fed.fedprox_mu
        _add_proximal_term(trainer.method, fed.fedprox_mu)
    if trainer.graph is not None:  # schedule.cuda_graph: the optimizers' state and anchors are new tensors
        trainer.graph.reset()
    start = (server_round - 1) * fed.local_iterations
    trainer.iteration = start
    sums: dict[str, float] = {}
    t0 = time.perf_counter()
    for _ in range(fed.local_iterations):
        logs = trainer.step()
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    metrics = {f"train-{k}": v / fed.local_iterations for k, v in sums.items()}
    metrics["train-seconds"] = time.perf_counter() - t0
    state = {k: v.detach().cpu() for k, v in trainer.method.checkpoint_state().items()}
    return state, metrics


def evaluate_round(
    session: SiteSession, global_state: Mapping[str, torch.Tensor], local_state: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """Validation Dice of the global model (with the site's own BatchNorm under FedBN)."""
    load_state(session, global_state, local_state)
    t = session.trainer
    if not t.data.val:
        raise ValueError(f"site {session.site.name} has no validation cases")
    rows = evaluate_cases(
        t.model, t.data.val, t.data.num_classes, session.cfg.data.size, t.device, distances=False
    )
    return summarize_dice(rows, t.data.class_names)


def clear_sessions() -> None:
    """Forget cached sites (tests; a long-lived process switching datasets)."""
    _SESSIONS.clear()
