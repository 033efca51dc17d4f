"""One real `flwr run .` (local simulation through scripts/flwr_run.sh) in a subprocess.

Private FLWR_HOME and port; bounded in time; afterwards no process started by it may survive: every
such process inherits FLWR_HOME, so any leftover is found in /proc, killed by PID, and fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deploy.procs import free_port, processes_with_env
from samatch import allocator

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process bookkeeping needs /proc")
def test_flwr_run_local_simulation(tmp_path):
    # Prepare
    home = tmp_path / "flwr_home"
    out = tmp_path / "run"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "NUM_HOSPITALS": "2",
        "RUN_TIMEOUT": str(TIMEOUT - 30),
    }
    overrides = (
        f"num-server-rounds=2 local-iterations=2 data.size=32 model.base_channels=4 "
        f'schedule.batch_size=2 data.max_unlabeled=2 out-dir="{out}" sam.cache_dir="{tmp_path / "emb"}"'
    )  # the embedded default's method (SAM-Match), on a smaller schedule

    # Execute
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "flwr_run.sh"), "-c", overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
    finally:
        # Give exiting processes a moment (a loaded machine is slow to reap them), then look.
        for _ in range(20):
            leftovers = processes_with_env(str(home))
            if not leftovers:
                break
            time.sleep(0.5)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # Assert
    assert proc.returncode == 0, log[-4000:]
    assert "round 2/2: val Dice" in log and "finished:completed" in log
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    # keep-global in Ray's simulation: round 2's training used the copies kept from round 1's evaluation
    assert results["rounds"][1]["train-instructions"] == {"with-arrays": 0, "kept-global": 2, "resent": 0}
    assert all(len(r["train-sites"]["accepted"]) == 2 for r in results["rounds"])
    assert (home / "config.toml").is_file()
    assert "train-loss_sam_x" in log  # SAM-Match ran (the default method), with SAM's own loss
    # The SuperLink's environment reached Ray's workers: each ClientApp on the allocator the script chose
    if allocator.library("mimalloc") is not None and allocator.preloaded(os.environ) == "system":
        assert "host allocator: mimalloc (freed pages kept)" in log, log[-4000:]
        assert "host allocator: the system's malloc" not in log
    # one embedding file per slice: 6 labeled (one phantom patient) + 2 unlabeled, per hospital
    assert len(list((tmp_path / "emb").glob("*.pt"))) == 2 * (6 + 2)
    assert not leftovers, f"processes left running: {leftovers}"


def test_a_bad_allocator_choice_stops_the_script_before_it_starts_anything(tmp_path):
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FEDSAMATCH_ALLOCATOR": "nope"}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "flwr_run.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "allocator 'nope': choose one of auto, system, mimalloc, jemalloc" in proc.stderr
    assert not (tmp_path / "home" / "local-superlink" / "superlink.log").exists()  # no SuperLink started
