"""Each benchmark runs as the docs write it, `python benchmarks/<name>.py ...`, from any folder (they
import the project's packages, which are not installed under these names)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_acdc_h5

REPO = Path(__file__).resolve().parents[1]


def run_script(
    script: str, *argv: str, cwd: Path, timeout: float, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> argv...`` from ``cwd``, as the docs write it."""
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize(
    "script",
    [
        "bench_index.py",
        "bench_step.py",
        "bench_round.py",
        "op_census.py",
        "step_ab.py",
        "lc_iterations.py",
        "fork_gc.py",
        "site_cache.py",
        "sam_precision.py",
    ],
)
def test_benchmark_runs_as_a_script(script, tmp_path):
    proc = run_script(script, "--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {script}")


def test_provenance_names_the_command_that_reruns_a_benchmark(tmp_path):
    import argparse

    from benchmarks.record import provenance, write_json
    from samatch.hardware import hardware

    args = argparse.Namespace(out=tmp_path / "r.json", batch=4, run=None)
    head = provenance("train_step", "/elsewhere/benchmarks/bench_step.py", args, ["--batch", "4"])
    assert head["benchmark"] == "train_step"
    assert head["command"] == "python benchmarks/bench_step.py --batch 4"  # main(argv)'s, not pytest's
    assert head["settings"] == {"out": str(tmp_path / "r.json"), "batch": 4, "run": None}
    assert head["hardware"] == hardware() and isinstance(head["hardware"]["cpu_bf16"], bool)
    write_json(tmp_path / "new" / "r.json", head)  # the folder is made
    assert json.loads((tmp_path / "new" / "r.json").read_text()) == head


