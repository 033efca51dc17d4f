"""Each benchmark runs as the docs write it, `python benchmarks/<name>.py ...`, from any folder (they
import the project's packages, which are not installed under these names)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script",
    ["bench_index.py", "bench_step.py", "bench_round.py", "op_census.py", "step_ab.py", "lc_iterations.py"],
)
def test_benchmark_runs_as_a_script(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {script}")


def test_step_ab_pairs_and_summary(tmp_path):
    # Execute: a tiny run, two pairs
    out = tmp_path / "ab.json"
    argv = [
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
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_ab.py"), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )

    # Assert: each pair's ratio is its joint over its UniMatch time; the summary is their median
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    pairs = result["pairs"]
    assert len(pairs) == 2 and len(result["decode_fwd_bwd_s"]) == 3
    for p in pairs:
        assert p["unimatch_s"] > 0 and p["ratio"] == pytest.approx(p["joint_s"] / p["unimatch_s"])
    assert result["summary"]["ratio_median"] == pytest.approx((pairs[0]["ratio"] + pairs[1]["ratio"]) / 2)
    # 2 x 2 images x 3 foreground classes of the cardiac phantom; on the CPU only existing ones decoded
    assert result["summary"]["prompts_per_step"] == 12
    assert 0 < result["summary"]["prompts_decoded_per_step"] <= 12
