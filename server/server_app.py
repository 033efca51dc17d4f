"""The ServerApp: initial (or resumed) global state -> FedSAMatch.start() -> run folder.

Per round the strategy aggregates; the ``evaluate_fn`` hook (called by ``Strategy.start`` after every
round with the new global arrays) records metrics, prints the round's Dice and writes
``results.json`` / ``last.pt`` / ``best.pt`` under run config ``out-dir``.
"""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from federation.config import parse_run_config
from federation.local import initial_state
from federation.outputs import RunRecorder, load_resume
from federation.state import from_record, shareable_keys, to_record
from server.strategy import FedSAMatch

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, fed = parse_run_config(dict(context.run_config))
    state, method = initial_state(cfg)
    keys = shareable_keys(method, fed)
    offset, history = 0, []
    if fed.resume_from:
        ckpt = load_resume(fed.resume_from)
        state, offset, history = ckpt["method"], int(ckpt["round"]), ckpt.get("history", [])
        log(INFO, "resuming from %s at round %d", fed.resume_from, offset)
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
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train_nodes,
        min_evaluate_nodes=fed.min_evaluate_nodes,
        min_available_nodes=fed.min_available_nodes,
    )
    recorder = RunRecorder(fed.out_dir, cfg, fed, history)
    t0 = time.perf_counter()

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # Strategy.start calls this once before round 1
            return None
        r = server_round + offset
        row = recorder.record(r, from_record(arrays), strategy.history.get(r, {}), time.perf_counter() - t0)
        ev = row.get("evaluate", {})
        per_class = " ".join(
            f"{k[5:]}={v:.3f}" for k, v in ev.items() if k.startswith("dice_") and k != "dice_mean"
        )
        log(
            INFO,
            "round %d/%d: val Dice %.4f (%s)%s",
            r,
            fed.num_server_rounds,
            ev.get("dice_mean", float("nan")),
            per_class,
            " *best*" if row["best"] else "",
        )
        return None

    strategy.start(
        grid=grid,
        initial_arrays=to_record(state, keys, "fp32"),
        num_rounds=rounds,
        timeout=fed.timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=end_of_round,
    )
    log(INFO, "federated run done: best val Dice %.4f -> %s", recorder.best, recorder.out.resolve())
