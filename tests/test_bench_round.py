"""benchmarks/bench_round.py: the JSON of a quick in-process run and the invariants of its numbers
(bytes against the tensors' nbytes, fp16 against fp32, overhead = wall - training - evaluation), and
its pieces on hand-made inputs. No timing thresholds: the benchmark measures, it does not judge."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from benchmarks import round_inprocess
from federation.config import parse_run_config
from federation.local import initial_state
from federation.state import shareable_keys

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-6  # seconds: float sums of perf_counter differences


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_round", REPO / "benchmarks" / "bench_round.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_round") / "bench.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def tensor_bytes(method: str, transport: str) -> tuple[int, int]:
    """(float, integer) bytes of the tensors a site sends, from the model itself."""
    cfg, fed = parse_run_config(
        {"model.base_channels": 16, "data.format": "phantom-cardiac", **bench.METHODS[method]}
    )
    state, model = initial_state(cfg)
    keys = shareable_keys(model, fed)
    half = 2 if transport == "fp16" else 1
    floats = sum(state[k].nbytes // half for k in keys if state[k].is_floating_point())
    return floats, sum(state[k].nbytes for k in keys if not state[k].is_floating_point())


def payload(result: dict, method: str, transport: str, pack: bool = False) -> dict:
    (row,) = [
        p for p in result["payloads"] if (p["method"], p["transport"], p["pack"]) == (method, transport, pack)
    ]
    return row


def test_quick_run_json_structure(quick):
    assert quick["benchmark"] == "federation_round" and quick["scale"]["base_channels"] == 16
    assert quick["hardware"]["cores"] >= 1 and len(quick["load_average_1min"]) == 2
    assert {(p["method"], p["transport"], p["pack"]) for p in quick["payloads"]} == {
        (m, t, pack) for m in bench.METHODS for t in ("fp32", "fp16") for pack in (False, True)
    }
    assert [c["name"] for c in quick["cases"]] == ["inprocess unimatch fp32", "inprocess unimatch fp16"]
    for case in quick["cases"]:
        assert "error" not in case
        assert [r["round"] for r in case["rounds"]] == [1, 2]
        assert set(case["summary"]["breakdown"]) == {f"{k}_s" for k in round_inprocess.BREAKDOWN}
        assert set(case["goals"]) == {"overhead_below_2s", "up_below_8MB", "down_below_8MB"}
    assert "| inprocess | unimatch | fp16 | no |" in bench.format_table(quick)


@pytest.mark.parametrize("method", list(bench.METHODS))
def test_payload_bytes_are_the_tensors_nbytes(quick, method):
    for transport in ("fp32", "fp16"):
        floats, ints = tensor_bytes(method, transport)
        for pack in (False, True):
            row = payload(quick, method, transport, pack)
            assert (row["float_bytes"], row["int_bytes"]) == (floats, ints)
            assert row["tensor_bytes"] == floats + ints <= row["payload_bytes"] <= row["wire_bytes"] + 1024
    # fp16 halves the float bytes exactly and leaves the integer buffers (int64) as they are.
    fp32, fp16 = payload(quick, method, "fp32"), payload(quick, method, "fp16")
    assert fp16["float_bytes"] * 2 == fp32["float_bytes"] and fp16["int_bytes"] == fp32["int_bytes"] > 0
    assert fp16["tensors"] == fp32["tensors"]
    # Packed: one Array (+ its chunks) instead of one Array and one chunk per distinct tensor.
    assert payload(quick, method, "fp32", True)["wire_objects"] < 10 < fp32["wire_objects"]


def test_lora_modes_add_a_and_b_or_b_only(quick):
    uni, avg, ffa = (payload(quick, m, "fp32") for m in ("unimatch", "samatch-avg", "samatch-ffa"))
    lora_ab, lora_b = avg["float_bytes"] - uni["float_bytes"], ffa["float_bytes"] - uni["float_bytes"]
    assert 0 < lora_b < lora_ab
    assert avg["tensors"] - uni["tensors"] == 2 * (ffa["tensors"] - uni["tensors"])  # one A and one B each


def test_inprocess_rounds_add_up(quick):
    for case in quick["cases"]:
        for r in case["rounds"]:
            parts = (r["wall_s"], r["train_s"], r["evaluate_s"], r["overhead_s"], *r["breakdown"].values())
            assert all(v >= -TOL for v in parts), r
            assert r["overhead_s"] == pytest.approx(r["wall_s"] - r["train_s"] - r["evaluate_s"], abs=TOL)
            assert sum(r["breakdown"].values()) == pytest.approx(r["overhead_s"], abs=TOL)
            assert r["evaluated"] and r["train_s"] > 0 and r["evaluate_s"] > 0


@pytest.mark.parametrize("transport", ["fp32", "fp16"])
def test_measured_bytes_per_site_equal_the_replies_tensors(quick, transport):
    (case,) = [c for c in quick["cases"] if c["transport"] == transport]
    expected = payload(quick, "unimatch", transport)
    for r in case["rounds"]:
        sites = r["bytes_per_site"]
        assert len(sites) == quick["scale"]["sites"]
        for site in sites.values():
            # Up: the train reply; down: the train and the evaluate instructions, the global state
            # twice in round 1, once afterwards (keep-global: training uses the evaluated copy).
            assert site["messages_down"] == 2
            assert site["up_tensor_bytes"] == expected["tensor_bytes"]
            assert site["up_int_bytes"] == expected["int_bytes"]
            assert site["up_payload_bytes"] == expected["payload_bytes"]
            down = 2 if r["round"] == 1 else 1
            assert site["down_tensor_bytes"] == down * expected["tensor_bytes"]
    assert case["summary"]["up_bytes_per_site"] == expected["payload_bytes"]


def test_fp16_engine_sends_half_the_float_bytes(quick):
    fp32, fp16 = (c["rounds"][-1]["bytes_per_site"] for c in quick["cases"])
    for a, b in zip(fp32.values(), fp16.values(), strict=True):
        assert b["up_float_bytes"] * 2 == a["up_float_bytes"] and b["up_int_bytes"] == a["up_int_bytes"]
        assert b["down_float_bytes"] * 2 == a["down_float_bytes"]


def test_clock_counts_nested_calls_once(monkeypatch):
    # Prepare: a clock that ticks 1 s per reading.
    ticks = iter(range(100))
    monkeypatch.setattr(round_inprocess.time, "perf_counter", lambda: float(next(ticks)))
    clock = round_inprocess.Clock()
    inner = clock.wrap("inner", lambda: None)
    outer = clock.wrap("outer", lambda: inner())

    # Execute: outer starts at 0, inner runs 1..2, outer ends at 3.
    outer()

    # Assert: exclusive seconds (outer 3 - 1), and the window selects by start time.
    assert clock.seconds(0, 10) == {"outer": 2.0, "inner": 1.0}
    assert clock.seconds(1, 10) == {"inner": 1.0}


def round_row(r: int, seconds: float, train: float, evaluate: float | None = None, instructions=None) -> dict:
    """One round of a results.json: finished at ``seconds``, the sites' mean train (and evaluate)
    seconds, the server's train-instructions count."""
    row = {"round": r, "seconds": seconds, "train": {"train-seconds": train}}
    if evaluate is not None:
        row["evaluate"] = {"evaluate-seconds": evaluate}
    if instructions is not None:
        row["train-instructions"] = instructions
    return row


