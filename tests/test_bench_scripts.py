"""Each benchmark runs as the docs write it, `python benchmarks/<name>.py ...`, from any folder (they
import the project's packages, which are not installed under these names)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["bench_index.py", "bench_step.py", "bench_round.py", "op_census.py"])
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
