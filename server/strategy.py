"""FedAvg with this project's four changes, each a thin override that calls ``super()``:

* the global state is sent in the configured transport (fp16 halves the float bytes);
* ``server-round`` counts from the resumed round (``round_offset``), so sites continue the schedule;
* site updates are checked (exactly the expected keys, finite values) before aggregation;
* arrays are averaged with :func:`federation.aggregate.aggregate_states` under a weight rule
  (labeled / unlabeled / both slice counts): float32 out, integer buffers kept integer (max).

Aggregated metrics of every round are kept in ``history`` for the server's results.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from federation.aggregate import aggregate_states, site_weights
from federation.state import to_record


class FedSAMatch(FedAvg):
    def __init__(
        self,
        expected_keys: Iterable[str],
        weights: str = "labeled",
        transport: str = "fp32",
        round_offset: int = 0,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.expected_keys = set(expected_keys)
        self.weights = weights
        self.transport = transport
        self.round_offset = round_offset
        self.history: dict[int, dict[str, dict[str, float]]] = {}

    # ---- outgoing ----------------------------------------------------------------------------------
    def _encode(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.transport == "fp32":
            return arrays
        return to_record({k: v.numpy() for k, v in arrays.items()}, list(arrays), self.transport)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_train(server_round + self.round_offset, self._encode(arrays), config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(
            server_round + self.round_offset, self._encode(arrays), config, grid
        )

    # ---- incoming ----------------------------------------------------------------------------------
    def _valid_update(self, msg: Message) -> bool:
        if msg.has_error():
            return True  # FedAvg logs and drops it
        records = list(msg.content.array_records.values())
        keys = set(records[0].keys()) if len(records) == 1 else set()
        if keys != self.expected_keys:
            extra, missing = sorted(keys - self.expected_keys), sorted(self.expected_keys - keys)
            log(
                WARNING,
                "dropping update of node %s: extra keys %s, missing %s",
                msg.metadata.src_node_id,
                extra[:5],
                missing[:5],
            )
            return False
        if not all(np.isfinite(a.numpy()).all() for a in records[0].values()):
            log(WARNING, "dropping update of node %s: non-finite values", msg.metadata.src_node_id)
            return False
        return True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Sorted by node: the float64 sum order, and so the result, does not depend on arrival order.
        replies = sorted((m for m in replies if self._valid_update(m)), key=lambda m: m.metadata.src_node_id)
        _, metrics = super().aggregate_train(server_round, replies)  # checks replies, averages metrics
        ok = [m.content for m in replies if not m.has_error()]
        if not ok:
            return None, metrics
        site_metrics = [next(iter(c.metric_records.values())) for c in ok]
        weights = site_weights(site_metrics, self.weights)
        states = [{k: v.numpy() for k, v in next(iter(c.array_records.values())).items()} for c in ok]
        merged = aggregate_states(states, weights)
        arrays = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in merged.items()})
        if metrics is not None:
            self.history.setdefault(server_round + self.round_offset, {})["train"] = dict(metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, list(replies))
        if metrics is not None:
            self.history.setdefault(server_round + self.round_offset, {})["evaluate"] = dict(metrics)
        return metrics
