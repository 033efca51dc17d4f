"""Hostile and malformed updates, robust aggregation, packing, the straggler wait, a site with bad
data and resume-from=auto: unit level (fake replies, hand-computed expectations) and in process."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from conftest import write_tiny_acdc_h5
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients.client_app import app as client_app
from federation.aggregate import aggregate_states
from federation.inprocess import run_inprocess
from federation.local import clear_sessions
from federation.packing import PACKED_KEY, PackError, pack_record, unpack_record
from server.quorum import QuorumGrid
from server.server_app import app as server_app
from server.strategy import FedSAMatch

TINY = {
    "data.format": "phantom-cardiac",
    "data.size": 32,
    "data.max_unlabeled": 6,
    "model.base_channels": 4,
    "schedule.batch_size": 2,
    "num-server-rounds": 2,
    "local-iterations": 2,
}


class FakeGrid:
    """Just enough Grid for FedAvg.configure_train: the connected node ids."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def reply(node: int, arrays: dict, labeled: float = 1, unlabeled: float = 0, pack: bool = False, **metrics):
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    m = MetricRecord({"num-examples": labeled, "num-labeled": labeled, "num-unlabeled": unlabeled, **metrics})
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return Message(
        RecordDict({"arrays": pack_record(record) if pack else record, "metrics": m}), reply_to=instruction
    )


GLOBAL = {"w": np.array([1.0, 2.0], np.float32), "bn.n": np.array(3, np.int64)}
GOOD_A = {"w": np.array([2.0, 2.0], np.float32), "bn.n": np.array(4, np.int64)}
GOOD_B = {"w": np.array([4.0, 6.0], np.float32), "bn.n": np.array(5, np.int64)}


def strategy_after_configure(**kwargs) -> FedSAMatch:
    strategy = FedSAMatch(expected_keys=GLOBAL, min_available_nodes=1, min_train_nodes=1, **kwargs)
    record = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    messages = list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid([1, 2, 3])))
    assert len(messages) == 3
    return strategy


# ---- validation: one bad reply among two good ones, each rejected with its reason --------------------


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"w": GOOD_A["w"]}, "missing ['bn.n']"),
        ({**GOOD_A, "extra": np.zeros(1, np.float32)}, "extra ['extra']"),
        ({**GOOD_A, "w": np.zeros(3, np.float32)}, "w: shape (3,), expected (2,)"),
        ({**GOOD_A, "w": GOOD_A["w"].astype(np.float64)}, "w: dtype float64, expected float32"),
        ({**GOOD_A, "bn.n": np.array(4.0, np.float32)}, "bn.n: dtype float32, expected int64"),
        ({**GOOD_A, "w": np.array([np.nan, 1.0], np.float32)}, "w: 1 non-finite value(s)"),
        ({**GOOD_A, "w": np.array([np.inf, -np.inf], np.float32)}, "w: 2 non-finite value(s)"),
        ({**GOOD_A, "w": np.array([1e6, 2.0], np.float32)}, "update norm is"),
        ({**GOOD_A, "bn.n": np.array(-1, np.int64)}, "bn.n: negative counter"),
    ],
)
def test_bad_update_is_rejected_with_reason(task_identity, bad, reason):
    # Prepare: the global w is [1, 2] (norm 2.236); limit 10 x that
    strategy = strategy_after_configure(max_update_norm=10.0)
    replies = [reply(1, GOOD_A), reply(2, GOOD_B), reply(3, bad)]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: only A and B (weights 1/2, 1/2) were aggregated; C's reason is recorded
    report = strategy.history[1]["train-sites"]
    print(f"checked: node 3 rejected because {report['rejected']['3']!r}")
    assert report["accepted"] == [1, 2] and reason in report["rejected"]["3"]
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0, 4.0])
    assert int(arrays["bn.n"].numpy()) == 5


