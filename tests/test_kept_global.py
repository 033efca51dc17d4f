"""keep-global: the digest by hand, keep / take on a context, and real in-process federations in
which the state goes down once per round with the same result, a site that lost its copy is sent the
arrays in the same phase, and a site whose evaluation failed gets them anyway."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import TINY_FEDERATION, phantom_nodes
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict

from clients.client_app import app as client_app
from federation import kept_global
from federation.inprocess import run_inprocess
from federation.local import clear_sessions
from server.server_app import app as server_app

TINY = {**TINY_FEDERATION, "method.name": "unimatch", "num-server-rounds": 3}  # 2 hospitals below
NODES = phantom_nodes(2)


def test_digest_by_hand_and_sensitive_to_every_part():
    # Prepare: two entries; the documented layout is key \0 dtype \0 [shape] \0 then the bytes
    a = np.array([1.0, 2.0], dtype=np.float32)
    b = np.array([[7]], dtype=np.int64)
    record = ArrayRecord({"a": Array(a), "b": Array(b)})
    by_hand = hashlib.sha256()
    for key, arr in (("a", a), ("b", b)):
        by_hand.update(f"{key}\0{arr.dtype.name}\0{list(arr.shape)}\0".encode())
        by_hand.update(Array(arr).data)  # Array.data: the serialised array as it travels

    # Execute / Assert
    digest = kept_global.record_digest(record)
    assert digest == by_hand.hexdigest()
    changed = [
        ArrayRecord({"a": Array(np.array([1.0, 2.5], dtype=np.float32)), "b": Array(b)}),  # a value
        ArrayRecord({"a": Array(a.astype(np.float16)), "b": Array(b)}),  # a dtype (fp16 transport)
        ArrayRecord({"a": Array(a.reshape(2, 1)), "b": Array(b)}),  # a shape
        ArrayRecord({"c": Array(a), "b": Array(b)}),  # a key
    ]
    assert len({digest, *map(kept_global.record_digest, changed)}) == 5


def test_take_returns_the_kept_copy_once_and_names_the_site_otherwise():
    # Prepare
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    record = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    kept_global.keep(context, record, "d" * 64)

    # Execute / Assert: a wrong name is refused and leaves the copy; the right one takes it out
    with pytest.raises(
        kept_global.KeptGlobalMissing, match=r"site hospitalA .*eeeeeeeeeeee: its copy is ddd"
    ):
        kept_global.take(context, "e" * 64, "hospitalA")
    assert kept_global.take(context, "d" * 64, "hospitalA") is record
    assert not context.state.array_records and not context.state.config_records
    with pytest.raises(kept_global.KeptGlobalMissing, match=f"{kept_global.MISSING} .*: it has none"):
        kept_global.take(context, "d" * 64, "hospitalA")
    kept_global.keep(context, record, "d" * 64)
    kept_global.discard(context)  # a train instruction that came with arrays
    assert not context.state.array_records and not context.state.config_records


def recording(log: list, forget: tuple[int, int] | None = None, fail: tuple[int, int] | None = None):
    """The ClientApp, logging (node, kind, round, carries arrays, replied with an error). ``forget``
    = (node, round): that node's context is reset before its train instruction of that round, if the
    instruction has no arrays; ``fail`` = (node, round): that node's evaluation of that round fails."""

    def app(msg, context):
        kind, rnd = msg.metadata.message_type, int(msg.content["config"]["server-round"])
        arrays = "arrays" in msg.content.array_records
        if (context.node_id, rnd) == forget and kind == "train" and not arrays:
            context.state = RecordDict()  # its SuperNode restarted: a new, empty context
        if (context.node_id, rnd) == fail and kind == "evaluate":
            reply = Message(Error(code=0, reason="injected evaluation failure"), reply_to=msg)
        else:
            reply = client_app(msg, context)
        log.append((context.node_id, kind, rnd, "arrays" in msg.content.array_records, reply.has_error()))
        return reply

    return app


def run(tmp_path, name: str, log: list, forget=None, fail=None, **overrides) -> dict:
    clear_sessions()
    try:
        rc = {**TINY, "out-dir": str(tmp_path / name), **overrides}
        grid = run_inprocess(server_app, recording(log, forget, fail), rc, NODES)
    finally:
        clear_sessions()
    return {"grid": grid, "results": json.loads((tmp_path / name / "results.json").read_text())}


