"""Federation: run-config parsing, state <-> ArrayRecord, aggregation by hand, and real in-process
federated runs of the ServerApp and ClientApp on the phantom hospitals (resume included)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from conftest import TINY_FEDERATION as TINY
from conftest import phantom_nodes
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.config import flatten_dict

from clients.client_app import app as client_app
from federation.aggregate import aggregate_states, site_weights
from federation.config import FederationConfig, manifest_splits, parse_run_config, site_from_node_config
from federation.inprocess import run_inprocess
from federation.local import clear_sessions
from federation.state import batchnorm_keys, from_record, record_nbytes, shareable_keys, to_record
from samatch.engine import load_run_model
from server.server_app import app as server_app
from server.strategy import FedSAMatch

REPO = Path(__file__).resolve().parents[1]


# ---- config ----------------------------------------------------------------------------------------


def test_pyproject_app_config_parses():
    # Prepare
    app_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    # Execute
    cfg, fed = parse_run_config(flatten_dict(app_cfg))

    # Assert
    assert cfg.schedule.iterations == fed.num_server_rounds * fed.local_iterations
    assert cfg.data.format == "phantom-cardiac" and fed.weights == "labeled"


@pytest.mark.parametrize(
    "run_config, error",
    [
        ({"weights": "patients"}, "weights"),
        ({"lora-mode": "sum"}, "lora-mode"),
        ({"transport": "int8"}, "transport"),
        ({"schedule.no_such_key": 1}, "unknown config key"),
        ({"fedbn": "maybe"}, "fedbn"),
        ({"reply-poll": 0.0}, "reply-poll"),
    ],
)
def test_run_config_rejects_bad_values(run_config, error):
    with pytest.raises(ValueError, match=error):
        parse_run_config(run_config)


def test_lora_mode_ffa_freezes_a():
    cfg, _ = parse_run_config({"lora-mode": "ffa"})
    assert cfg.sam.lora_freeze_a is True


# ---- state -------------------------------------------------------------------------------------------


class FakeMethod(torch.nn.Module):
    """A Match network with one BatchNorm and two LoRA-like tensors, as checkpoint_state names them."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))

    def checkpoint_state(self):
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        state["sam_lora.layer.lora_A.weight"] = torch.ones(2, 3)
        state["sam_lora.layer.lora_B.weight"] = torch.zeros(3, 2)
        return state


@pytest.mark.parametrize(
    "fedbn, lora_mode, expected",
    [
        (
            False,
            "avg",
            {
                "model.0.weight",
                "model.0.bias",
                "model.1.weight",
                "model.1.bias",
                "model.1.running_mean",
                "model.1.running_var",
                "model.1.num_batches_tracked",
                "sam_lora.layer.lora_A.weight",
                "sam_lora.layer.lora_B.weight",
            },
        ),
        (
            True,
            "avg",
            {
                "model.0.weight",
                "model.0.bias",
                "sam_lora.layer.lora_A.weight",
                "sam_lora.layer.lora_B.weight",
            },
        ),
        (True, "ffa", {"model.0.weight", "model.0.bias", "sam_lora.layer.lora_B.weight"}),
    ],
)
def test_shareable_keys(fedbn, lora_mode, expected):
    method = FakeMethod()
    keys = shareable_keys(method, FederationConfig(fedbn=fedbn, lora_mode=lora_mode))
    assert set(keys) == expected
    assert batchnorm_keys(method) == {k for k in method.checkpoint_state() if k.startswith("model.1.")}


def test_record_round_trip_keeps_dtypes_and_fp16_halves_floats():
    # Prepare
    state = {"w": torch.randn(64, 64), "n": torch.tensor(7, dtype=torch.int64)}

    # Execute
    r32, r16 = to_record(state, state, "fp32"), to_record(state, state, "fp16")
    back32, back16 = from_record(r32), from_record(r16)

    # Assert
    assert r32["w"].dtype == "float32" and r16["w"].dtype == "float16"
    assert r32["n"].dtype == r16["n"].dtype == "int64"
    assert back16["w"].dtype == torch.float32 and back16["n"].dtype == torch.int64 and int(back16["n"]) == 7
    assert torch.equal(back32["w"], state["w"])
    assert torch.allclose(back16["w"], state["w"], atol=1e-2)
    assert len(r16["w"].data) - 128 == (len(r32["w"].data) - 128) // 2  # npy header is 128 bytes


# ---- aggregation ---------------------------------------------------------------------------------------


def reply(node: int, arrays: dict[str, np.ndarray], labeled: int, unlabeled: int) -> Message:
    """A site's train reply as the ClientApp builds it."""
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    metrics = MetricRecord({"num-examples": labeled, "num-labeled": labeled, "num-unlabeled": unlabeled})
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=instruction)