@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({"num-labeled": -2.0}, "negative counts"),
        ({"num-labeled": float("nan")}, "not finite"),
    ],
)
def test_bad_counts_are_rejected(task_identity, metrics, reason):
    strategy = strategy_after_configure()
    bad = reply(3, GOOD_B)
    bad.content["metrics"] = MetricRecord({"num-examples": 1, "num-unlabeled": 0, **metrics})
    arrays, _ = strategy.aggregate_train(1, [reply(1, GOOD_A), bad])
    assert reason in strategy.history[1]["train-sites"]["rejected"]["3"]
    np.testing.assert_allclose(arrays["w"].numpy(), GOOD_A["w"])


def test_unreadable_packed_update_is_rejected(task_identity):
    strategy = strategy_after_configure(pack_arrays=True)
    instruction = Message(RecordDict(), dst_node_id=3, message_type="train")
    garbage = ArrayRecord({PACKED_KEY: Array(np.frombuffer(b"\xff" * 8 + b"{}", np.uint8).copy())})
    metrics = MetricRecord({"num-examples": 1, "num-labeled": 1, "num-unlabeled": 0})
    bad = Message(RecordDict({"arrays": garbage, "metrics": metrics}), reply_to=instruction)
    arrays, _ = strategy.aggregate_train(1, [reply(1, GOOD_A, pack=True), bad])
    assert "unreadable packed arrays" in strategy.history[1]["train-sites"]["rejected"]["3"]
    np.testing.assert_allclose(arrays["w"].numpy(), GOOD_A["w"])


def test_too_few_valid_updates_leave_the_model_unchanged(task_identity):
    strategy = strategy_after_configure(min_train_replies=2)
    nan = {**GOOD_B, "w": np.array([np.nan, 0], np.float32)}
    arrays, metrics = strategy.aggregate_train(1, [reply(1, GOOD_A), reply(2, nan)])
    assert arrays is None and metrics is None
    assert strategy.history[1]["train-sites"]["aggregated"] is False


def test_zero_total_weight_leaves_the_model_unchanged(task_identity):
    strategy = strategy_after_configure(weights="labeled")
    arrays, _ = strategy.aggregate_train(1, [reply(1, GOOD_A, labeled=0), reply(2, GOOD_B, labeled=0)])
    assert arrays is None and strategy.history[1]["train-sites"]["aggregated"] is False


def test_each_accepted_sites_metrics_are_kept_by_node(task_identity):
    strategy = strategy_after_configure()
    nan = {**GOOD_B, "w": np.array([np.nan, 0], np.float32)}
    replies = [reply(2, GOOD_B, **{"train-seconds": 3.5}), reply(1, GOOD_A, **{"train-seconds": 1.25}),
               reply(3, nan, **{"train-seconds": 9.0})]  # fmt: skip
    strategy.aggregate_train(1, replies)
    sites = strategy.history[1]["train-sites"]
    assert list(sites["rejected"]) == ["3"]  # the rejected site's metrics are not kept
    assert sites["metrics"] == {
        "1": {"num-examples": 1.0, "num-labeled": 1.0, "num-unlabeled": 0.0, "train-seconds": 1.25},
        "2": {"num-examples": 1.0, "num-labeled": 1.0, "num-unlabeled": 0.0, "train-seconds": 3.5},
    }
    assert strategy.history[1]["train"]["train-seconds"] == pytest.approx((1.25 + 3.5) / 2)

    instruction = Message(RecordDict(), dst_node_id=1, message_type="evaluate")
    evaluation = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 4, "dice_mean": 0.75})}), reply_to=instruction
    )
    strategy.aggregate_evaluate(1, [evaluation])
    assert strategy.history[1]["evaluate-sites"]["metrics"] == {"1": {"num-examples": 4.0, "dice_mean": 0.75}}


# ---- robust aggregation against one poisoned site, by hand ----------------------------------------------

A, B, D = np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([5.0, 6.0])
POISON = np.array([1000.0, -1000.0])  # finite, right shape: passes every format check