def computed_rows(results: dict, waves: int) -> tuple[list[dict], list[tuple]]:
    """results_rounds + computed_bytes (a payload of 100 tensor / 120 serialised bytes): the rows and
    their (wall, train, evaluate, overhead) seconds."""
    rows = bench.results_rounds(results, waves=waves)
    bench.computed_bytes({"tensor_bytes": 100, "payload_bytes": 120}, rows)
    return rows, [(r["wall_s"], r["train_s"], r["evaluate_s"], r["overhead_s"]) for r in rows]


def test_results_rounds_from_a_results_json():
    # Prepare: three rounds of a parallel engine; round 2 without federated evaluation; round 3's
    # train instructions without arrays (keep-global after an evaluation).
    results = {
        "rounds": [
            round_row(1, 10.0, 2.0, evaluate=1.0),
            round_row(2, 14.0, 1.5),
            round_row(3, 20.0, 1.0, evaluate=1.0, instructions={"with-arrays": 0, "kept-global": 2}),
        ]
    }

    # Execute: two waves (the sites take turns)
    rows, seconds = computed_rows(results, waves=2)

    # Assert
    assert seconds == [
        (10.0, 4.0, 2.0, 4.0),
        (4.0, 3.0, 0.0, 1.0),
        (6.0, 2.0, 2.0, 2.0),
    ]
    assert rows[0]["bytes_per_site"]["all"]["down_payload_bytes"] == 240  # train + evaluate
    assert rows[1]["bytes_per_site"]["all"]["down_payload_bytes"] == 120
    assert rows[2]["bytes_per_site"]["all"]["down_payload_bytes"] == 120  # evaluate only
    assert rows[2]["bytes_per_site"]["all"]["messages_down"] == 2
    assert bench.summarize(rows)["overhead_s"] == 1.5  # warm rounds only: median of 1 and 2