SITE_A = {"w": np.array([0.0, 4.0], np.float32), "bn.n": np.array(2, np.int64)}
SITE_B = {"w": np.array([4.0, 8.0], np.float32), "bn.n": np.array(5, np.int64)}


@pytest.mark.parametrize(
    "rule, expected_w",
    [
        ("labeled", [3.0, 7.0]),  # weights 1/4, 3/4 (A: 1 labeled, B: 3)
        ("unlabeled", [1.0, 5.0]),  # weights 3/4, 1/4 (A: 3 unlabeled, B: 1)
        ("both", [2.0, 6.0]),  # weights 4/8, 4/8
    ],
)
def test_aggregate_weights_by_hand(task_identity, rule, expected_w):
    # Prepare
    strategy = FedSAMatch(expected_keys=SITE_A, weights=rule)
    replies = [reply(1, SITE_A, 1, 3), reply(2, SITE_B, 3, 1)]

    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert
    np.testing.assert_allclose(arrays["w"].numpy(), expected_w)
    assert arrays["w"].numpy().dtype == np.float32
    n = arrays["bn.n"].numpy()
    assert n.dtype == np.int64 and int(n) == 5  # integer buffer: max over sites, still int64
    assert metrics["num-labeled"] == pytest.approx(1 / 4 * 1 + 3 / 4 * 3)  # metrics weighted by num-examples


def test_the_global_state_does_not_depend_on_the_sites_node_ids(task_identity):
    # Prepare: three equal-weight sites. Summed in float64 in the order 2.3, 0.9, 4.1 the mean rounds
    # to float32 2.4333334, in the order 2.3, 4.1, 0.9 to 2.4333332: ordered by node id (drawn anew in
    # every simulation), the same run gave another global model, and another Dice, each time.
    values = [np.float32(2.3), np.float32(0.9), np.float32(4.1)]
    strategy = FedSAMatch(expected_keys={"w"})

    # Execute: the same three replies, under two assignments of node ids
    results = []
    for nodes in ([1, 2, 3], [1, 3, 2]):
        replies = [reply(n, {"w": np.array([v])}, 1, float(v)) for n, v in zip(nodes, values, strict=True)]
        arrays, metrics = strategy.aggregate_train(1, replies)
        results.append((arrays["w"].numpy(), metrics["num-unlabeled"]))

    # Assert: bit for bit the same state and metrics
    (w1, u1), (w2, u2) = results
    assert w1.tobytes() == w2.tobytes() and w1[0] == pytest.approx(7.3 / 3)
    assert u1 == u2 and u1 == pytest.approx(7.3 / 3)  # the metric means, summed likewise


def test_metric_means_keep_each_sites_value_with_its_weight(task_identity):
    # Site A: 3 examples, 1 unlabeled slice; site B: 1 example, 2 unlabeled (value and weight in
    # opposite order, so sorting the columns apart would give (1 * 1 + 3 * 2) / 4 = 1.75)
    strategy = FedSAMatch(expected_keys=SITE_A)
    _, metrics = strategy.aggregate_train(1, [reply(2, SITE_A, 3, 1), reply(1, SITE_B, 1, 2)])
    assert metrics["num-unlabeled"] == pytest.approx((3 * 1 + 1 * 2) / 4)


def test_aggregate_fp16_updates_give_float32(task_identity):
    strategy = FedSAMatch(expected_keys=SITE_A, transport="fp16")
    half = [{**s, "w": s["w"].astype(np.float16)} for s in (SITE_A, SITE_B)]
    arrays, _ = strategy.aggregate_train(1, [reply(1, half[0], 1, 0), reply(2, half[1], 1, 0)])
    assert arrays["w"].numpy().dtype == np.float32
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 6.0])


def test_fedbn_update_carrying_batchnorm_is_dropped(task_identity):
    # Prepare: under FedBN the expected keys exclude BatchNorm; site B leaks its BN buffer.
    strategy = FedSAMatch(expected_keys={"w"})
    replies = [reply(1, {"w": SITE_A["w"]}, 1, 0), reply(2, SITE_B, 1, 0)]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: only site A counted; no BN key in the global state
    assert set(arrays) == {"w"}
    np.testing.assert_allclose(arrays["w"].numpy(), SITE_A["w"])


def test_nonfinite_update_is_dropped(task_identity):
    strategy = FedSAMatch(expected_keys={"w"})
    bad = {"w": np.array([np.nan, 1.0], np.float32)}
    arrays, _ = strategy.aggregate_train(1, [reply(1, {"w": SITE_A["w"]}, 1, 0), reply(2, bad, 1, 0)])
    np.testing.assert_allclose(arrays["w"].numpy(), SITE_A["w"])


