"""evaluate-then-train: real in-process federations in which round r's evaluation and round r + 1's
training travel as one message per site, with the same metrics and weights as two messages; a site
that fails that message counts as failed in both phases; the config and reply checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_FEDERATION, phantom_nodes
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from clients.client_app import app as client_app
from federation.config import parse_run_config
from federation.evaluate_then_train import EVALUATE_FIRST, EVALUATION
from federation.inprocess import run_inprocess
from federation.local import clear_sessions
from federation.validate import UpdateRejected, UpdateRules, check_evaluation, check_train_reply
from server.server_app import app as server_app

TINY = {**TINY_FEDERATION, "method.name": "unimatch", "num-server-rounds": 3}  # 2 hospitals below
# Enough training that round 2's and 3's validation Dice are not 0 (0.006 and 0.025 when written),
# so an evaluation of the wrong weights would show.
LEARNS = {"local-iterations": 20, "model.base_channels": 8}
NODES = phantom_nodes(2)


def recording(log: list, fail: tuple[int, int] | None = None):
    """The ClientApp, logging (node, kind, round, flagged evaluate-first, replied with an error);
    ``fail`` = (node, round): that node answers its train instruction of that round with an error."""

    def app(msg, context):
        config = msg.content["config"]
        kind, rnd = msg.metadata.message_type, int(config["server-round"])
        if (context.node_id, rnd) == fail and kind == "train":
            reply = Message(Error(code=0, reason="injected failure"), reply_to=msg)
        else:
            reply = client_app(msg, context)
        log.append((context.node_id, kind, rnd, bool(config.get(EVALUATE_FIRST, False)), reply.has_error()))
        return reply

    return app


def run(tmp_path, name: str, log: list, fail=None, **overrides) -> dict:
    clear_sessions()
    try:
        rc = {**TINY, "out-dir": str(tmp_path / name), **overrides}
        run_inprocess(server_app, recording(log, fail), rc, NODES)
    finally:
        clear_sessions()
    return json.loads((tmp_path / name / "results.json").read_text())


def per_site(log: list, node: int) -> list[tuple[str, int, bool]]:
    return [(kind, rnd, flagged) for n, kind, rnd, flagged, _ in log if n == node]


@pytest.mark.parametrize(
    "every, messages",
    [
        # Evaluation every round: train 1, then evaluate r + train r+1 together, the last evaluation alone.
        (1, [("train", 1, False), ("train", 2, True), ("train", 3, True), ("evaluate", 3, False)]),
        # Evaluation in rounds 2 and 3 only: round 2's training has no evaluation to ride with.
        (2, [("train", 1, False), ("train", 2, False), ("train", 3, True), ("evaluate", 3, False)]),
    ],
)
def test_one_message_per_round_with_the_same_metrics_and_weights(tmp_path, every, messages):
    # Execute: the same federation with and without evaluate-then-train
    logs = {False: [], True: []}
    results = {
        on: run(
            tmp_path, f"on{on}", logs[on], **{**LEARNS, "evaluate-then-train": on, "evaluate-every": every}
        )
        for on in (False, True)
    }

    # Assert: two instructions per evaluated round without it (2 sites x (3 + evaluations)); with it,
    # the messages above, each answered without error
    evaluated = 3 if every == 1 else 2
    assert len(logs[False]) == 2 * (3 + evaluated)
    assert per_site(logs[True], 100) == per_site(logs[True], 101) == messages
    assert not any(error for *_, error in logs[True])
    rounds = {on: results[on]["rounds"] for on in results}
    sent_with = [r["train-instructions"].get("with-evaluation-of-round") for r in rounds[True]]
    assert sent_with == ([None, 1, 2] if every == 1 else [None, None, 2])

    # ... and the same run: every round's evaluation and training metrics, the global model bit for bit
    def metrics(on: bool, key: str) -> list[dict]:
        return [{k: v for k, v in r.get(key, {}).items() if not k.endswith("seconds")} for r in rounds[on]]

    for key in ("evaluate", "train"):
        assert metrics(False, key) == metrics(True, key)

    def site_metrics(on: bool, key: str) -> list[dict]:  # each site's own metrics, by node id
        sites = [r[key]["metrics"] for r in rounds[on] if key in r]
        return [
            {n: {k: v for k, v in m.items() if not k.endswith("seconds")} for n, m in s.items()}
            for s in sites
        ]

    for key in ("evaluate-sites", "train-sites"):
        assert site_metrics(False, key) == site_metrics(True, key)
        assert all(sorted(s) == ["100", "101"] for s in site_metrics(True, key))
    assert [("evaluate" in r) for r in rounds[True]] == ([True] * 3 if every == 1 else [False, True, True])
    assert rounds[True][1]["evaluate"]["dice_mean"] > 0  # a joint message's evaluation, not a trivial 0
    last = {on: torch.load(tmp_path / f"on{on}" / "last.pt", weights_only=False)["method"] for on in results}
    assert last[False].keys() == last[True].keys()
    assert all(torch.equal(last[False][k], last[True][k]) for k in last[False])


def test_a_site_failing_the_joint_message_fails_that_evaluation_and_the_next_training(tmp_path):
    # Execute: node 100 answers round 2's train instruction (sent with round 1's evaluation) with an error
    log = []
    rounds = run(tmp_path, "fail", log, fail=(100, 2), **{"evaluate-then-train": True})["rounds"]

    # Assert: round 1's evaluation has node 101's Dice only, round 2 aggregated node 101's update only,
    # and round 3 went on with both sites
    assert rounds[0]["evaluate-sites"]["accepted"] == [101]
    assert list(rounds[0]["evaluate-sites"]["metrics"]) == ["101"]
    assert list(rounds[0]["evaluate-sites"]["failed"]) == ["100"]
    assert rounds[1]["train-sites"]["accepted"] == [101]
    assert rounds[1]["train-sites"]["failed"] == {"100": "injected failure"}
    assert rounds[2]["train-sites"]["accepted"] == [100, 101]
    assert rounds[1]["train-sites"]["aggregated"] is True


def test_config_needs_the_same_sites_in_both_phases():
    with pytest.raises(ValueError, match=r"fraction-evaluate == fraction-train \(or 0\), got 0.5 and 1.0"):
        parse_run_config({"evaluate-then-train": True, "fraction-evaluate": 0.5})
    assert parse_run_config({"evaluate-then-train": True})[1].evaluate_then_train
    assert parse_run_config({"evaluate-then-train": True, "fraction-evaluate": 0.0})[1].evaluate_then_train


def train_reply(evaluation: dict | None) -> RecordDict:
    counts = {"num-examples": 2.0, "num-labeled": 2.0, "num-unlabeled": 4.0}
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))}), "metrics": MetricRecord(counts)}
    )
    if evaluation is not None:
        content[EVALUATION] = MetricRecord(evaluation)
    return content


def test_checks_of_a_reply_that_carries_an_evaluation():
    rules = UpdateRules(frozenset({"w"}))
    ok = train_reply({"dice_mean": 0.25, "num-examples": 3.0})

    # The training part ignores the evaluation; the evaluation is checked as an evaluate reply
    assert check_train_reply(ok, rules)[1] == {"num-examples": 2.0, "num-labeled": 2.0, "num-unlabeled": 4.0}
    assert check_evaluation(ok) == {"dice_mean": 0.25, "num-examples": 3.0}
    with pytest.raises(UpdateRejected, match="carries no evaluation"):
        check_evaluation(train_reply(None))
    with pytest.raises(UpdateRejected, match="Dice outside"):
        check_evaluation(train_reply({"dice_mean": 1.5, "num-examples": 3.0}))