@pytest.mark.parametrize(
    "sites, weights, rule, trim, expected",
    [
        # weighted mean, C claims half the labeled data: 1/4 A + 1/4 B + 1/2 C
        ([A, B, POISON], [0.25, 0.25, 0.5], "mean", 0.25, [501.0, -498.5]),
        # coordinate median of 3: the middle value per coordinate (weights ignored)
        ([A, B, POISON], [0.25, 0.25, 0.5], "median", 0.25, [3.0, 2.0]),
        # trimmed mean, 3 sites, trim 0.34: floor(1.02) = 1 cut at each end -> the middle value
        ([A, B, POISON], [0.25, 0.25, 0.5], "trimmed-mean", 0.34, [3.0, 2.0]),
        # trimmed mean, 3 sites, trim 0.25: floor(0.75) = 0 cut -> the plain (unweighted) mean
        ([A, B, POISON], [0.25, 0.25, 0.5], "trimmed-mean", 0.25, [1004 / 3, -994 / 3]),
        # 4 sites, trim 0.25: [1, 3, 5, 1000] -> mean(3, 5) = 4; [-1000, 2, 4, 6] -> mean(2, 4) = 3
        ([A, B, D, POISON], [0.25] * 4, "trimmed-mean", 0.25, [4.0, 3.0]),
        # median of 4: mean of the two middle values, the same here
        ([A, B, D, POISON], [0.25] * 4, "median", 0.25, [4.0, 3.0]),
    ],
)
def test_robust_aggregation_by_hand(sites, weights, rule, trim, expected):
    states = [{"w": s.astype(np.float32)} for s in sites]
    out = aggregate_states(states, weights, rule, trim)
    print(f"checked: {rule} (trim {trim}) of {[s.tolist() for s in sites]} = {out['w'].tolist()}")
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
    assert out["w"].dtype == np.float32


def test_integer_buffers_under_robust_rules():
    counters = [{"n": np.array(v, np.int64)} for v in (2, 5, 10**12)]
    assert int(aggregate_states(counters, [1 / 3] * 3, "mean")["n"]) == 10**12  # max: the poison wins
    out = aggregate_states(counters, [1 / 3] * 3, "median")["n"]
    assert out.dtype == np.int64 and int(out) == 5  # lower median: it does not


def test_strategy_median_ignores_the_poisoned_site(task_identity):
    # Prepare: norm check off, so only the aggregation rule stands between C and the model
    strategy = strategy_after_configure(aggregation="median", max_update_norm=0.0)
    poisoned = {"w": np.array([1000.0, -1000.0], np.float32), "bn.n": np.array(10**9, np.int64)}
    replies = [reply(1, GOOD_A), reply(2, GOOD_B), reply(3, poisoned, labeled=100)]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: [2, 4, 1000] -> 4 and [2, 6, -1000] -> 2; counters [4, 5, 1e9] -> 5
    np.testing.assert_allclose(arrays["w"].numpy(), [4.0, 2.0])
    assert int(arrays["bn.n"].numpy()) == 5


@pytest.mark.parametrize("rule, trim", [("median", 0.5), ("sum", 0.1)])
def test_bad_aggregation_options(rule, trim):
    with pytest.raises(ValueError, match="trim fraction|unknown aggregation"):
        aggregate_states([{"w": A}], [1.0], rule, trim)


@pytest.mark.parametrize(
    "run_config, error",
    [
        ({"aggregation": "sum"}, "aggregation"),
        ({"trim-fraction": 0.5}, "trim-fraction"),
        ({"round-timeout": 0}, "round-timeout"),
        ({"min-train-replies": 0}, "min-train-replies"),
        ({"straggler-timeout": -1}, "straggler-timeout"),
    ],
)
def test_fault_settings_are_validated(run_config, error):
    from federation.config import parse_run_config

    with pytest.raises(ValueError, match=error):
        parse_run_config(run_config)


# ---- packing -------------------------------------------------------------------------------------------


def test_pack_round_trip_keeps_keys_dtypes_shapes():
    state = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "n": np.array(7, np.int64),  # 0-d stays 0-d
        "h": np.ones(4, np.float16),
    }
    packed = pack_record(ArrayRecord({k: Array(v) for k, v in state.items()}))
    assert list(packed) == [PACKED_KEY]
    back = unpack_record(packed)
    assert list(back) == list(state)
    for k, v in state.items():
        got = back[k].numpy()
        assert got.shape == v.shape and got.dtype == v.dtype and np.array_equal(got, v)