def test_lora_ffa_average_is_exact_plain_average_is_not():
    # Prepare: two sites' LoRA factors; delta W = B @ A.
    rng = np.random.default_rng(0)
    a_shared = rng.standard_normal((2, 5)).astype(np.float32)
    a1, a2 = rng.standard_normal((2, 2, 5)).astype(np.float32)
    b1, b2 = rng.standard_normal((2, 4, 2)).astype(np.float32)
    weights = site_weights([{"num-labeled": 1}, {"num-labeled": 3}], "labeled")

    # Execute: FFA sends only B (A shared and frozen); plain averaging sends A and B.
    ffa = aggregate_states([{"B": b1}, {"B": b2}], weights)
    avg = aggregate_states([{"A": a1, "B": b1}, {"A": a2, "B": b2}], weights)

    # Assert
    ideal_ffa = 0.25 * b1 @ a_shared + 0.75 * b2 @ a_shared
    np.testing.assert_allclose(ffa["B"] @ a_shared, ideal_ffa, rtol=1e-5, atol=1e-5)
    ideal_avg = 0.25 * b1 @ a1 + 0.75 * b2 @ a2
    assert not np.allclose(avg["B"] @ avg["A"], ideal_avg, atol=1e-3)


def test_lora_average_bias_by_hand():
    from federation.aggregate import lora_average_bias

    def site(a, b):  # 1x1 factors: delta W = b * a
        return {"l.lora_A.x.weight": np.array([[a]]), "l.lora_B.x.weight": np.array([[b]])}

    # mean of products 0.5*2*1 + 0.5*0*3 = 1; product of means (0.5*2 + 0.5*0) * (0.5*1 + 0.5*3) = 2
    assert lora_average_bias([site(1.0, 2.0), site(3.0, 0.0)], [0.5, 0.5]) == pytest.approx(1.0)
    assert lora_average_bias([site(1.0, 2.0), site(1.0, 5.0)], [0.25, 0.75]) == 0.0  # A agree: exact
    assert lora_average_bias([{"l.lora_B.x.weight": np.ones((1, 1))}], [1.0]) is None  # FFA: B only


def test_site_weights_need_positive_total():
    with pytest.raises(ValueError, match="positive sum"):
        site_weights([{"num-unlabeled": 0}, {"num-unlabeled": 0}], "unlabeled")


# ---- end to end, in process -----------------------------------------------------------------------------


def run_federation(tmp_path: Path, nodes: int = 2, **overrides):
    run_config = {**TINY, "out-dir": str(tmp_path / "run"), **overrides}
    return run_inprocess(server_app, client_app, run_config, phantom_nodes(nodes)), run_config


@pytest.mark.parametrize("fedbn, transport", [(False, "fp32"), (True, "fp16")])
def test_federated_run_sends_only_allowed_tensors(tmp_path, fedbn, transport):
    # Prepare
    from federation.local import initial_state

    cfg, fed = parse_run_config({**TINY, "fedbn": fedbn, "transport": transport})
    init, method = initial_state(cfg)
    allowed = set(shareable_keys(method, fed))
    bn = batchnorm_keys(method)

    # Execute
    grid, _ = run_federation(tmp_path, fedbn=fedbn, transport=transport)

    # Assert: every train reply holds exactly the allowed tensors plus one MetricRecord
    train_replies = [m for _, m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_replies) == 2 * 2
    float_bytes = 2 if transport == "fp16" else 4
    for msg in train_replies:
        assert set(msg.content.keys()) == {"arrays", "metrics"}
        arrays = msg.content["arrays"]
        assert set(arrays) == allowed and all(k.startswith("model.") for k in arrays)
        assert bn.isdisjoint(arrays) if fedbn else bn <= set(arrays)
        for key, arr in arrays.items():
            expected = "int64" if key.endswith("num_batches_tracked") else f"float{8 * float_bytes}"
            assert arr.dtype == expected, key
        payload = sum(init[k].numel() * (8 if init[k].dtype == torch.int64 else float_bytes) for k in allowed)
        assert payload <= record_nbytes(arrays) <= payload + 160 * len(allowed)  # + npy headers
        metrics = msg.content["metrics"]
        assert metrics["num-examples"] == metrics["num-labeled"] == 6  # one phantom patient: 6 slices
        assert metrics["num-unlabeled"] == 6
    eval_replies = [m for _, m in grid.sent if m.metadata.message_type == "evaluate"]
    assert all(set(m.content.keys()) == {"metrics"} for m in eval_replies)

    # Assert: the global model changed, and the run folder is complete
    run = tmp_path / "run"
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["round"] == 2 and set(last["method"]) == allowed
    assert any(not torch.equal(last["method"][k], init[k]) for k in allowed if init[k].is_floating_point())
    results = (run / "results.json").read_text()
    assert '"round": 2' in results and "dice_mean" in results and (run / "best.pt").is_file()
    # The core loads the global U-Net (under FedBN with its initial BatchNorm tensors)
    _, unet, _ = load_run_model(run, "last", device="cpu")
    for key, value in unet.state_dict().items():
        assert torch.equal(value, last["method"].get(f"model.{key}", init[f"model.{key}"])), key