@pytest.mark.parametrize("decode", ["valid", "all"])
def test_step_ab_pairs_and_summary(tmp_path, decode):
    # Execute: a tiny run, two pairs
    out = tmp_path / "ab.json"
    argv = [
        "--decode",
        decode,
        "--size",
        "64",
        "--batch",
        "2",
        "--pairs",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    proc = run_script("step_ab.py", *argv, cwd=tmp_path, timeout=600)

    # Assert: each pair's ratio is its joint over its UniMatch time; the summary is their median
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    pairs = result["pairs"]
    assert len(pairs) == 2 and len(result["decode_fwd_bwd_s"]) == 3
    for p in pairs:
        assert p["unimatch_s"] > 0 and p["ratio"] == pytest.approx(p["joint_s"] / p["unimatch_s"])
    assert result["summary"]["ratio_median"] == pytest.approx((pairs[0]["ratio"] + pairs[1]["ratio"]) / 2)
    # 2 x 2 images x 3 foreground classes of the cardiac phantom; on the CPU only existing ones decoded,
    # unless every prompt is asked for (as a GPU decodes)
    assert result["summary"]["prompts_per_step"] == 12
    if decode == "all":
        assert result["summary"]["prompts_decoded_per_step"] == 12
    else:
        assert 0 < result["summary"]["prompts_decoded_per_step"] <= 12
    assert result["settings"]["decode"] == decode


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A supervised run on the tiny ACDC folder (1 labeled patient, 64 px, 2 iterations)."""
    from samatch.cli import main as samatch_main

    folder = tmp_path_factory.mktemp("tiny_run")
    run, data = folder / "run", write_tiny_acdc_h5(folder / "ACDC")
    argv = ["train", "--method", "supervised", "--data", str(data), "--format", "acdc-h5"]
    argv += ["--labeled", "1", "--out", str(run), "--iterations", "2", "--device", "cpu", "--quiet"]
    for s in ("data.size=64", "model.base_channels=4", "schedule.batch_size=2"):
        argv += ["--set", s]
    assert samatch_main(argv) == 0 and (run / "best.pt").is_file()
    return run


def test_a_trained_run_gives_its_real_slices_and_its_unet(tiny_run):
    # Setup
    from benchmarks.step_ab import trainer_for
    from samatch.engine import load_run_model

    # Execute: the UniMatch side of the pairs (no SAM), 3 slices per set asked for
    trainer = trainer_for("unimatch", 256, 2, "fp32", tiny_run, pool=3)

    # Assert: the run's size and U-Net; the tiny folder's labeled patient (002: 3 slices over two
    # frames, pool 3 takes all) and its 2 unlabeled slices (patients 001 and 004)
    _, model, _ = load_run_model(tiny_run, "best", "cpu")
    assert trainer.cfg.data.size == 64 and trainer.cfg.model.base_channels == 4
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert trainer.data.labeled.patient_ids == ["patient002"] * 3
    assert trainer.data.unlabeled.patient_ids == ["patient001", "patient004"]
    assert trainer.data.labeled.images.shape[-1] == 64 and trainer.data.labeled.labels is not None


def test_spread_takes_slices_evenly_over_the_set():
    # Setup: 10 slices whose pixels hold their index
    from benchmarks.step_ab import spread
    from samatch.data import SliceSet

    s = SliceSet(torch.arange(10.0).view(10, 1, 1, 1), None, [f"p{i // 4}" for i in range(10)])

    # Execute / Assert: 4 of 10 -> indices round(0, 3, 6, 9); more than there are -> all
    four = spread(s, 4)
    assert four.images.flatten().tolist() == [0.0, 3.0, 6.0, 9.0] and four.patient_ids == [
        "p0",
        "p0",
        "p1",
        "p2",
    ]
    assert len(spread(s, 50)) == 10


def test_step_ab_on_a_trained_run(tmp_path, tiny_run):
    # Execute: one pair on the run's data, every prompt decoded
    out = tmp_path / "ab.json"
    argv = ["--run", str(tiny_run), "--pool", "3", "--batch", "2", "--pairs", "1", "--warmup", "0"]
    argv += ["--decode", "all", "--threads", "1", "--out", str(out)]
    proc = run_script("step_ab.py", *argv, cwd=tmp_path, timeout=600)

    # Assert: the run's size and data named; 2 x 2 images x 3 classes decoded
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["size"] == 64 and summary["data"] == f"{tiny_run} (acdc-h5)"
    assert summary["prompts_decoded_per_step"] == summary["prompts_per_step"] == 12

    # And a size other than the run's is refused
    bad = run_script("step_ab.py", "--run", str(tiny_run), "--size", "128", cwd=tmp_path, timeout=300)
    assert bad.returncode != 0 and "trained at 64" in bad.stderr


def test_sam_precision_compares_the_same_inputs_in_both_precisions(tiny_run):
    # Setup: a SAM-Match trainer on the tiny run's slices (3 labeled, 2 unlabeled), past its warm-up
    from benchmarks.sam_precision import batches, compare, sam_part
    from benchmarks.step_ab import trainer_for

    trainer = trainer_for("samatch", 64, 2, "fp32", tiny_run, pool=3)
    b = next(batches(trainer, 2))
    trainer.method.iteration = trainer.iteration

    # Execute: the SAM part twice in fp32 with one seed, once in bf16; then the whole comparison
    first, again = (sam_part(trainer.method, b, "fp32", seed=0) for _ in range(2))
    bf16 = sam_part(trainer.method, b, "bf16", seed=0)
    result = compare(trainer, 2)

    # Assert: fp32 twice gives the same labels, losses and gradient (the jittered boxes drawn alike), so
    # what differs in bf16 is the decoder's precision; the comparison's one batch (2 unlabeled slices)
    # is summarised from its row
    assert torch.equal(first["label"], again["label"]) and torch.equal(first["grad"], again["grad"])
    assert first["loss_sam_x"] == again["loss_sam_x"] and first["loss_sam_x"] > 0
    assert bf16["loss_sam_x"] != first["loss_sam_x"]
    assert bf16["loss_sam_x"] == pytest.approx(first["loss_sam_x"], rel=0.05)
    (row,) = result["rows"]
    summary = result["summary"]
    assert summary["slices"] == 2 and summary["grad_cosine_min"] == row["grad_cosine"] > 0.9
    assert row["loss_sam_x_fp32"] == first["loss_sam_x"]  # the same seed per batch as above
    changed = float((first["label"] != bf16["label"]).float().mean())
    assert summary["pseudo_label_pixels_changed"] == changed  # batch 0 with seed 0, as above
    assert row["grad_cosine_other_jitter"] < 0.99  # the reference: another draw of the labeled boxes

    # And a trainer still in the warm-up is refused: its pseudo-labels would not come from SAM
    trainer.iteration = 0
    with pytest.raises(ValueError, match="warm-up"):
        compare(trainer, 2)


def test_adapt_trains_only_the_lora_adapters_by_adams_steps(tiny_run):
    # Setup: a SAM-Match trainer on the tiny run; LoRA's B starts at zero
    from benchmarks.sam_precision import adapt
    from benchmarks.step_ab import trainer_for

    trainer = trainer_for("samatch", 64, 2, "fp32", tiny_run, pool=3)
    unet = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    # Execute: three steps
    result = adapt(trainer, 3, 2)

    # Assert: B moved, by at most AdamW's step size (sam.lr = 1e-4) per step; the U-Net untouched
    assert len(result["loss_first_10"]) == 3 and result["steps"] == 3
    assert 0 < result["lora_b_abs_mean"] <= 3 * 1e-4 * 1.01
    assert all(torch.equal(v, unet[k]) for k, v in trainer.model.state_dict().items())


def test_sam_precision_script_on_a_trained_run(tmp_path, tiny_run):
    out = tmp_path / "precision.json"
    argv = ["--run", str(tiny_run), "--pool", "3", "--batch", "2", "--adapt-steps", "2", "--out", str(out)]
    proc = run_script("sam_precision.py", *argv, cwd=tmp_path, timeout=600)

    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["summary"]["slices"] == 2 and len(result["rows"]) == 1
    assert result["settings"]["run"] == str(tiny_run) and "pseudo-label pixels changed" in proc.stdout
    assert result["adapt"]["steps"] == 2 and result["adapt"]["lora_b_abs_mean"] > 0

    # And a pool smaller than a batch is a one-line error
    small = run_script(
        "sam_precision.py", *argv[:4], "--batch", "4", "--adapt-steps", "0", cwd=tmp_path, timeout=600
    )
    assert small.returncode == 2 and "fewer than --batch 4 slices in a pool" in small.stderr


def test_fork_gc_children_inherit_the_heap_as_each_setting_leaves_it(tmp_path):
    # Execute: one trial per setting (each a fresh process: the warm-up drops the project's modules)
    out = tmp_path / "fork_gc.json"
    proc = run_script("fork_gc.py", "--repeat", "1", "--out", str(out), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    # Assert: only the frozen setting's child inherited frozen objects: the objects the collector
    # tracked after collecting (torch's, flwr's, peft's: over 100,000), less the few freeze_heap's own
    # collection still frees; the collector ran within the build.
    result = json.loads(out.read_text())
    children = {c["setting"]: c for c in result["children"]}
    assert list(children) == ["imported", "collected", "frozen"]
    assert children["imported"]["frozen"] == children["collected"]["frozen"] == 0
    tracked = children["frozen"]["objects_tracked"]
    assert 0.99 * tracked <= children["frozen"]["frozen"] <= tracked
    assert tracked > 100_000
    for child in children.values():
        assert 0 <= child["gc_s"] <= child["build_s"] and child["collections"] > 0
        assert child["full_collection_s"] > 0
    assert set(result["summary"]) == {"imported", "collected", "frozen"}


def test_site_cache_times_each_path_on_a_dataset_folder(tiny_acdc_h5, tmp_path):
    # Execute: the tiny ACDC folder (5 training slices of 3 patients), 1 labeled patient
    out = tmp_path / "site_cache.json"
    argv = ["--root", str(tiny_acdc_h5), "--format", "acdc-h5", "--labeled", "1", "--size", "32"]
    scratch = tmp_path / "scratch"  # its temporary folders
    scratch.mkdir()
    env = os.environ | {"TMPDIR": str(scratch)}
    proc = run_script(
        "site_cache.py", *argv, "--repeat", "2", "--out", str(out), cwd=tmp_path, timeout=300, env=env
    )

    # Assert: every slice counted once, each timing repeated, the summary their medians; no cache left behind
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["slices"]["labeled"] + result["slices"]["unlabeled"] == 5
    data, emb, summary = result["data_s"], result["embeddings_s"], result["summary"]
    assert len(data["no_cache"]) == len(data["cache_kept"]) == len(emb["per_slice_files"]) == 2
    assert summary["data_cache_kept_lazy_validation_s"] == pytest.approx(
        sum(data["cache_kept_lazy_validation"]) / 2
    )
    assert summary["data_no_cache_s"] == pytest.approx(sum(data["no_cache"]) / 2)
    assert summary["embedding_set_file_s"] == pytest.approx(sum(emb["set_file_with_keys"]) / 2)
    assert all(
        t > 0 for t in [*data["no_cache"], *data["cache_kept"], data["cache_first"], emb["first_write"]]
    )
    assert Path(result["cache_folder"]).parent == scratch and not list(scratch.iterdir())
