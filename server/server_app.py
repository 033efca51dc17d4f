"""The ServerApp: initial (or resumed) global state -> FedSAMatch.start() -> run folder.

Per round the strategy aggregates; the ``evaluate_fn`` hook (called by ``Strategy.start`` after every
round with the new global arrays) records metrics, prints the round's Dice and writes
``results.json`` / ``last.pt`` / ``best.pt`` under run config ``out-dir``.

``resume-from = "auto"`` makes a restart idempotent: if ``<out-dir>/last.pt`` exists (a coordinator
stopped mid-run), the run continues after its round, provided the checkpoint was written with the
same training settings; otherwise it starts at round 1. The deployment always launches with it, so
relaunching the same command after a SuperLink / ServerApp restart resumes the run.
"""

from __future__ import annotations

import sys
import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from federation import pull_retry
from federation.config import (
    RESUME_AUTO,
    FederationConfig,
    manifest_splits,
    manifest_tasks,
    parse_run_config,
)
from federation.local import initial_state
from federation.outputs import RunRecorder, load_resume
from federation.server_eval import ServerValidation
from federation.state import from_record, shareable_keys, to_record, to_wire
from samatch.config import TrainConfig, apply_overrides
from samatch.rundir import check_free, hold, in_folder, moved_note, set_aside
from server.quorum import QuorumGrid
from server.strategy import FedSAMatch

app = ServerApp()
HTTP_GRID = "flwr.superlink.grid.http_grid"  # the deployment's Grid (flwr-serverapp imports it)


def _dotted(tree: dict, prefix: str = "") -> dict:
    """{"schedule": {"lr": 0.1}} -> {"schedule.lr": 0.1}"""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_point(cfg: TrainConfig, fed: FederationConfig) -> tuple[dict, str] | None:
    """(checkpoint, its path) to continue from: ``resume-from`` itself, or under ``"auto"`` the
    out-dir's ``last.pt`` when there is one (refused, naming the keys, if its training settings
    differ)."""
    if not fed.resume_from:
        return None
    if fed.resume_from != RESUME_AUTO:
        return load_resume(fed.resume_from), fed.resume_from
    last = Path(fed.out_dir) / "last.pt"
    if not last.is_file():
        log(INFO, "resume-from=auto: no %s yet, starting at round 1", last)
        return None
    ckpt = load_resume(last)
    saved, now = _dotted(ckpt.get("config", {})), _dotted(cfg.to_dict())
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        raise ValueError(
            f'{last}: written with other settings ({differ[:5]}); use another out-dir or resume-from=""'
        )
    return ckpt, str(last)


def task_configs(cfg: TrainConfig, fed: FederationConfig) -> dict[str, TrainConfig]:
    """A cross-task run's {task: the run's settings with the manifest's task table}; {} otherwise."""
    return {task: apply_overrides(cfg, over) for task, over in manifest_tasks(fed.partition_manifest).items()}