def test_resume_gives_the_uninterrupted_model(tmp_path):
    # Prepare
    rounds = {"num-server-rounds": 4}

    # Execute: uninterrupted; then stop after round 2 and resume in a "fresh process" (no cache)
    run_federation(tmp_path / "full", **rounds)
    clear_sessions()
    run_federation(tmp_path / "part", **rounds, **{"stop-after-round": 2})
    mid = torch.load(tmp_path / "part" / "run" / "last.pt", weights_only=False)
    clear_sessions()
    run_federation(tmp_path / "part", **rounds, **{"resume-from": str(tmp_path / "part" / "run" / "last.pt")})

    # Assert
    full = torch.load(tmp_path / "full" / "run" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "part" / "run" / "last.pt", weights_only=False)
    assert mid["round"] == 2 and full["round"] == resumed["round"] == 4
    assert full["method"].keys() == resumed["method"].keys()
    for k in full["method"]:
        assert torch.equal(full["method"][k], resumed["method"][k]), k
    assert [r["round"] for r in resumed["history"]] == [1, 2, 3, 4]


def test_resume_auto_continues_the_out_dir_and_a_new_run_moves_it_aside(tmp_path):
    # Prepare: a 2-round run stopped after round 1
    rounds = {"num-server-rounds": 2}
    run_federation(tmp_path, **rounds, **{"stop-after-round": 1})
    clear_sessions()

    # Execute: resume-from=auto finishes it in place; then a new run (resume-from="") in the same out-dir
    run_federation(tmp_path, **rounds, **{"resume-from": "auto"})
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    clear_sessions()
    run_federation(tmp_path, **rounds, **{"stop-after-round": 1})

    # Assert: the resumed run stayed in place; the new run moved it aside whole and starts at round 1
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    (moved,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert json.loads((moved / "results.json").read_text()) == resumed
    assert torch.load(moved / "last.pt", weights_only=False)["round"] == 2
    new = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["round"] for r in new["rounds"]] == [1]


def test_a_federated_run_does_not_take_an_out_dir_a_live_run_holds(tmp_path, held_elsewhere):
    # Prepare: another process holds out-dir as a live run does (its config.json written)
    child = held_elsewhere(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text("{}")

    # Execute / Assert: the ServerApp refuses before it moves or writes anything there
    for resume in ("", "auto"):
        with pytest.raises(ValueError, match=rf"run: a live run \(pid {child.pid} on [^)]+\)"):
            run_federation(tmp_path, **{"resume-from": resume})
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".run.lock", "config.json"]


def test_warmup_rounds_start_the_joint_stage_at_a_round_boundary():
    from types import SimpleNamespace

    from samatch.methods.sam_guided import SamMatch

    cfg, fed = parse_run_config({"num-server-rounds": 3, "local-iterations": 10, "warmup-rounds": 1})
    assert cfg.sam.warmup_fraction == pytest.approx(1 / 3) and cfg.schedule.iterations == 30
    # round 1 = iterations 0..9 (warm-up + SAM adaptation), round 2 starts the joint stage at 10
    stub = SimpleNamespace(cfg=cfg)
    stub.joint_start = lambda: SamMatch.joint_start(stub)
    assert SamMatch.joint_start(stub) == 10
    with pytest.raises(ValueError, match="warmup-rounds"):
        parse_run_config({"num-server-rounds": 3, "warmup-rounds": 3})


def test_server_validation_scores_the_global_model_each_round(tmp_path):
    # Prepare: the server holds phantom sites 0 and 1's validation volumes
    from federation.server_eval import ServerValidation

    # Execute
    run_federation(tmp_path, **{"server-val-root": "0,1"})

    # Assert: every round has server Dice; the last equals scoring last.pt's U-Net independently
    rounds = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]
    assert [sorted(r["server-evaluate"]) for r in rounds] == [
        ["dice_LV", "dice_RV", "dice_mean", "dice_myocardium"]
    ] * 2
    cfg, fed = parse_run_config({**TINY, "server-val-root": "0,1", "model.num_classes": 4})
    val = ServerValidation.from_config(cfg, fed)
    assert len(val.cases) == 4  # 2 validation patients per phantom site
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["method"]
    assert val.evaluate(last) == pytest.approx(rounds[-1]["server-evaluate"])
    with pytest.raises(ValueError, match="3 classes|2 classes"):
        bad = {**TINY, "server-val-root": "0", "server-val-format": "phantom-lesion", "model.num_classes": 4}
        ServerValidation.from_config(*parse_run_config(bad))