@pytest.mark.parametrize("transport, pack", [("fp32", False), ("fp16", True)])
def test_keep_global_sends_the_state_down_once_per_round_with_the_same_result(tmp_path, transport, pack):
    # Execute: the same federation with and without keep-global
    logs = {False: [], True: []}
    runs = {
        keep: run(
            tmp_path,
            f"keep{keep}",
            logs[keep],
            **{"keep-global": keep, "transport": transport, "pack-arrays": pack},
        )
        for keep in (False, True)
    }

    # Assert: without it every instruction carries arrays; with it, train instructions of rounds 2-3
    # carry none, and no site replied with an error
    assert all(arrays for _, _, _, arrays, _ in logs[False]) and len(logs[False]) == 12
    with_arrays = {(kind, rnd): [] for _, kind, rnd, _, _ in logs[True]}
    for _, kind, rnd, arrays, error in logs[True]:
        with_arrays[(kind, rnd)].append(arrays)
        assert not error
    assert with_arrays == {
        ("train", 1): [True, True],
        ("evaluate", 1): [True, True],
        ("train", 2): [False, False],
        ("evaluate", 2): [True, True],
        ("train", 3): [False, False],
        ("evaluate", 3): [True, True],
    }
    counts = {keep: [r["train-instructions"] for r in runs[keep]["results"]["rounds"]] for keep in runs}
    full, bare = (
        {"with-arrays": 2, "kept-global": 0, "resent": 0},
        {"with-arrays": 0, "kept-global": 2, "resent": 0},
    )
    assert counts[False] == [full] * 3
    assert counts[True] == [full, bare, bare]
    # ... and the run is the same: the global model bit for bit, every round's Dice
    last = {
        keep: torch.load(tmp_path / f"keep{keep}" / "last.pt", weights_only=False)["method"] for keep in runs
    }
    assert last[False].keys() == last[True].keys()
    assert all(torch.equal(last[False][k], last[True][k]) for k in last[False])
    dice = {keep: [r["evaluate"]["dice_mean"] for r in runs[keep]["results"]["rounds"]] for keep in runs}
    assert dice[False] == dice[True]


def test_a_site_that_lost_its_kept_copy_is_sent_the_arrays_in_the_same_round(tmp_path):
    # Execute: node 100's context is reset between its round-1 evaluation and its round-2 training;
    # and the same federation without the fault
    log, clean = [], []
    result = run(tmp_path, "forget", log, forget=(100, 2))
    run(tmp_path, "clean", clean)

    # Assert: its bare round-2 instruction got an error reply naming the missing copy, the server sent
    # the instruction again with the arrays, the site trained, and the run is the fault-free one
    node100_round2 = [
        (arrays, error) for node, kind, rnd, arrays, error in log if (node, kind, rnd) == (100, "train", 2)
    ]
    assert node100_round2 == [(False, True), (True, False)]
    assert [e for e in log if e[4]] == [(100, "train", 2, False, True)]
    rounds = result["results"]["rounds"]
    assert [r["train-sites"]["accepted"] for r in rounds] == [[100, 101]] * 3
    assert [r["train-instructions"]["resent"] for r in rounds] == [0, 1, 0]
    last = {
        name: torch.load(tmp_path / name / "last.pt", weights_only=False)["method"]
        for name in ("forget", "clean")
    }
    assert all(torch.equal(last["forget"][k], last["clean"][k]) for k in last["clean"])


def test_a_site_whose_evaluation_failed_is_sent_the_arrays(tmp_path):
    # Execute: node 101's round-1 evaluation replies with an error
    log = []
    result = run(tmp_path, "fail", log, fail=(101, 1))

    # Assert: round 2's train instruction carries arrays for node 101 only; no train reply failed
    round2 = {node: arrays for node, kind, rnd, arrays, _ in log if (kind, rnd) == ("train", 2)}
    assert round2 == {100: False, 101: True}
    assert all(not error for node, kind, *_, error in log if kind == "train")
    assert result["results"]["rounds"][1]["train-instructions"] == {
        "with-arrays": 1,
        "kept-global": 1,
        "resent": 0,
    }


def test_the_last_evaluation_asks_for_no_copy_and_a_site_drops_unused_ones(tmp_path):
    # Execute
    result = run(tmp_path, "last", [])

    # Assert: after the run no site context holds a kept copy (the round-3 evaluation asked for none;
    # rounds 1-2's copies were taken by the next training)
    contexts = result["grid"].contexts.values()
    assert all(not ctx.state.array_records and not ctx.state.config_records for ctx in contexts)


def test_only_a_train_instruction_right_after_an_evaluation_goes_without_arrays(tmp_path):
    # Execute: 4 rounds, federated evaluation in rounds 2 and 4 only
    log = []
    result = run(tmp_path, "every2", log, **{"num-server-rounds": 4, "evaluate-every": 2})

    # Assert
    counts = [r["train-instructions"]["kept-global"] for r in result["results"]["rounds"]]
    assert counts == [0, 0, 2, 0]
    assert not any(error for *_, error in log)