def with_header(head: bytes, payload: bytes = b"") -> bytes:
    return len(head).to_bytes(8, "little") + head + payload


@pytest.mark.parametrize(
    "blob, error",
    [
        (b"\x01", "shorter than its header"),
        (b"\xff" * 8, "exceeds the payload"),
        (b"\x02\x00\x00\x00\x00\x00\x00\x00[x", "not JSON"),
        (with_header(b'[["w","object",[]]]'), "dtype 'object' not allowed"),
        (with_header(b'[["w","float32",[4]]]', b"\0" * 8), "payload truncated"),
        (with_header(b'[["w","float32",[1]]]', b"\0" * 8), "4 trailing bytes"),
        (with_header(b'[["w","float32",[-1]]]'), "bad shape"),
    ],
)
def test_malformed_pack_raises(blob, error):
    record = ArrayRecord({PACKED_KEY: Array(np.frombuffer(blob, np.uint8).copy())})
    with pytest.raises(PackError, match=error):
        unpack_record(record)


# ---- the straggler wait --------------------------------------------------------------------------------


class SilentNodeGrid:
    """Nodes 1 and 2 answer at once; node 3 never does."""

    def __init__(self):
        self.sent = {}

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            self.sent[f"m{i}"] = m
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            msg = self.sent[mid]
            if msg.metadata.dst_node_id != 3:
                rep = Message(RecordDict(), reply_to=msg)
                rep.metadata.__dict__["_reply_to_message_id"] = mid
                out.append(rep)
        return out


@pytest.mark.parametrize("quorum, grace, timeout, max_seconds", [(2, 0.3, 30.0, 3.0), (3, 0.3, 1.0, 4.0)])
def test_quorum_grid_stops_waiting_for_a_dead_node(task_identity, quorum, grace, timeout, max_seconds):
    # Prepare
    grid = QuorumGrid(SilentNodeGrid(), quorum=quorum, grace=grace, poll=0.1)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3)]

    # Execute
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    took = time.monotonic() - t0

    # Assert: 2 replies, bounded by the grace (quorum reached) or by the timeout (never reached)
    print(
        f"checked: quorum {quorum}, grace {grace}, timeout {timeout}: {len(replies)} replies in {took:.2f} s"
    )
    assert len(replies) == 2 and took < max_seconds


class LateNodeGrid(SilentNodeGrid):
    """Node 3 replies too, but only on the ``late``-th look for replies."""

    def __init__(self, late: int):
        super().__init__()
        self.late, self.looks = late, 0

    def pull_messages(self, ids):
        self.looks += 1
        out = super().pull_messages(ids)
        if self.looks == self.late:
            for mid in ids:
                if self.sent[mid].metadata.dst_node_id == 3:
                    rep = Message(RecordDict(), reply_to=self.sent[mid])
                    rep.metadata.__dict__["_reply_to_message_id"] = mid
                    out.append(rep)
        return out


def test_quorum_grid_without_grace_waits_for_every_reply_looking_every_poll(task_identity):
    # Prepare: no straggler grace (the default); the slow node's reply is there at the 4th look
    slept = []
    inner = LateNodeGrid(late=4)
    grid = QuorumGrid(inner, quorum=1, poll=0.05, sleep=slept.append)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3)]

    # Execute
    replies = list(grid.send_and_receive(messages, timeout=None))

    # Assert: every reply, after 3 pauses of the poll interval (not Flower's 3 s)
    assert sorted(m.metadata.src_node_id for m in replies) == [1, 2, 3]
    assert inner.looks == 4 and slept == [0.05, 0.05, 0.05]


# ---- in process: a site with bad data, resume-from=auto -------------------------------------------------