def test_fedbn_resume_in_a_new_run_keeps_the_sites_batchnorm(tmp_path):
    # Prepare: FedBN, 3 rounds; the resumed run gets fresh node contexts (a new Flower run)
    fedbn = {"num-server-rounds": 3, "fedbn": True}

    def final_site_bn(root: Path) -> dict:
        return {
            site.name: torch.load(max(site.glob("local-round*.pt")), weights_only=True)
            for site in sorted((root / "sites").iterdir())
        }

    # Execute: uninterrupted; stopped after round 1 and resumed with the site folder; and without it
    run_federation(tmp_path / "full", **fedbn, **{"site-state-dir": str(tmp_path / "full" / "sites")})
    for name, state_dir in (("part", tmp_path / "part" / "sites"), ("lost", "")):
        clear_sessions()
        run_federation(tmp_path / name, **fedbn, **{"stop-after-round": 1, "site-state-dir": str(state_dir)})
        clear_sessions()
        last = str(tmp_path / name / "run" / "last.pt")
        run_federation(tmp_path / name, **fedbn, **{"resume-from": last, "site-state-dir": str(state_dir)})

    # Assert: with the folder, global model and every site's BatchNorm equal the uninterrupted run's
    full = torch.load(tmp_path / "full" / "run" / "last.pt", weights_only=False)["method"]
    part = torch.load(tmp_path / "part" / "run" / "last.pt", weights_only=False)["method"]
    lost = torch.load(tmp_path / "lost" / "run" / "last.pt", weights_only=False)["method"]
    assert all(torch.equal(full[k], part[k]) for k in full)
    bn_full, bn_part = final_site_bn(tmp_path / "full"), final_site_bn(tmp_path / "part")
    assert sorted(bn_full) == ["phantom-site0", "phantom-site1"]
    for site, tensors in bn_full.items():
        assert tensors.keys() == bn_part[site].keys() and len(tensors) > 0
        assert all(torch.equal(v, bn_part[site][k]) for k, v in tensors.items()), site
    assert sorted(p.name for p in (tmp_path / "full" / "sites" / "phantom-site0").iterdir()) == [
        "local-round0002.pt",
        "local-round0003.pt",
    ]
    # Without the folder the sites restart from their initial BatchNorm and the model differs.
    assert any(not torch.equal(full[k], lost[k]) for k in full if full[k].is_floating_point())


def test_evaluate_without_a_trained_session_builds_the_unet_alone():
    # Prepare: SAM-Match settings and a trained-like global state (every float tensor moved,
    # LoRA included), as an evaluate message to a fresh deployment process would carry.
    from federation.local import evaluate_round, get_session, initial_state

    cfg, fed = parse_run_config(
        {**TINY, "method.name": "samatch", "sam.cache_embeddings": False, "sam.lora_rank": 2}
    )
    site = site_from_node_config(phantom_nodes(2)[0], cfg, fed)
    init, _ = initial_state(cfg)
    gen = torch.Generator().manual_seed(3)
    global_state = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in init.items()
    }
    assert any(k.startswith("sam_lora.") for k in global_state)
    clear_sessions()
    try:
        # Execute: evaluate first (no SAM), then train's full session, then evaluate again.
        light = get_session(site, cfg, evaluate_only=True)
        dice_light = evaluate_round(light, global_state, {})
        full = get_session(site, cfg)
        # Assert: the U-Net alone answered first, with the Dice the full session gives.
        assert light.evaluate_only and not hasattr(light.trainer.method, "guide")
        assert not full.evaluate_only and hasattr(full.trainer.method, "guide")
        assert get_session(site, cfg, evaluate_only=True) is full  # a trained session serves
        assert evaluate_round(full, global_state, {}) == dice_light
        assert 0 <= dice_light["dice_mean"] <= 1
    finally:
        clear_sessions()


def test_a_train_round_reads_no_validation_volume_and_an_evaluation_reads_them_once():
    # Prepare: a phantom site's session, as a deployed site builds one for every message.
    from federation.local import evaluate_round, get_session, initial_state, train_round

    cfg, fed = parse_run_config(dict(TINY))
    site = site_from_node_config(phantom_nodes(2)[0], cfg, fed)
    init, _ = initial_state(cfg)
    clear_sessions()
    try:
        session = get_session(site, cfg)
        val = session.trainer.data.val

        # Execute: one train round
        train_round(session, init, {}, 1, fed)

        # Assert: the volumes were counted but not read, then read by the evaluation and kept
        assert len(val) > 0 and not val.loaded
        dice = evaluate_round(session, init, {})
        assert val.loaded and 0 <= dice["dice_mean"] <= 1
        first = val.cases()
        evaluate_round(session, init, {})
        assert val.cases() is first
    finally:
        clear_sessions()