def test_results_rounds_under_evaluate_then_train():
    # Prepare: three rounds evaluated; rounds 2 and 3 were trained by the instructions that went out
    # with rounds 1's and 2's evaluations, so their training ran inside rounds 1's and 2's wall time.
    def ridden(r):
        return {"with-arrays": 2, "kept-global": 0, "resent": 0, "with-evaluation-of-round": r}

    results = {
        "rounds": [
            round_row(1, 10.0, 2.0, evaluate=1.0),
            round_row(2, 16.0, 1.5, evaluate=0.5, instructions=ridden(1)),
            round_row(3, 19.0, 1.0, evaluate=0.5, instructions=ridden(2)),
        ]
    }

    # Execute: one wave
    rows, seconds = computed_rows(results, waves=1)

    # Assert: round 1 = its own training + round 2's; round 2 = round 3's; round 3 = none (its last
    # evaluation went alone); one message down per round after the first
    assert seconds == [
        (10.0, 3.5, 1.0, 5.5),
        (6.0, 1.0, 0.5, 4.5),
        (3.0, 0.0, 0.5, 2.5),
    ]
    assert [r["bytes_per_site"]["all"]["messages_down"] for r in rows] == [2, 1, 1]
    assert [r["bytes_per_site"]["all"]["down_payload_bytes"] for r in rows] == [240, 120, 120]


def with_sites(row: dict, train: dict | None = None, evaluate: dict | None = None) -> dict:
    """``row`` with the server's per-site metrics: node id -> train (evaluate) seconds."""
    for phase, seconds in (("train", train), ("evaluate", evaluate)):
        if seconds is not None:
            key = f"{phase}-seconds"
            row[f"{phase}-sites"] = {
                "metrics": {n: {key: v, "num-examples": 1.0} for n, v in seconds.items()}
            }
    return row


def test_results_rounds_wait_for_the_slowest_site():
    # Prepare: two sites, evaluate-then-train. Round 1: its own training (site 1: 2.0 s, site 2:
    # 3.0 s), then one message per site evaluating round 1 (0.5 / 0.1 s) and training round 2
    # (2.0 / 2.2 s). Round 2: its evaluation alone (0.2 / 0.4 s). The means are the server's: round 1's
    # training weighted by the sites' examples (2.6, not 2.5), the others plain.
    ridden = {"with-arrays": 2, "kept-global": 0, "resent": 0, "with-evaluation-of-round": 1}
    results = {
        "rounds": [
            with_sites(round_row(1, 10.0, 2.6, evaluate=0.3), {"1": 2.0, "2": 3.0}, {"1": 0.5, "2": 0.1}),
            with_sites(round_row(2, 13.0, 2.1, 0.3, ridden), {"1": 2.0, "2": 2.2}, {"1": 0.2, "2": 0.4}),
        ]
    }

    # Execute
    rows, seconds = computed_rows(results, waves=1)

    # Assert: round 1 = site 2's own training 3.0, then the message of site 1 (0.5 + 2.0 = 2.5 s,
    # against site 2's 0.1 + 2.2 = 2.3 s): train 5.0, evaluate 0.5, overhead 10 - 5.5. Not the
    # slowest part of each (3.0 + 2.2 + 0.5 = 5.7). Round 2: site 2's evaluation, 3 - 0.4.
    assert seconds == [(10.0, 5.0, 0.5, pytest.approx(4.5)), (3.0, 0.0, 0.4, pytest.approx(2.6))]
    # The server's means instead: 10 - (2.6 + 0.3 + 2.1) and 3 - 0.3
    assert [r["overhead_mean_s"] for r in rows] == [pytest.approx(5.0), pytest.approx(2.7)]
    # Sites taking turns (2 waves): twice the server's means, as without per-site seconds
    _, turns = computed_rows(results, waves=2)
    assert turns[0] == (10.0, pytest.approx(2 * 4.7), pytest.approx(0.6), pytest.approx(0.0))
    # A site whose seconds are missing (a reply without the key): the means for the whole round
    del results["rounds"][0]["evaluate-sites"]["metrics"]["2"]["evaluate-seconds"]
    _, means = computed_rows(results, waves=1)
    assert means[0] == (10.0, pytest.approx(4.7), pytest.approx(0.3), pytest.approx(5.0))