def test_site_with_missing_folder_replies_with_error_and_others_continue(tmp_path):
    # Prepare: site 0 is a phantom hospital; site 1's data folder does not exist
    clear_sessions()
    missing = tmp_path / "site1" / "not-mounted"
    nodes = [
        {"data-root": "0", "data-format": "phantom-cardiac", "site-name": "good", "site-index": 0},
        {"data-root": str(missing), "data-format": "nifti", "site-name": "bad", "site-index": 1},
    ]
    run_config = {**TINY, "out-dir": str(tmp_path / "run"), "min-train-nodes": 2, "min-available-nodes": 2}

    # Execute
    grid = run_inprocess(server_app, client_app, run_config, nodes)

    # Assert: every reply of node 101 is an error naming the site, the folder and the problem
    bad = [m for node, m in grid.sent if node == 101]
    assert bad and all(m.has_error() for m in bad)
    reason = bad[0].error.reason
    print(f"checked: the bad site replied {reason!r}")
    assert reason == f"site bad: cannot load its data: {missing}: folder not found"
    rounds = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]
    assert [r["train-sites"]["accepted"] for r in rounds] == [[100], [100]]
    assert all(reason in r["train-sites"]["failed"]["101"] for r in rounds)


def test_site_with_an_unreadable_validation_file_replies_with_error_and_others_continue(tmp_path):
    # Prepare: site 0 is a phantom hospital; site 1's training slices are fine, its one validation
    # volume is cut short (read on the first evaluation, not when the site's session is built)
    clear_sessions()
    root = write_tiny_acdc_h5(tmp_path / "ACDC")
    broken = root / "data" / "patient003_frame01.h5"
    broken.write_bytes(broken.read_bytes()[:100])
    nodes = [
        {"data-root": "0", "data-format": "phantom-cardiac", "site-name": "good", "site-index": 0},
        {"data-root": str(root), "data-format": "acdc-h5", "site-name": "bad", "site-index": 1},
    ]
    run_config = {**TINY, "data.labeled": 1, "out-dir": str(tmp_path / "run"), "min-available-nodes": 2}
    run_config.update({"min-train-nodes": 1, "min-evaluate-nodes": 1})

    # Execute
    grid = run_inprocess(server_app, client_app, run_config, nodes)

    # Assert: the run completed; site 1 trained, and each of its evaluations is an error naming the
    # site and the file
    bad = [m for node, m in grid.sent if node == 101]
    errors = [m.error.reason for m in bad if m.has_error()]
    assert errors and all(r.startswith(f"site bad: cannot load its data: {broken}: ") for r in errors)
    assert any(not m.has_error() for m in bad)  # its train replies
    rounds = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]
    assert len(rounds) == TINY["num-server-rounds"]
    assert all(r["evaluate-sites"]["accepted"] == [100] for r in rounds)


def test_resume_auto_continues_and_refuses_other_settings(tmp_path):
    # Prepare
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    base = {**TINY, "out-dir": str(tmp_path / "run"), "resume-from": "auto"}

    # Execute: a first launch pauses after round 1 (a coordinator stop), the same launch again
    clear_sessions()
    run_inprocess(server_app, client_app, {**base, "stop-after-round": 1}, nodes)
    clear_sessions()
    run_inprocess(server_app, client_app, base, nodes)

    # Assert
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert last["round"] == 2 and [r["round"] for r in last["history"]] == [1, 2]
    with pytest.raises(ValueError, match=r"written with other settings \(\['schedule.lr'\]\)"):
        run_inprocess(server_app, client_app, {**base, "schedule.lr": 0.5}, nodes)


def test_evaluate_every_zero_evaluates_after_the_last_round_only(tmp_path):
    clear_sessions()
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    run_config = {**TINY, "num-server-rounds": 3, "out-dir": str(tmp_path / "run"), "evaluate-every": 0}
    grid = run_inprocess(server_app, client_app, run_config, nodes)
    assert sum(m.metadata.message_type == "evaluate" for _, m in grid.sent) == 2  # 2 sites, once
    rounds = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]
    assert ["evaluate" in r for r in rounds] == [False, False, True]


@pytest.fixture(autouse=True)
def _fresh_sessions():
    yield
    clear_sessions()