@pytest.mark.slow
def test_samatch_round_sends_match_and_lora_b_only(tmp_path):
    # Prepare: SAM-Match with FFA-LoRA, one step on one round (LiteMedSAM on CPU is slow).
    from federation.local import initial_state

    overrides = {
        "method.name": "samatch",
        "lora-mode": "ffa",
        "num-server-rounds": 1,
        "local-iterations": 1,
        "data.max_unlabeled": 1,
        "sam.cache_embeddings": True,
        "sam.lora_rank": 2,
    }
    cfg, fed = parse_run_config({**TINY, **overrides})
    init, method = initial_state(cfg)
    allowed = set(shareable_keys(method, fed))

    # Execute
    grid, _ = run_federation(tmp_path, **overrides)

    # Assert
    lora_b = {k for k in allowed if k.startswith("sam_lora.")}
    assert lora_b and all(".lora_B." in k for k in lora_b)
    assert {k for k in init if ".lora_A." in k} and not any(".lora_A." in k for k in allowed)
    for _, msg in grid.sent:
        if msg.metadata.message_type == "train":
            assert set(msg.content["arrays"]) == allowed
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert any(not torch.equal(last["method"][k], init[k]) for k in lora_b)  # B left zero: it trained


@pytest.mark.slow
def test_two_round_samatch_federation_on_real_acdc_slices(tmp_path, acdc_root):
    # Prepare: ACDC as 3 hospitals x 1 labeled patient (the simulations/acdc3x1 manifest), SAM-Match
    # with plain LoRA averaging; tiny: 32 px, 1 unlabeled slice and 1 validation volume per site,
    # SAM embeddings computed per batch (no cache), 2 rounds x 2 local steps.
    from federation.local import initial_state

    overrides = {
        "method.name": "samatch",
        "lora-mode": "avg",
        "data.format": "acdc-h5",
        "data.root": str(acdc_root),
        "model.num_classes": 4,
        "partition-manifest": str(REPO / "simulations" / "acdc3x1" / "manifest.json"),
        "data.max_unlabeled": 1,
        "data.max_val_cases": 1,
        "sam.cache_embeddings": False,
        "sam.lora_rank": 2,
        "schedule.batch_size": 1,
        "min-train-nodes": 3,
        "min-evaluate-nodes": 3,
        "min-available-nodes": 3,
    }
    cfg, fed = parse_run_config({**TINY, **overrides})
    init, method = initial_state(cfg)
    allowed = set(shareable_keys(method, fed))

    # Execute
    run_config = {**TINY, "out-dir": str(tmp_path / "run"), **overrides}
    grid = run_inprocess(server_app, client_app, run_config, phantom_nodes(3))

    # Assert: 3 sites x 2 rounds of train replies, each exactly the U-Net plus LoRA A and B (no image,
    # label, embedding or frozen SAM tensor), float32; and the global U-Net and adapters moved.
    train = [m for _, m in grid.sent if m.metadata.message_type == "train"]
    assert len(train) == 3 * 2
    assert {k.split(".")[0] for k in allowed} == {"model", "sam_lora"}
    assert any(".lora_A." in k for k in allowed) and any(".lora_B." in k for k in allowed)
    for msg in train:
        assert set(msg.content.keys()) == {"arrays", "metrics"}
        assert set(msg.content["arrays"]) == allowed
        assert all(a.dtype in ("float32", "int64") for a in msg.content["arrays"].values())
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert last["round"] == 2
    moved = {k for k in allowed if not torch.equal(last["method"][k].float(), init[k].float())}
    assert any(k.startswith("model.") for k in moved)
    assert any(".lora_B." in k for k in moved)  # B starts at zero: it trained and was averaged


# ---- partitions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("partitioner", ["iid", "size", "labeled", "shift"])
def test_partitions_are_disjoint_by_patient_with_one_labeled_each(tmp_path, partitioner):
    # Prepare
    from samatch.config import DataConfig
    from simulations.partition import partition

    # Execute: 3 phantom sites pooled (24 train patients, 6 val) -> 3 virtual hospitals
    manifest = partition(
        DataConfig(root="0,1,2", format="phantom-cardiac", size=32), 3, partitioner, tmp_path
    )

    # Assert
    splits = manifest_site_splits(manifest)
    train = [set(s.patients["labeled"]) | set(s.patients["unlabeled"]) for s in splits]
    assert all(len(s.patients["labeled"]) == 1 for s in splits)
    assert sum(len(t) for t in train) == len(set().union(*train)) == 24
    assert sorted(len(s.patients["val"]) for s in splits) == [2, 2, 2]
    if partitioner in ("iid", "labeled", "shift"):
        assert [len(t) for t in train] == [8, 8, 8]


def manifest_site_splits(manifest: Path) -> list:
    from samatch.splits import load_splits

    return [
        load_splits(manifest.parent / s["splits_file"]) for s in json.loads(manifest.read_text())["sites"]
    ]


