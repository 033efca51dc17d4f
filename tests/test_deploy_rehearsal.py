"""The local rehearsal, end to end, exactly as docs/deployment.md gives it: `python -m deploy
rehearse` starts a SuperLink (TLS, SuperNode authentication, state database) and three SuperNodes
on 127.0.0.1, each reading its own NIfTI folder, runs the federation to the end and stops every
process. Checked here: the exit code, the run folder, that every site's update was aggregated in
every round, that nothing is left running, and that each command it ran is in the docs."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from samatch import allocator

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 420
MARKER = "FEDSAMATCH_TEST_REHEARSAL"

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="process bookkeeping needs /proc")


def processes_with(needle: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def documented_commands() -> list[list[str]]:
    """Every `python -m deploy ...` command of docs/deployment.md, continuation lines joined."""
    text = (REPO / "docs" / "deployment.md").read_text().replace("\\\n", " ")
    return [
        shlex.split(line.strip())
        for line in text.splitlines()
        if line.strip().startswith("python -m deploy ")
    ]


@pytest.mark.slow
def test_rehearsal_command_runs_a_secure_federation_to_the_end(tmp_path):
    # Prepare
    tag = uuid.uuid4().hex
    env = {**os.environ, MARKER: tag}

    # Execute: the command of the docs
    argv = [sys.executable, "-m", "deploy", "rehearse", "--dir", str(tmp_path)]
    t0 = time.monotonic()
    out = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(argv, cwd=REPO, env=env, start_new_session=True, **out)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the rehearsal stops what it started on SIGTERM
        log, _ = proc.communicate(timeout=60)
    finally:
        for _ in range(20):
            leftovers = processes_with(f"{MARKER}={tag}".encode())
            if not leftovers:
                break
            time.sleep(0.5)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    took = time.monotonic() - t0

    # Assert: passed, all rounds, every site every round, Dice evaluated, nothing left
    print(f"checked: `python -m deploy rehearse` exit {proc.returncode} in {took:.0f} s")
    assert proc.returncode == 0 and "rehearsal: PASSED" in log, log[-5000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [len(r["train-sites"]["accepted"]) for r in rounds] == [3, 3]
    assert not any(r["train-sites"]["rejected"] or r["train-sites"]["failed"] for r in rounds)
    # each site's own metrics, by node id: the server knows which site trained how long
    for r in rounds:
        sites = r["train-sites"]
        assert sorted(sites["metrics"]) == sorted(map(str, sites["accepted"]))
        assert all(m["train-seconds"] > 0 for m in sites["metrics"].values())
    # evaluate-then-train across real SuperNodes: round 2's training went out with round 1's evaluation
    assert rounds[1]["train-instructions"] == {
        "with-arrays": 3,
        "kept-global": 0,
        "resent": 0,
        "with-evaluation-of-round": 1,
    }
    assert len(rounds[0]["evaluate-sites"]["accepted"]) == 3
    assert 0.0 <= rounds[-1]["evaluate"]["dice_mean"] <= 1.0
    assert (tmp_path / "run" / "best.pt").is_file() and (
        tmp_path / "coordinator" / "state" / "state.db"
    ).is_file()
    link_log = (tmp_path / "logs" / "superlink.log").read_text()
    assert "--enable-supernode-auth" in link_log and "Uvicorn running on https://127.0.0.1" in link_log
    on_mimalloc = allocator.resolve(allocator.default_choice()) == "mimalloc"  # deploy supernode's default
    for site in ("hospitalA", "hospitalB", "hospitalC"):
        node_log = (tmp_path / "logs" / f"supernode-{site}.log").read_text()
        # deploy supernode --warm (the default): every message's ClientApp was forked warm
        started = node_log.count("Start `flwr-clientapp` process")
        forked = len(re.findall(r"warm server \d+: forked flwr-clientapp process \d+", node_log))
        assert started >= 2 and forked == started, (site, started, forked)
        assert "Traceback" not in node_log, (site, node_log[-3000:])  # each ended cleanly
        # the site's prepared slices, kept in its state folder for the next message's ClientApp
        assert list(
            (tmp_path / "sites" / site / "flwr-home" / "fedsamatch-site" / "slices").glob("sets/*.pt")
        ), site
        if on_mimalloc:  # every message's ClientApp process inherited the SuperNode's preloaded allocator
            assert "host allocator: mimalloc (freed pages kept)" in node_log, site
            assert "host allocator: the system" not in node_log, site
    print("checked: every ClientApp process was forked from its site's warm server")
    if on_mimalloc:
        print("checked: every site's ClientApps ran on mimalloc, freed pages kept")
    print(f"checked: rounds [1, 2], 3 of 3 sites aggregated each round, final Dice {rounds[-1]['evaluate']}")
    assert not leftovers, f"processes left running: {leftovers}"
    print("checked: no process left running")

    # Assert: each command the rehearsal ran (subcommand and flags) is a command of the docs
    documented = documented_commands()
    for line in (tmp_path / "commands.txt").read_text().splitlines():
        words = shlex.split(line)
        flags = {w for w in words if w.startswith("--")}
        matches = [
            d for d in documented if d[:4] == words[:4] and flags <= {w for w in d if w.startswith("--")}
        ]
        assert matches, f"not in docs/deployment.md: {words[:4]} with flags {sorted(flags)}"
    print(f"checked: the {len(documented)} documented deploy commands cover every command the rehearsal ran")