def global_start(
    cfg: TrainConfig, fed: FederationConfig, tasks: dict[str, TrainConfig]
) -> tuple[dict, list[str], list[frozenset[str]]]:
    """(initial global state, its shareable keys, per-task key sets). A cross-task run (``tasks``,
    from :func:`task_configs`) gets one U-Net per task (its own classes) under ``task.<name>.`` and
    one set of LoRA adapters, which all tasks start from (the same seed); otherwise one model and no
    key sets."""
    if not tasks:
        state, method = initial_state(cfg)
        return state, shareable_keys(method, fed), []
    state, key_sets = {}, []
    for task, task_cfg in tasks.items():
        task_state, method = initial_state(task_cfg)
        wire = to_wire({k: task_state[k] for k in shareable_keys(method, fed)}, task, fed.share_adapters)
        for key, value in wire.items():
            state.setdefault(key, value)
        key_sets.append(frozenset(wire))
    return state, sorted(state), key_sets


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, fed = parse_run_config(dict(context.run_config))
    check_free(fed.out_dir)  # a live run there: refused now, not after the set-up
    tasks = task_configs(cfg, fed)
    state, keys, key_sets = global_start(cfg, fed, tasks)
    offset, history = 0, []
    resumed = resume_point(cfg, fed)
    if resumed is not None:
        ckpt, path = resumed
        state, offset, history = ckpt["method"], int(ckpt["round"]), ckpt.get("history", [])
        log(INFO, "resuming from %s at round %d", path, offset)
    if set(keys) - set(state):
        raise KeyError(f"global state lacks shareable keys {sorted(set(keys) - set(state))[:5]}")
    rounds = fed.last_round - offset
    if rounds < 1:
        log(INFO, "nothing to do: checkpoint is at round %d of %d", offset, fed.last_round)
        return

    strategy = FedSAMatch(
        expected_keys=keys,
        weights=fed.weights,
        transport=fed.transport,
        round_offset=offset,
        aggregation=fed.aggregation,
        trim_fraction=fed.trim_fraction,
        max_update_norm=fed.max_update_norm,
        min_train_replies=fed.min_train_replies,
        pack_arrays=fed.pack_arrays,
        node_wait=fed.round_timeout,
        evaluate_round=fed.evaluates,
        key_sets=key_sets,
        keep_global=fed.keep_global,
        evaluate_then_train=fed.evaluate_then_train,
        final_round=fed.last_round,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train_nodes,
        min_evaluate_nodes=fed.min_evaluate_nodes,
        min_available_nodes=fed.min_available_nodes,
    )
    if fed.server_val_root and key_sets:
        raise ValueError("server-val-root is not supported with a cross-task manifest (one U-Net per task)")
    server_val = ServerValidation.from_config(cfg, fed)
    splits = manifest_splits(fed.partition_manifest)
    if resumed is None or not in_folder(resumed[1], fed.out_dir):
        # An earlier run there is renamed, never mixed with this one (not when the sites' inputs lie in it).
        moved = set_aside(fed.out_dir, [fed.partition_manifest, fed.server_val_root, fed.site_state_dir])
        if moved:
            log(INFO, "%s", moved_note(fed.out_dir, moved))
    with hold(fed.out_dir):  # no other run moves or writes into out-dir while this one lives
        recorder = RunRecorder(fed.out_dir, cfg, fed, history, tasks, splits)
        t0 = time.perf_counter()

        def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:  # Strategy.start calls this once before round 1
                return None
            r = server_round + offset
            state = from_record(arrays)
            server_metrics = None
            if server_val is not None:
                server_metrics = server_val.evaluate(state)
                strategy.history.setdefault(r, {})["server-evaluate"] = server_metrics
                log(
                    INFO,
                    "round %d/%d: server validation Dice %.4f",
                    r,
                    fed.num_server_rounds,
                    server_metrics["dice_mean"],
                )
            row = recorder.record(r, state, strategy.history.get(r, {}), time.perf_counter() - t0)
            ev = row.get("evaluate", {})
            if "dice_mean" not in ev:
                log(INFO, "round %d/%d: done (no federated evaluation this round)", r, fed.num_server_rounds)
                return MetricRecord(server_metrics) if server_metrics else None
            per_class = " ".join(
                f"{k[5:]}={v:.3f}" for k, v in ev.items() if k.startswith("dice_") and k != "dice_mean"
            )
            log(
                INFO,
                "round %d/%d: val Dice %.4f (%s)%s",
                r,
                fed.num_server_rounds,
                ev["dice_mean"],
                per_class,
                " *best*" if row["best"] else "",
            )
            if per_task := recorder.task_dice(row):
                log(INFO, "round %d/%d: val Dice per task: %s", r, fed.num_server_rounds, per_task)
            return MetricRecord(server_metrics) if server_metrics else None

        # Replies are looked for every reply-poll seconds (or as often as the wrapped Grid does), with
        # straggler-timeout a crashed site does not hold every round for round-timeout, and a site that
        # lost its kept global state is sent the arrays (keep-global).
        grace = fed.straggler_timeout if fed.straggler_timeout > 0 else float("inf")
        poll = min(fed.reply_poll, getattr(grid, "pull_interval", fed.reply_poll))  # Ray's grid: 0.1 s
        grid = QuorumGrid(grid, fed.min_train_replies, grace, poll, resend=strategy.resend_with_arrays)
        # A reply pulled while its objects still arrive is retried after 0.05 s, not Flower's 1 s. Only the
        # deployment's grid pulls objects, and its runtime has imported that module; a simulation does not
        # import it here (0.6 s).
        if (http_grid := sys.modules.get(HTTP_GRID)) is not None:
            pull_retry.shorten(http_grid, "pull_objects")
        strategy.start(
            grid=grid,
            initial_arrays=to_record(state, keys, "fp32"),
            num_rounds=rounds,
            timeout=fed.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=end_of_round,
        )
        best = f"best val Dice {recorder.best:.4f}" if recorder.best >= 0 else "no federated evaluation"
        if per_task := recorder.task_dice():
            best += f" (per task: {per_task}; run folders {recorder.out / 'tasks'})"
        log(INFO, "federated run done: %s -> %s", best, recorder.out.resolve())