def test_a_federated_run_folder_is_evaluated_on_the_union_of_the_sites_validation_cases(
    busi_root, tmp_path, capsys
):
    # Prepare: real BUSI (no validation list of its own: a seeded holdout) dealt to 3 hospitals with
    # partition seed 1, while the run's data.seed stays 0 (nothing ties the two)
    from federation.outputs import RunRecorder
    from samatch.config import DataConfig, TrainConfig
    from samatch.data import open_reader, run_splits
    from simulations.partition import partition

    data = DataConfig(root=str(busi_root), format="busi")
    manifest = partition(data, 3, "iid", tmp_path / "partition", labeled_per_site=10, seed=1)
    sites = manifest_site_splits(manifest)
    run = tmp_path / "run"

    # Execute: the server's run folder, then the splits evaluate reads there
    cfg, fed = parse_run_config(
        {"partition-manifest": str(manifest), "data.root": str(busi_root), "data.format": "busi"}
    )
    RunRecorder(run, cfg, fed, splits=manifest_splits(fed.partition_manifest))
    saved = TrainConfig.load(run / "config.json").data
    reader = open_reader(saved)
    splits = run_splits(run, reader, saved)

    # Assert: every site's validation case, and none of their training cases
    trained = {c for site in sites for c in site.labeled + site.unlabeled}
    assert sorted(splits.val) == sorted(c for site in sites for c in site.val) and len(splits.val) > 0
    assert not trained & set(splits.val)
    assert sorted(splits.labeled) == sorted(c for site in sites for c in site.labeled)
    # Without splits.json: the splits data.seed makes, announced (here those of a seed-0 partition)
    (run / "splits.json").unlink()
    fallback = run_splits(run, reader, saved)
    seed0 = partition(data, 3, "iid", tmp_path / "seed0", labeled_per_site=10, seed=0)
    seed0_val = [site.val for site in manifest_site_splits(seed0)]
    assert sorted(fallback.val) == sorted(c for val in seed0_val for c in val) != sorted(splits.val)
    assert "splits.json not found: using the splits its config.json makes" in capsys.readouterr().err


def test_a_partitioned_federation_writes_its_sites_pooled_splits(tmp_path):
    # Prepare: 2 phantom hospitals dealt by simulations.partition (their splits files in the manifest)
    from samatch.config import DataConfig
    from samatch.splits import load_splits
    from simulations.partition import partition

    phantoms = DataConfig(root="0,1,2", format="phantom-cardiac", size=32)
    manifest = partition(phantoms, 2, "iid", tmp_path / "p")
    sites = manifest_site_splits(manifest)

    # Execute: the real ServerApp and ClientApps, in process
    run_federation(tmp_path, **{"partition-manifest": str(manifest), "num-server-rounds": 1})

    # Assert: the run folder's splits.json pools the sites', so evaluate scores the sites' val cases
    pooled = load_splits(tmp_path / "run" / "splits.json")
    for name in ("labeled", "unlabeled", "val"):
        assert sorted(getattr(pooled, name)) == sorted(c for site in sites for c in getattr(site, name))
    assert len(pooled.val) > 0


def test_an_ffa_run_guide_takes_the_seeded_a_matrices_it_never_sent(tmp_path):
    # Prepare: a run folder whose checkpoint holds LoRA B only (FFA-LoRA: A is drawn from the seed)
    from federation.local import initial_state
    from samatch.engine import load_run_guide
    from samatch.models.lora import lora_state_dict

    cfg, fed = parse_run_config({**TINY, "method.name": "samatch", "sam.lora_rank": 2, "lora-mode": "ffa"})
    state, method = initial_state(cfg)
    keys = shareable_keys(method, fed)
    sent = {k: torch.randn_like(state[k]) if ".lora_B." in k else state[k] for k in keys}
    assert not any(".lora_A." in k for k in sent)
    torch.save({"method": sent}, tmp_path / "best.pt")

    # Execute
    guide, loaded = load_run_guide(tmp_path, cfg, "best", "cpu")

    # Assert: B as sent, A as the sites drew it
    got = lora_state_dict(guide.sam)
    assert loaded and got.keys() == {k[len("sam_lora.") :] for k in state if k.startswith("sam_lora.")}
    for key, value in got.items():
        assert torch.equal(value, (sent if ".lora_B." in key else state)[f"sam_lora.{key}"]), key
    # Without FFA a checkpoint lacking A is refused
    plain = dataclasses.replace(cfg, sam=dataclasses.replace(cfg.sam, lora_freeze_a=False))
    with pytest.raises(KeyError, match="LoRA state mismatch"):
        load_run_guide(tmp_path, plain, "best", "cpu")


