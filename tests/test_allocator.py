"""samatch.allocator: the preloaded allocator keeps freed pages; the launchers start processes on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from samatch import allocator

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")

# Page faults of a fresh process writing a 200 MiB tensor after an earlier one of the same size was
# freed (50 ms and a few thousand small allocations in between, time for deferred work).
FAULT_PROBE = """
import json, os, resource, time, torch
from samatch.allocator import active
def faulted_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * os.sysconf("SC_PAGE_SIZE") / 2**20
x = torch.ones(200 * 2**20, dtype=torch.uint8)
del x
for _ in range(2):
    time.sleep(0.05)
    for _ in range(3000):
        y = torch.empty(1000)
        del y
before = faulted_mib()
x = torch.ones(200 * 2**20, dtype=torch.uint8)
print(json.dumps({"active": active(), "faulted_mib": faulted_mib() - before}))
"""


def probe(env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", FAULT_PROBE], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@linux_only
def test_mimalloc_reuses_freed_pages_where_the_system_malloc_maps_them_again():
    plain = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MIMALLOC_PURGE_DELAY")}

    system = probe(plain)
    kept = probe(allocator.launch_env("mimalloc", plain))

    assert system["active"] == "system" and kept["active"] == "mimalloc"
    # glibc unmapped the first block on free: the second one's pages are new (zeroed by the kernel).
    assert system["faulted_mib"] >= 190
    # mimalloc hands the same pages out again.
    assert kept["faulted_mib"] < 10


def test_launch_env_preloads_the_library_first_and_keeps_the_environment():
    lib = allocator.library("mimalloc")
    if lib is None:
        pytest.skip("cmeel-mimalloc not installed (not Linux)")
    base = {"LD_PRELOAD": "/opt/other.so", "HOME": "/home/site"}

    env = allocator.launch_env("mimalloc", base)

    assert env["LD_PRELOAD"] == f"{lib}:/opt/other.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "-1" and env["HOME"] == "/home/site"
    assert allocator.launch_env("mimalloc", env) == env  # applying it twice changes nothing
    assert base == {"LD_PRELOAD": "/opt/other.so", "HOME": "/home/site"}  # not modified
    assert allocator.launch_env("system", base) == base
    assert allocator.resolve("auto") == "mimalloc"


def test_jemalloc_is_found_in_the_system_folders_or_named_as_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "JEMALLOC_DIRS", (str(tmp_path / "none"), str(tmp_path)))
    with pytest.raises(
        ValueError, match=r"^allocator jemalloc: .*not installed \(apt-get install libjemalloc2\)$"
    ):
        allocator.launch_env("jemalloc", {})

    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    env = allocator.launch_env("jemalloc", {})

    if sys.platform.startswith("linux"):
        assert env == {
            "LD_PRELOAD": str(tmp_path / "libjemalloc.so.2"),
            "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
        }
    with pytest.raises(ValueError, match="choose one of auto, system, mimalloc, jemalloc"):
        allocator.resolve("tcmalloc")


@linux_only
@pytest.mark.parametrize(
    ("choice", "line"),
    [
        ("mimalloc", "host allocator: mimalloc (freed pages kept)"),
        ("system", "host allocator: the system's malloc"),
    ],
)
def test_samatch_command_starts_again_on_the_chosen_allocator(tmp_path, choice, line):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV_CHOICE)}
    argv = [
        sys.executable,
        "-m",
        "samatch.cli",
        "--allocator",
        choice,
        "train",
        "--format",
        "phantom-cardiac",
    ]
    argv += ["--method", "supervised", "--out", str(tmp_path / "run"), "--iterations", "1", "--device", "cpu"]
    argv += ["--quiet", "--set", "data.size=32", "--set", "model.base_channels=4"]

    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"}
    )

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert line in proc.stdout.splitlines()
    assert (tmp_path / "run" / "last.pt").is_file()


def test_deploy_supernode_gives_its_clientapps_the_allocator(tmp_path, monkeypatch):
    from deploy import cli

    started = {}

    class Started(Exception):
        pass

    def fake_execve(path, argv, env):  # do_supernode execs flower-supernode: record, start nothing
        started.update(path=path, env=env)
        raise Started

    monkeypatch.setattr(cli.os, "execve", fake_execve)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    common = ["supernode", "--superlink", "127.0.0.1:1", "--site-name", "A", "--data-root", str(tmp_path)]
    common += ["--insecure-plaintext", "--flwr-home", str(tmp_path / "home")]

    with pytest.raises(Started):
        cli.main([*common, "--allocator", "system"])
    assert "LD_PRELOAD" not in started["env"] and Path(started["path"]).name == "flower-supernode"
    lib = allocator.library("mimalloc")
    if lib is None:
        pytest.skip("cmeel-mimalloc not installed (not Linux)")
    with pytest.raises(Started):
        cli.main([*common, "--allocator", "mimalloc"])
    assert started["env"]["LD_PRELOAD"] == str(lib) and started["env"]["MIMALLOC_PURGE_DELAY"] == "-1"
