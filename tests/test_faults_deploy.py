"""Faults on a real loopback deployment (TLS, SuperNode authentication), each bounded in time and
each stopping every process it started (:mod:`deploy.faults`; the drills print what they checked):

* a SuperNode SIGKILLed while training: the round ends with the other sites after the straggler
  timeout, training goes on, the site rejoins in a later round;
* the SuperLink with its ServerApp SIGKILLed after round 1 and started again: relaunching the same
  `deploy run` resumes at round 2 and ends with the model of an uninterrupted run;
* a site whose data folder is missing and one with a truncated file: both reply with an error that
  names the folder / file, only the healthy site is aggregated, the run completes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.faults import bad_site_data, superlink_restarted, supernode_killed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="process bookkeeping needs /proc"),
]


def test_supernode_killed_mid_round_rejoins_later(tmp_path):
    # Execute: 3 sites, 2 rounds, min-train-replies=2, straggler-timeout=60 s; C killed in round 1
    drill = supernode_killed(tmp_path, compare=False)  # (Dice vs fault-free: docs/reliability.md)

    # Assert
    checks = drill.checks
    assert checks["run exit code"] == 0 and drill.rounds == [1, 2]
    assert checks["round 1 accepted sites"] == 2
    assert checks["round 1 finished s after the kill"] < 90  # bounded: no wait for the dead node
    assert checks["rounds the killed site took part in again"], "the killed site never rejoined"
    assert checks["rounds the killed site took part in again"] == [2]
    assert checks["SuperNode connections of the killed site"] >= 2
    assert not checks["processes left"]


def test_superlink_restart_resumes_from_the_last_completed_round(tmp_path):
    # Execute: 2 sites, 2 rounds; the SuperLink tree killed once round 1 is saved
    drill = superlink_restarted(tmp_path)

    # Assert
    checks = drill.checks
    assert checks["rounds saved before the kill"] == [1]
    assert checks["first launch exit code (interrupted)"] != 0
    assert checks["relaunch exit code"] == 0 and checks["relaunch resumed at round"] == 1
    assert drill.rounds == [1, 2]
    reconnected = checks["SuperNode connections per site (1 = reconnected without restart)"]
    assert all(n == 1 for n in reconnected.values())
    # bit for bit the model of an uninterrupted run (same seeds, same torch threads, 2 sites)
    assert checks["max |w - w_fault_free|"] == 0.0
    assert drill.dice == drill.baseline_dice
    assert not checks["processes left"]


def test_site_with_missing_or_corrupt_data_is_reported_and_skipped(tmp_path):
    # Execute: A healthy, B's folder missing, C holds a truncated NIfTI; 1 round, min-train-replies=1
    drill = bad_site_data(tmp_path, compare=False)

    # Assert
    checks = drill.checks
    assert checks["run exit code"] == 0 and drill.rounds == [1]
    assert checks["accepted"] == checks["expected accepted"]
    missing = checks["error of hospitalB"]
    corrupt = checks["error of hospitalC"]
    assert missing == f"site hospitalB: cannot load its data: {checks['missing folder']}: folder not found"
    prefix = f"site hospitalC: cannot load its data: {checks['corrupt file']}: cannot read NIfTI"
    assert corrupt.startswith(prefix)
    assert not checks["processes left"]