def test_manifest_site_from_node_config(tmp_path):
    from samatch.config import DataConfig
    from simulations.partition import partition

    manifest = partition(DataConfig(root="0,1,2", format="phantom-cardiac", size=32), 2, "iid", tmp_path)
    cfg, fed = parse_run_config({"data.format": "phantom-cardiac", "partition-manifest": str(manifest)})
    site = site_from_node_config({"partition-id": 1, "num-partitions": 2}, cfg, fed)
    assert site.name == "hospital1" and site.index == 1
    assert dict(site.overrides)["data.splits_file"] == str(tmp_path / "site1_splits.json")
    with pytest.raises(ValueError, match="2 sites but 3 partitions"):
        site_from_node_config({"partition-id": 0, "num-partitions": 3}, cfg, fed)


def test_a_deployed_sam_match_site_without_a_state_dir_is_warned():
    # Prepare: SAM-Match and UniMatch run configs; deployed sites with and without a state-dir, and a
    # simulated one (its process lives across messages: no warning).
    from federation.config import uncached_sam_warning

    deployed = {"data-root": "/data/A", "site-name": "hospitalA"}
    kept = {**deployed, "state-dir": "/var/fl/A"}
    simulated = {"partition-id": 0, "num-partitions": 2}

    def warning(run_config, node_config):
        cfg, fed = parse_run_config(run_config)
        return uncached_sam_warning(node_config, site_from_node_config(node_config, cfg, fed), cfg)

    samatch = {"method.name": "samatch"}

    # Execute / Assert: only the deployed SAM-Match site without a folder for its embeddings
    assert "site hospitalA: SAM-Match without a node config 'state-dir'" in warning(samatch, deployed)
    assert warning(samatch, kept) is None
    assert warning({**samatch, "sam.cache_dir": "/cache"}, deployed) is None  # the run config names one
    assert warning({**samatch, "sam.cache_embeddings": False}, deployed) is None  # nothing to cache
    assert warning({"method.name": "unimatch"}, deployed) is None
    assert warning({**samatch, "data.format": "phantom-cardiac"}, simulated) is None


@pytest.mark.parametrize(
    "toml, sites, labeled",
    [("acdc3x1.toml", 3, 1), ("busi3x10.toml", 3, 10), ("chaos3x1.toml", 3, 1)],
)
def test_ready_configs_name_existing_site_splits(toml, sites, labeled):
    # The ready configs of simulations/: every partition is a site with its own splits file and the
    # labeled budget per site the config's comment promises (index only: no pixel data read).
    from simulations.compare import load_run_config

    cfg, fed = parse_run_config(load_run_config(REPO / "simulations" / toml, [], None))
    names = set()
    for pid in range(sites):
        site = site_from_node_config({"partition-id": pid, "num-partitions": sites}, cfg, fed)
        splits = json.loads(Path(dict(site.overrides)["data.splits_file"]).read_text())
        assert len(splits["patients"]["labeled"]) == labeled and splits["patients"]["test"] == []
        names.add(site.name)
    manifest = json.loads(Path(fed.partition_manifest).read_text())
    assert manifest["labeled_per_site"] == labeled and len(names) == sites


def test_lora_average_bias_does_not_depend_on_the_reply_order():
    # Prepare: three sites' random 8x16 / 16x8 factors and unequal weights; each holds a U-Net
    # array too, which the bias ignores (and so does the order it sums the sites in).
    from itertools import permutations

    from federation import aggregate
    from federation.aggregate import canonical_order, lora_average_bias

    rng = np.random.default_rng(3)
    sites = [
        {
            "l.lora_A.x.weight": rng.standard_normal((8, 16)).astype(np.float32),
            "l.lora_B.x.weight": rng.standard_normal((16, 8)).astype(np.float32),
            "unet.w": rng.standard_normal(4).astype(np.float32),
        }
        for _ in range(3)
    ]
    weights = [0.2, 0.3, 0.5]

    # Execute: the bias under all six reply orders
    biases = {
        lora_average_bias([sites[i] for i in p], [weights[i] for i in p]) for p in permutations(range(3))
    }

    # Assert: one value, bit for bit; the order looked at the adapters only
    assert len(biases) == 1 and 0 < biases.pop() < 10
    hashed = []
    real_digest = aggregate._digest
    with pytest.MonkeyPatch.context() as m:
        m.setattr(
            aggregate, "_digest", lambda state, keys=None: hashed.append(keys) or real_digest(state, keys)
        )
        lora_average_bias(sites, weights)
    assert hashed == [{"l.lora_A.x.weight", "l.lora_B.x.weight"}] * 3
    lora = {"l.lora_A.x.weight", "l.lora_B.x.weight"}
    other = [{**s, "unet.w": -s["unet.w"]} for s in sites]

    def positions(states):
        return [
            next(i for i, s in enumerate(states) if s is x) for x in canonical_order(states, weights, lora)[0]
        ]

    assert positions(sites) == positions(other)