def test_select_cases_by_engine_and_method():
    # The SAM-Match deployment cases alone: the default, then with Flower's 1 s object retry
    samatch = bench.select_cases(["deploy"], quick=False, methods=["samatch-avg"])
    assert samatch == [
        bench.Case("deploy", "samatch-avg", "fp32", pack=True, evaluate_then_train=True),
        bench.Case("deploy", "samatch-avg", "fp32", pack=True, evaluate_then_train=True, pull_retry_s=1.0),
    ]
    assert [c.supernode for c in samatch] == ["warm, poll 0.5 s", "warm, poll 0.5 s, object retry 1 s"]
    deploy = bench.select_cases(["deploy"], quick=False)
    assert {c.engine for c in deploy} == {"deploy"} and len(deploy) == 6
    # the deployment's default and Flower 1.42's own runtime, by name
    chosen = bench.select_cases(["deploy"], quick=False, methods=["unimatch"], only="then-train")
    assert [c.name for c in chosen] == [
        "deploy unimatch fp32 packed evaluate-then-train (warm, poll 0.5 s)",
        "deploy unimatch fp32 packed evaluate-then-train "
        "(fresh, poll 3 s, reply check 0.5 s, object retry 1 s)",
    ]


def test_warm_processes_read_from_the_supernode_logs(tmp_path):
    # Prepare: two sites' logs as deploy/warm.py writes them, and another log that is not a SuperNode's
    (tmp_path / "supernode-hospitalA.log").write_text(
        "warm server 10: forked flwr-clientapp process 11\n"
        "warm server 10: process 11 exited 0 after 0.80 s\n"
        "warm server 10: process 12 exited 0 after 1.20 s\n"
    )
    (tmp_path / "supernode-hospitalB.log").write_text("warm server 20: process 21 exited 1 after 3.00 s\n")
    (tmp_path / "superlink.log").write_text("warm server 30: process 31 exited 0 after 9.00 s\n")

    # Execute
    seen = bench.warm_processes(tmp_path)

    # Assert: 3 processes, median of (0.8, 1.2, 3.0) = 1.2, one failed
    assert seen == {"count": 3, "failed": 1, "median_s": 1.2, "max_s": 3.0}
    assert bench.warm_processes(tmp_path / "nothing") is None


def test_runs_of_a_case_are_gathered_by_name():
    # Prepare: case a ran three times, case b once, case c failed once
    def row(name, overhead):
        return {"name": name, "summary": {} if overhead is None else {"overhead_s": overhead}}

    cases = [row("a", 2.0), row("b", 5.0), row("a", 1.5), row("c", None), row("a", 3.0)]

    # Execute / Assert: only cases with more than one run, in their order
    assert bench.runs_of(cases) == {"a": [2.0, 1.5, 3.0]}
    keys = {
        "engine": "deploy",
        "method": "unimatch",
        "transport": "fp32",
        "pack": True,
        "warm": True,
        "poll_s": 0.5,
    }
    table = "\n".join(bench.cases_table([{**c, **keys} for c in cases]))
    assert "a: overhead median 2.00 s over 3 runs (1.50-3.00)" in table
