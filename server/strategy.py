"""FedAvg with this project's changes, each a thin override that calls ``super()`` where FedAvg
does the work:

* the global state is sent in the configured transport (fp16 halves the float bytes; ``pack-arrays``
  sends one byte array instead of one object per tensor);
* ``server-round`` counts from the resumed round (``round_offset``), so sites continue the schedule;
* before sampling, the server waits at most ``node_wait`` seconds for enough SuperNodes (FedAvg
  alone waits forever), then fails with a message that says how many came;
* every reply is checked before aggregation (:mod:`federation.validate`: keys, shapes, dtypes,
  finite values, update norm, counts); error replies, rejected replies and their reasons are logged
  and kept per round in ``history``; a round with fewer than ``min_train_replies`` valid updates
  leaves the global model unchanged;
* arrays are aggregated with :func:`federation.aggregate.aggregate_states`: weighted mean under a
  weight rule (labeled / unlabeled / both slice counts), or coordinate median / trimmed mean;
* federated evaluation runs only on the rounds ``evaluate_round`` selects (``evaluate-every``);
* cross-task federation (``key_sets``: one allowed key set per task): a reply must hold exactly one
  task's set, each tensor is aggregated over the sites that sent it, and once a node has replied it is
  sent only its own task's tensors (the first message carries every task's); per-task metrics are
  kept in ``history`` under ``train-tasks`` / ``evaluate-tasks``;
* ``keep_global`` (:mod:`federation.kept_global`): the evaluate instruction names its arrays by
  digest, and a site whose evaluate reply was accepted gets the next train instruction without
  arrays (the same state); a site that lost its copy is sent the arrays in the same phase;
  ``history[r]["train-instructions"]`` counts both kinds and the resends;
* ``evaluate_then_train`` (:mod:`federation.evaluate_then_train`): the evaluate phase of round r
  (except the last) sends round r + 1's train instructions, flagged to evaluate first; their replies
  give round r's evaluation and, kept, round r + 1's training, whose phase then sends nothing. One
  message per site per round.

Aggregated metrics of every round are kept in ``history`` for the server's results.json, and each
accepted site's own metrics under ``train-sites`` / ``evaluate-sites`` ``metrics`` (by node id: a
straggler's ``train-seconds``, a hospital's own Dice).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from federation import kept_global
from federation.aggregate import aggregate_states, lora_average_bias, site_weights
from federation.evaluate_then_train import EVALUATE_FIRST
from federation.packing import pack_record
from federation.state import task_of_keys, to_record
from federation.validate import (
    UpdateRejected,
    UpdateRules,
    check_evaluate_reply,
    check_evaluation,
    check_train_reply,
)


class FedSAMatch(FedAvg):
    def __init__(
        self,
        expected_keys: Iterable[str],
        weights: str = "labeled",
        transport: str = "fp32",
        round_offset: int = 0,
        aggregation: str = "mean",
        trim_fraction: float = 0.25,
        max_update_norm: float = 10.0,
        min_train_replies: int = 1,
        pack_arrays: bool = False,
        node_wait: float = 3600.0,
        evaluate_round: Callable[[int], bool] | None = None,
        key_sets: Iterable[frozenset[str]] = (),
        keep_global: bool = True,
        final_round: int | None = None,
        evaluate_then_train: bool = False,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.expected_keys = frozenset(expected_keys)
        self.weights = weights
        self.transport = transport
        self.round_offset = round_offset
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.max_update_norm = max_update_norm
        self.min_train_replies = min_train_replies
        self.pack_arrays = pack_arrays
        self.node_wait = node_wait
        self.evaluate_round = evaluate_round or (lambda r: True)
        self.reference: dict[str, np.ndarray] | None = None  # global state sent this round
        self.history: dict[int, dict[str, dict]] = {}
        self.key_sets = tuple(frozenset(k) for k in key_sets)
        self.node_keys: dict[int, frozenset[str]] = {}  # cross-task: what each node last sent
        self._outgoing: ArrayRecord | None = None  # this phase's global arrays, before encoding
        self.keep_global = keep_global
        self.final_round = final_round if final_round is not None else float("inf")  # absolute
        self._offer = False  # this evaluation asks the sites to keep the arrays
        self._offered: dict[int, str] = {}  # node -> digest of the arrays its evaluate instruction named
        self._kept: dict[int, str] = {}  # node -> digest it holds (its evaluate reply was accepted)
        self._full: dict[int, RecordDict] = {}  # node -> its train instruction with the arrays
        self._train_round = 0
        self.evaluate_then_train = evaluate_then_train
        self._train_config = ConfigRecord()
        self._early: list[Message] | None = None  # next round's train replies, got in this evaluation

    # ---- outgoing ----------------------------------------------------------------------------------
    def _encode(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.transport != "fp32":
            arrays = to_record({k: v.numpy() for k, v in arrays.items()}, list(arrays), self.transport)
        return pack_record(arrays) if self.pack_arrays else arrays

    def _wait_for_nodes(self, grid: Grid, need: int) -> None:
        """Block until ``need`` SuperNodes are connected, at most ``node_wait`` seconds."""
        deadline = time.monotonic() + self.node_wait
        next_log = 0.0
        while (have := len(list(grid.get_node_ids()))) < need:
            now = time.monotonic()
            if now >= deadline:
                raise RuntimeError(
                    f"only {have} SuperNode(s) connected after {self.node_wait:.0f} s; {need} needed "
                    "(min-available-nodes / min-train-nodes); the run can be resumed from last.pt"
                )
            if now >= next_log:
                log(INFO, "waiting for SuperNodes: %d connected, %d needed", have, need)
                next_log = now + 10.0
            time.sleep(1.0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        r = server_round + self.round_offset
        if self._early is not None:  # evaluate-then-train: sent, and answered, in the last evaluation
            log(INFO, "configure_train: round %d's training came with round %d's evaluation", r, r - 1)
            return []
        self._train_config = ConfigRecord(dict(config))
        self._wait_for_nodes(grid, max(self.min_available_nodes, self.min_train_nodes))
        return self._train_instructions(r, arrays, config, grid)

    def _train_instructions(
        self, r: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, evaluate_of: int | None = None
    ) -> list[Message]:
        """Round ``r``'s train instructions (FedAvg's sampling, this class's messages); ``evaluate_of``:
        sent in that round's evaluate phase (evaluate-then-train)."""
        self.reference = {k: v.numpy() for k, v in arrays.items()}
        self._outgoing, self._full = arrays, {}
        self._train_round = r
        messages = list(super().configure_train(r, self._encode(arrays), config, grid))
        count = {"with-arrays": len(messages) - len(self._full), "kept-global": len(self._full), "resent": 0}
        if evaluate_of is not None:
            count["with-evaluation-of-round"] = evaluate_of
        self.history.setdefault(r, {})["train-instructions"] = count
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._offered, self._kept = {}, {}  # a kept copy serves only the train instruction right after
        r = server_round + self.round_offset
        if self.fraction_evaluate == 0.0 or not self.evaluate_round(r):
            log(INFO, "configure_evaluate: no federated evaluation this round")
            return []
        self._wait_for_nodes(grid, max(self.min_available_nodes, self.min_evaluate_nodes))
        if self.evaluate_then_train and r < self.final_round:  # round r + 1's training rides along
            config = ConfigRecord({**self._train_config, EVALUATE_FIRST: True})
            self._early = []
            return self._train_instructions(r + 1, arrays, config, grid, evaluate_of=r)
        self._outgoing = arrays
        self._offer = self.keep_global and r < self.final_round  # no train instruction follows the last
        return super().configure_evaluate(r, self._encode(arrays), config, grid)

    def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str):
        """FedAvg's one message per node, with two changes: in a cross-task federation a node that has
        replied before gets only its task's tensors (and the shared adapters); under ``keep_global``
        an evaluate instruction names its arrays' digest, and a train instruction to a node that holds
        those arrays carries none (its full content is kept for :meth:`resend_with_arrays`)."""
        if self._outgoing is None or not (self.key_sets or self.keep_global):
            return super()._construct_messages(record, node_ids, message_type)
        config = record[self.configrecord_key]
        offer = self._offer and message_type == MessageType.EVALUATE
        encoded: dict[frozenset[str] | None, ArrayRecord] = {}  # per key set (cross-task)
        digests: dict[frozenset[str] | None, str] = {}
        messages = []
        for node in node_ids:
            keys = self.node_keys.get(node) if self.key_sets else None
            if keys not in encoded:
                encoded[keys] = record[self.arrayrecord_key]
                if keys is not None:
                    encoded[keys] = self._encode(ArrayRecord({k: self._outgoing[k] for k in sorted(keys)}))
            arrays = encoded[keys]
            held = self._kept.get(node) if message_type == MessageType.TRAIN else None
            if (offer or held) and keys not in digests:
                digests[keys] = kept_global.record_digest(arrays)
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            if offer:
                self._offered[node] = digests[keys]
                content[self.configrecord_key] = ConfigRecord({**config, kept_global.KEEP: digests[keys]})
            elif held and held == digests[keys]:
                self._full[node] = content
                content = RecordDict({self.configrecord_key: ConfigRecord({**config, kept_global.USE: held})})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def resend_with_arrays(self, sent: Message, reply: Message) -> Message | None:
        """For :class:`server.quorum.QuorumGrid`: the train instruction ``sent`` again, with its arrays,
        when its site replied that it holds no kept copy; None for every other reply."""
        node = sent.metadata.dst_node_id
        if node not in self._full or not reply.has_error() or kept_global.MISSING not in reply.error.reason:
            return None
        self.history[self._train_round]["train-instructions"]["resent"] += 1
        log(
            INFO,
            "round %d train: node %s %s: sending it the arrays",
            self._train_round,
            node,
            kept_global.MISSING,
        )
        return Message(
            content=self._full.pop(node),
            message_type=sent.metadata.message_type,
            dst_node_id=node,
            group_id=sent.metadata.group_id,
        )

    # ---- incoming ----------------------------------------------------------------------------------
    def _rules(self) -> UpdateRules:
        return UpdateRules(
            self.expected_keys, self.reference, self.transport, self.max_update_norm, self.key_sets
        )

    def _per_task(self, accepted: list[tuple[Message, Mapping[str, float]]], train: bool) -> dict:
        """Cross-task: {task: the mean metrics of that task's accepted replies}."""
        groups: dict[str, list[Mapping[str, float]]] = {}
        for msg, metrics in accepted:
            keys = self.node_keys.get(msg.metadata.src_node_id)
            if keys is not None:
                groups.setdefault(task_of_keys(keys), []).append(metrics)
        out = {}
        for task, metrics in sorted(groups.items()):
            mean = self._mean_metrics(metrics, train=train)
            if mean is not None:
                out[task] = dict(mean)
        return out

    def _screen(
        self, server_round: int, replies: Iterable[Message], check: Callable[[RecordDict], object], phase: str
    ) -> tuple[list[tuple[Message, object]], dict]:
        """(reply, checked content) of the replies that pass ``check``, sorted by node id (the sums
        that follow fix their own order, by content), and a report."""
        accepted, report = [], {"replies": 0, "accepted": [], "rejected": {}, "failed": {}}
        for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node = msg.metadata.src_node_id
            report["replies"] += 1
            if msg.has_error():
                report["failed"][str(node)] = msg.error.reason
                log(
                    WARNING,
                    "round %d %s: node %s replied with an error: %s",
                    server_round,
                    phase,
                    node,
                    msg.error.reason,
                )
                continue
            try:
                accepted.append((msg, check(msg.content)))
            except UpdateRejected as exc:
                report["rejected"][str(node)] = str(exc)
                log(WARNING, "round %d %s: rejected the reply of node %s: %s", server_round, phase, node, exc)
                continue
            report["accepted"].append(node)
        return accepted, report

    def _mean_metrics(self, metrics: list[Mapping[str, float]], train: bool) -> MetricRecord | None:
        """FedAvg's weighted metric mean over the keys every accepted reply has."""
        common = set.intersection(*(set(m) for m in metrics)) if metrics else set()
        if self.weighted_by_key not in common or sum(m[self.weighted_by_key] for m in metrics) <= 0:
            return None
        # Rows (each with its own weight) in a fixed order, by value, as the arrays are summed: the
        # float means do not depend on node ids.
        names = sorted(common)
        rows = sorted([m[k] for k in names] for m in metrics)
        records = [RecordDict({"metrics": MetricRecord(dict(zip(names, r, strict=True)))}) for r in rows]
        aggregate = self.train_metrics_aggr_fn if train else self.evaluate_metrics_aggr_fn
        return aggregate(records, self.weighted_by_key)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = server_round + self.round_offset
        if self._early is not None:  # evaluate-then-train: received in round r - 1's evaluation
            replies, self._early = self._early, None
        accepted, report = self._screen(r, replies, lambda c: check_train_reply(c, self._rules()), "train")
        entry = self.history.setdefault(r, {})
        report["metrics"] = {str(msg.metadata.src_node_id): dict(m) for msg, (_, m) in accepted}
        entry["train-sites"] = report
        log(
            INFO,
            "aggregate_train: %d accepted, %d rejected, %d failed",
            len(accepted),
            len(report["rejected"]),
            len(report["failed"]),
        )
        if len(accepted) < self.min_train_replies:
            log(
                WARNING,
                "round %d: %d valid update(s) < min-train-replies=%d: global model unchanged",
                r,
                len(accepted),
                self.min_train_replies,
            )
            report["aggregated"] = False
            return None, None
        states = [state for _, (state, _) in accepted]
        site_metrics = [metrics for _, (_, metrics) in accepted]
        if self.key_sets:
            for msg, (state, _) in accepted:
                self.node_keys[msg.metadata.src_node_id] = frozenset(state)
            entry["train-tasks"] = self._per_task([(m, met) for m, (_, met) in accepted], train=True)
        try:  # robust rules ignore the (self-reported) counts
            weights = (
                site_weights(site_metrics, self.weights)
                if self.aggregation == "mean"
                else [0.0] * len(states)
            )
        except ValueError as exc:
            log(WARNING, "round %d: %s: global model unchanged", r, exc)
            report["aggregated"] = False
            return None, None
        merged = aggregate_states(states, weights, self.aggregation, self.trim_fraction)
        report["aggregated"] = True
        if self.aggregation == "mean":  # plain LoRA averaging's distance from averaging the updates
            bias = lora_average_bias(states, weights)
            if bias is not None:
                entry["lora-avg-bias"] = bias
        arrays = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in merged.items()})
        metrics = self._mean_metrics(site_metrics, train=True)
        if metrics is not None:
            entry["train"] = dict(metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        r = server_round + self.round_offset
        replies = list(replies)
        if not replies:
            return None
        check = check_evaluate_reply
        if self._early is not None:  # train replies of round r + 1 that carry round r's evaluation
            self._early, check = replies, check_evaluation
        accepted, report = self._screen(r, replies, check, "evaluate")
        report["metrics"] = {str(msg.metadata.src_node_id): dict(m) for msg, m in accepted}
        self.history.setdefault(r, {})["evaluate-sites"] = report
        for msg, _ in accepted:  # these sites now hold the arrays their instruction named
            node = msg.metadata.src_node_id
            if node in self._offered:
                self._kept[node] = self._offered[node]
        if self.key_sets:
            self.history[r]["evaluate-tasks"] = self._per_task(accepted, train=False)
        metrics = self._mean_metrics([m for _, m in accepted], train=False)
        if metrics is not None:
            self.history[r]["evaluate"] = dict(metrics)
        return metrics
