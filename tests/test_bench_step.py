"""benchmarks/bench_step.py: the JSON of a tiny run, and its host-side (reference) pieces against the
project's vectorised ones. No timing thresholds: the benchmark measures, it does not judge."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from samatch import allocator
from samatch.losses import dice_loss
from samatch.methods.sam_guided import SamGuidance
from samatch.prompts import boxes_from_masks, boxes_from_probs, largest_component

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "benchmarks" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.mark.slow
def test_quick_run_writes_three_modes_and_their_ratios(tmp_path):
    # Prepare: --quick, cut to batch 1 and one timed step (LiteMedSAM's encoder costs ~3 s per
    # image on one CPU thread, and the reference mode encodes 4 times per step).
    out = tmp_path / "bench.json"
    # Execute
    rc = bench.main(["--quick", "--device", "cpu", "--batch", "1", "--steps", "1", "--out", str(out)])
    # Assert
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["results"]}
    assert set(rows) == {"unimatch", "joint", "reference"}
    for r in rows.values():
        assert r["device"] == "cpu" and r["batch"] == 1
        assert math.isfinite(r["ms_median"]) and r["ms_median"] > 0
        assert r["peak_device_mib"] is None
        assert 0 < r["sample_ms_per_step"] < r["ms_median"]
        assert math.isfinite(r["ms_pipelined"]) and r["ms_pipelined"] > 0
    # The cost structure: cached embeddings and one decode (both batches) in the joint step; four encoder
    # and decoder passes in the reference.
    assert rows["joint"]["encoder_passes_per_step"] == 0 and rows["joint"]["decoder_passes_per_step"] == 1
    assert rows["reference"]["encoder_passes_per_step"] == 4
    assert rows["reference"]["decoder_passes_per_step"] == 4
    (ratio,) = result["ratios"]
    assert ratio["joint_over_unimatch"] == pytest.approx(
        rows["joint"]["ms_median"] / rows["unimatch"]["ms_median"]
    )
    assert ratio["reference_over_ours"] == pytest.approx(
        rows["reference"]["ms_median"] / rows["joint"]["ms_median"]
    )
    assert result["hardware"]["torch"] == torch.__version__ and result["hardware"]["cpu"]
    assert result["hardware"]["allocator"] == allocator.describe()  # this process's: run in-process
    # Costs and floors: four encoder passes make the reference the largest step.
    rates = result["device_rates"]["cpu"]
    assert rates["matmul_fp32_gflops"] > 0 and rates["copy_gbps"] > 0
    assert 0 < rows["unimatch"]["gflop"] < rows["joint"]["gflop"] < rows["reference"]["gflop"]
    for r in rows.values():
        assert r["floor_ms"] == pytest.approx(
            1e3 * max(r["gflop"] / rates["matmul_fp32_gflops"], r["gbytes"] / rates["copy_gbps"])
        )


def test_step_cost_counts_a_matmul_by_hand():
    from benchmarks.step_cost import BytesTouched, floor_ms, step_cost

    class OneMatmul:  # a "trainer" whose step is one (64 x 32) @ (32 x 16) product
        a, b = torch.ones(64, 32), torch.ones(32, 16)

        def step(self):
            return self.a @ self.b

    cost = step_cost(OneMatmul())
    assert cost["gflop"] * 1e9 == 2 * 64 * 32 * 16
    assert cost["gbytes"] * 1e9 == (64 * 32 + 32 * 16 + 64 * 16) * 4  # read a, b; write the product
    x = torch.ones(1000)
    with BytesTouched() as touched:
        y = x + x  # reads 2 x 4000 B, writes 4000 B
        y.view(10, 100)  # a view moves nothing
    assert touched.bytes == 12000
    assert touched.ops == 2  # the add and the view
    assert cost["ops"] == 1  # the matmul
    # 10 GFLOP at 100 GFLOP/s = 100 ms; 2 GB at 10 GB/s = 200 ms: the bytes bound.
    assert floor_ms({"gflop": 10, "gbytes": 2}, {"matmul_fp32_gflops": 100, "copy_gbps": 10}) == 200


def random_masks(gen: torch.Generator, shape=(3, 4, 24, 20), p=0.05) -> torch.Tensor:
    masks = torch.rand(shape, generator=gen) < p
    masks[0, 1] = False  # an empty mask
    masks[1, 2, -1, -1] = True  # a pixel in the last row and column
    return masks


@pytest.mark.parametrize("margin", [0, 3])
def test_numpy_boxes_equal_boxes_from_masks_and_from_probs(margin):
    gen = torch.Generator().manual_seed(margin)
    masks = random_masks(gen)
    ref_boxes, ref_valid = bench.numpy_boxes(masks.numpy(), margin)
    boxes, valid = boxes_from_masks(masks, margin)
    assert np.array_equal(valid.numpy(), ref_valid) and not ref_valid[0, 1]
    assert np.array_equal(boxes.numpy(), ref_boxes)
    # From softmax probabilities, as the Match network gives them (fp32).
    probs = torch.randn(3, 5, 24, 20, generator=gen).mul(3).softmax(1)
    boxes, valid = boxes_from_probs(probs, threshold=0.6, margin=margin)
    conf, pred = probs.max(1)
    conf_masks = np.stack([(pred == c) & (conf >= 0.6) for c in range(1, 5)], axis=1)
    ref_boxes, ref_valid = bench.numpy_boxes(conf_masks, margin)
    assert np.array_equal(valid.numpy(), ref_valid) and np.array_equal(boxes.numpy(), ref_boxes)


def test_numpy_largest_component_boxes_equal_the_device_ones():
    # Two separated rectangles of different areas per mask (a unique largest component).
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 3, 32, 32, dtype=torch.bool)
    for b in range(2):
        for k in range(3):
            y, x = torch.randint(0, 10, (2,), generator=gen).tolist()
            masks[b, k, y : y + 8, x : x + 6] = True  # 48 px
            masks[b, k, 24:27, 20 + k : 23 + k] = True  # 9 px, > 2 px away
    ref_boxes, ref_valid = bench.numpy_boxes(masks.numpy(), 2, largest=True)
    boxes, valid = boxes_from_masks(largest_component(masks), 2)
    assert np.array_equal(valid.numpy(), ref_valid) and np.array_equal(boxes.numpy(), ref_boxes)


def test_host_boxes_equal_sam_guidance_boxes():
    # Class 2 surrounds class 3; class 2 gets no prompt (sam.refine_classes = "1,3").
    stub = SimpleNamespace(
        enclosed={2: (3,)}, cfg=SimpleNamespace(box_margin=2), refine_mask=torch.tensor([True, False, True])
    )
    masks = random_masks(torch.Generator().manual_seed(1), shape=(3, 3, 64, 64))
    for all_classes in (False, True):
        boxes, valid = SamGuidance.boxes(stub, masks, largest=False, all_classes=all_classes)
        ref_boxes, ref_valid = bench.host_boxes(stub, masks, largest=False, all_classes=all_classes)
        assert torch.equal(valid, ref_valid) and torch.equal(boxes, ref_boxes)
        assert valid[:, 1].any() == all_classes


def test_sync_dice_loss_equals_dice_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, generator=gen)
    target = torch.randint(0, 4, (2, 16, 16), generator=gen)
    weight = (torch.rand(2, 16, 16, generator=gen) > 0.3).float()
    for w in (None, weight):
        expected = dice_loss(logits, target, weight_mask=w)
        assert torch.allclose(bench.sync_dice_loss(logits, target, w), expected, atol=1e-6)


def fake_time_steps(fail: dict):
    """A stand-in for bench_step.time_steps: fixed numbers per mode (unimatch 10 ms, joint 12 ms,
    reference 100 ms) and the exception ``fail`` names for a mode, raised instead of timing it."""

    def run(trainer, steps, warmup):
        if trainer.method.name == "unimatch":
            mode = "unimatch"
        else:
            mode = "reference" if type(trainer.method) is bench.ReferenceSamMatch else "joint"
        if mode in fail:
            raise fail[mode]
        return {
            "ms_median": {"unimatch": 10.0, "joint": 12.0, "reference": 100.0}[mode],
            "gflop": 1.0,
            "ms_pipelined": 1.0,
            "gbytes": 1.0,
            "sample_ms_per_step": 0.1,
            "peak_device_mib": None,
            "peak_rss_delta_mib": 0.0,
            "encoder_passes_per_step": 0.0,
            "decoder_passes_per_step": 0.0,
        }

    return run


QUICK = ["--quick", "--device", "cpu", "--batch", "1", "--steps", "1"]


@pytest.mark.slow
def test_a_case_out_of_memory_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    # Prepare: the reference case runs out of memory (as it does at batch 12 on an 80 GB GPU).
    monkeypatch.setattr(
        bench, "time_steps", fake_time_steps({"reference": torch.OutOfMemoryError("CUDA OOM")})
    )
    out = tmp_path / "bench.json"
    # Execute
    assert bench.main([*QUICK, "--out", str(out)]) == 0
    # Assert: the case is a row that says so; the ratios that need it are None, the others computed.
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["results"]}
    assert rows["reference"]["ms_median"] is None and "out of memory" in rows["reference"]["error"]
    assert "floor_ms" not in rows["reference"] and rows["joint"]["floor_ms"] > 0
    (ratio,) = result["ratios"]
    assert ratio["joint_over_unimatch"] == pytest.approx(12.0 / 10.0)
    assert ratio["reference_over_ours"] is None
    assert "incomplete" not in result
    assert "out of memory" in bench.format_table(result)


@pytest.mark.slow
def test_a_crash_keeps_the_finished_cases(tmp_path, monkeypatch):
    # Prepare: the joint case fails with an unexpected error, after the UniMatch case finished.
    monkeypatch.setattr(bench, "time_steps", fake_time_steps({"joint": RuntimeError("boom")}))
    out = tmp_path / "bench.json"
    # Execute
    with pytest.raises(RuntimeError, match="boom"):
        bench.main([*QUICK, "--out", str(out)])
    # Assert: the JSON holds the UniMatch row and says it is incomplete.
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["results"]] == ["unimatch"]
    assert result["incomplete"] is True
    assert result["ratios"] == [
        {
            "device": "cpu",
            "batch": 1,
            "amp": "fp32",
            "cuda_graph": False,
            "joint_over_unimatch": None,
            "reference_over_ours": None,
        }
    ]


def record_steps_with(monkeypatch, backends: dict) -> list:
    """bench_step's trainers record their steps through ``backends[method name]`` (tests/op_replay.py
    stands in for CUDA graphs), with one eager warm-up step per recording; returns the trainers made."""
    trainers, real_trainer = [], bench.Trainer

    def recording_trainer(cfg, *args, **kwargs):
        trainer = real_trainer(cfg, *args, graph_backend=backends[cfg.method.name], **kwargs)
        trainer.graph.warmup = 1
        trainer.graph.reset()
        trainers.append(trainer)
        return trainer

    monkeypatch.setattr(bench, "Trainer", recording_trainer)
    return trainers


@pytest.mark.slow
def test_cuda_graph_mode_times_replays_and_runs_the_reference_and_counters_eagerly(tmp_path, monkeypatch):
    # Prepare: --cuda-graph on the CPU, recording through tests/op_replay.py; one eager warm-up step
    # per recording, so of the two untimed steps the second is the recording and the timed one a replay.
    from op_replay import RecordedOps

    trainers = record_steps_with(monkeypatch, {"unimatch": RecordedOps, "samatch": RecordedOps})
    out = tmp_path / "bench.json"

    # Execute
    assert bench.main([*QUICK, "--warmup", "2", "--cuda-graph", "--out", str(out)]) == 0

    # Assert: UniMatch and the joint step each recorded once; the timed joint step was a replay (no
    # Python ran: SAM's decoder hooks saw no call), the reference ran eagerly (4 decodes, its host syncs),
    # and the counters' step dispatched operators (eagerly).
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["results"]}
    assert result["settings"]["overrides"]["schedule.cuda_graph"] is True
    assert [t.method.name for t in trainers] == ["unimatch", "samatch"]
    assert [t.graph.captures for t in trainers] == [1, 1]
    assert rows["joint"]["decoder_passes_per_step"] == 0
    assert rows["reference"]["decoder_passes_per_step"] == 4
    assert rows["joint"]["ops"] > rows["unimatch"]["ops"] > 0
    assert all(math.isfinite(r["ms_median"]) and r["ms_median"] > 0 for r in rows.values())
    # The ratios pair the replayed steps, and the eager reference with the replayed joint step.
    (ratio,) = result["ratios"]
    assert ratio["cuda_graph"] is True
    assert ratio["joint_over_unimatch"] == pytest.approx(
        rows["joint"]["ms_median"] / rows["unimatch"]["ms_median"]
    )
    assert ratio["reference_over_ours"] == pytest.approx(
        rows["reference"]["ms_median"] / rows["joint"]["ms_median"]
    )


@pytest.mark.slow
def test_a_step_that_cannot_be_recorded_is_a_row_saying_why_and_is_timed_eagerly(tmp_path, monkeypatch):
    # Prepare: the joint step's recording breaks as a CUDA capture does: an operator raises, and
    # ending the capture raises again while that is handled. UniMatch records as usual.
    from op_replay import RecordedOps

    class BrokenCapture(RecordedOps):
        def capture(self, fn):
            try:
                raise RuntimeError("operation not permitted when stream is capturing")
            finally:
                raise RuntimeError("capture invalidated")

    trainers = record_steps_with(monkeypatch, {"unimatch": RecordedOps, "samatch": BrokenCapture})
    out = tmp_path / "bench.json"

    # Execute
    assert bench.main([*QUICK, "--warmup", "2", "--cuda-graph", "--out", str(out)]) == 0

    # Assert: a row for the failed recording naming both errors and where the step was recorded, then
    # the same case timed eagerly; the ratio pairs only steps timed the same way (none here: UniMatch
    # was replayed, the joint step eager), while the reference (eager) over the eager joint step is kept.
    result = json.loads(out.read_text())
    rows = [(r["mode"], r["cuda_graph"], r["ms_median"] is not None) for r in result["results"]]
    assert rows == [
        ("unimatch", True, True),
        ("joint", True, False),
        ("joint", False, True),
        ("reference", False, True),
    ]
    assert [r.get("fallback", False) for r in result["results"]] == [False, False, True, False]
    error = result["results"][1]["error"]
    assert error.startswith(
        "not recordable as a CUDA graph: RuntimeError: capture invalidated (step_graph.py:"
    )
    assert " <- RuntimeError: operation not permitted when stream is capturing" in error
    assert trainers[1].graph is None and trainers[0].graph.captures == 1
    ratios = {q["cuda_graph"]: q for q in result["ratios"]}
    assert ratios[True]["joint_over_unimatch"] is None and ratios[False]["joint_over_unimatch"] is None
    joint_ms, reference_ms = (result["results"][i]["ms_median"] for i in (2, 3))
    assert ratios[False]["reference_over_ours"] == pytest.approx(reference_ms / joint_ms)
    table = bench.format_table(result)
    assert "| joint (graph) | not recordable as a CUDA graph" in table and "| joint (fallback) |" in table
