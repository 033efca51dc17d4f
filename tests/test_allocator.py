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
import json, resource, time, torch
from samatch.allocator import active
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(200 * 2**20, dtype=torch.uint8)
del x
for _ in range(2):
    time.sleep(0.05)
    for _ in range(3000):
        y = torch.empty(1000)
        del y
before = faults()
x = torch.ones(200 * 2**20, dtype=torch.uint8)
print(json.dumps({"active": active(), "faults": faults() - before}))
"""
# What a test's environment may hold that changes malloc: preloads, glibc tunables (docs/performance_log.md's
# bounded heap), MIMALLOC_* and torch's transparent-huge-page switch.
ALLOCATOR_ENV = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF", "THP_MEM_ALLOC_ENABLE", allocator.ENV_CHOICE)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV and not k.startswith("MIMALLOC_")}


def probe(env: dict[str, str]) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-c", FAULT_PROBE], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


class Started(Exception):
    """Raised by a recording stand-in for ``os.execve``: the process would have been replaced."""


def needs_mimalloc() -> Path:
    lib = allocator.library("mimalloc")
    if lib is None:
        pytest.skip("cmeel-mimalloc not installed (not Linux x86_64 / aarch64)")
    return lib


@linux_only
def test_mimalloc_reuses_freed_pages_where_the_system_malloc_maps_them_again():
    needs_mimalloc()
    plain = clean_env()

    system, _ = probe(plain)
    kept, log = probe({**allocator.launch_env("mimalloc", plain), "MIMALLOC_VERBOSE": "1"})

    assert system["active"] == "system" and kept["active"] == "mimalloc"
    # glibc unmapped the first block on free: the second one's pages are new (zeroed by the kernel):
    # 51,200 faults of 4 KiB pages, or 100 where transparent huge pages of 2 MiB serve it.
    assert system["faults"] >= 100
    # mimalloc hands the same pages out again ...
    assert kept["faults"] < 20
    # ... and read the setting that keeps them (its own report of its options)
    assert "option 'purge_delay': -1" in log


def test_launch_env_preloads_the_library_first_and_keeps_the_environment():
    lib = needs_mimalloc()
    base = {"LD_PRELOAD": "/opt/other.so", "HOME": "/home/site"}

    env = allocator.launch_env("mimalloc", base)

    assert env["LD_PRELOAD"] == f"{lib}:/opt/other.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "-1" and env["HOME"] == "/home/site"
    assert allocator.launch_env("mimalloc", env) == env  # applying it twice changes nothing
    assert base == {"LD_PRELOAD": "/opt/other.so", "HOME": "/home/site"}  # not modified
    assert allocator.launch_env("system", base) == base
    assert allocator.resolve("auto", base) == "mimalloc" and allocator.resolve("system", base) == "system"
    # auto keeps an allocator the launcher preloaded, with its own settings; a named one is applied
    jem = {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2", "MALLOC_CONF": "narenas:1"}
    assert allocator.launch_env("auto", jem) == jem and allocator.resolve("auto", jem) == "jemalloc"
    assert allocator.launch_env("mimalloc", jem)["LD_PRELOAD"] == f"{lib}:/usr/lib/libjemalloc.so.2"
    assert allocator.resolve("system", jem) == "jemalloc"  # system adds none, removes none


@linux_only
def test_jemalloc_is_found_in_the_system_folders_or_named_as_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "JEMALLOC_DIRS", (str(tmp_path / "none"), str(tmp_path)))
    with pytest.raises(
        ValueError, match=r"^allocator jemalloc: .*not installed \(apt-get install libjemalloc2\)$"
    ):
        allocator.launch_env("jemalloc", {})

    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    env = allocator.launch_env("jemalloc", {})

    assert env == {
        "LD_PRELOAD": str(tmp_path / "libjemalloc.so.2"),
        "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
    }
    with pytest.raises(ValueError, match="choose one of auto, system, mimalloc, jemalloc"):
        allocator.resolve("tcmalloc")


@linux_only
@pytest.mark.parametrize(
    ("options", "preload", "line"),
    [
        (["--allocator", "mimalloc", "train"], False, "host allocator: mimalloc (freed pages kept)"),
        (["train", "--allocator", "system"], False, "host allocator: the system's malloc"),
        # already on mimalloc without the setting: started again with it
        (["train", "--allocator", "mimalloc"], True, "host allocator: mimalloc (freed pages kept)"),
        # auto keeps what the launcher preloaded, as it was
        (["train"], True, "host allocator: mimalloc (default page release)"),
    ],
)
def test_samatch_command_starts_again_on_the_chosen_allocator(tmp_path, options, preload, line):
    lib = needs_mimalloc()
    env = {**clean_env(), "OMP_NUM_THREADS": "1", **({"LD_PRELOAD": str(lib)} if preload else {})}
    argv = [sys.executable, "-m", "samatch.cli", *options, "--format", "phantom-cardiac", "--device", "cpu"]
    argv += ["--method", "supervised", "--out", str(tmp_path / "run"), "--iterations", "1", "--quiet"]
    argv += ["--set", "data.size=32", "--set", "model.base_channels=4"]

    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert line in proc.stdout.splitlines()
    assert (tmp_path / "run" / "last.pt").is_file()


@linux_only
@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("samatch.cli", ["data", "check", "x"]),
        ("simulations.compare", ["--config", "x.toml", "--out", "x"]),
        ("simulations.crosstask", ["--config", "x.toml", "--out", "x"]),
        ("benchmarks.bench_step", []),
        ("benchmarks.step_ab", []),
    ],
)
def test_every_entry_point_starts_again_before_its_work(monkeypatch, module, args):
    # Prepare: the entry point run as from its command line (argv None), execve recorded instead
    import importlib

    lib = needs_mimalloc()

    def fake_execve(path, argv, env):
        raise Started(env)

    monkeypatch.setattr(allocator.os, "execve", fake_execve)
    monkeypatch.setattr(sys, "argv", [module, *args])
    for key in ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)

    # Execute / Assert: it starts again on mimalloc, keeping pages, before reading any file (x)
    with pytest.raises(Started) as started:
        importlib.import_module(module).main()
    env = started.value.args[0]
    assert env["LD_PRELOAD"] == str(lib) and env["MIMALLOC_PURGE_DELAY"] == "-1"
    # (An in-process call, main([...]), is left alone: the other test files call these mains so.)


@linux_only
def test_shell_exports_start_a_program_on_the_chosen_allocator(monkeypatch, capsys):
    # Prepare: a shell's environment without any allocator setting
    lib = needs_mimalloc()
    for key in [*ALLOCATOR_ENV, *(k for k in os.environ if k.startswith("MIMALLOC_"))]:
        monkeypatch.delenv(key, raising=False)

    # Execute / Assert: auto adds mimalloc keeping pages, as lines a shell can eval; system adds nothing
    assert allocator.main([]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"export LD_PRELOAD={lib}",
        "export MIMALLOC_PURGE_DELAY=-1",
    ]
    assert allocator.main(["--allocator", "system"]) == 0
    assert capsys.readouterr().out == ""


@linux_only
def test_the_samatch_command_starts_again_before_importing_torch(tmp_path):
    # Prepare: `samatch train ... --allocator mimalloc` from its command line in a fresh interpreter,
    # execve replaced by a report of what the process had imported by then
    needs_mimalloc()
    code = (
        "import os, sys\n"
        "os.execve = lambda *a: (print('torch' in sys.modules, 'samatch.commands.train' in sys.modules), "
        "sys.exit(0))\n"
        "sys.argv = ['samatch', 'train', '--data', 'x', '--allocator', 'mimalloc']\n"
        "from samatch import cli\n"
        "cli.main()\n"
    )

    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=clean_env()
    )

    # Assert: it started again (execve reached) with neither torch nor the command's module loaded
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False"]


def test_deploy_supernode_gives_its_clientapps_the_allocator(tmp_path, monkeypatch):
    from deploy import cli

    started = {}

    def fake_execve(path, argv, env):  # do_supernode execs the SuperNode: record, start nothing
        started.update(path=path, argv=argv, env=env)
        raise Started

    monkeypatch.setattr(cli.os, "execve", fake_execve)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    common = ["supernode", "--superlink", "127.0.0.1:1", "--site-name", "A", "--data-root", str(tmp_path)]
    common += ["--insecure-plaintext", "--flwr-home", str(tmp_path / "home")]

    with pytest.raises(Started):
        cli.main([*common, "--allocator", "system"])
    assert "LD_PRELOAD" not in started["env"]  # deploy.node runs Flower's SuperNode
    assert started["path"] == sys.executable and started["argv"][1:3] == [
        "-m",
        "deploy.node",
    ]  # Flower's, wrapped
    lib = needs_mimalloc()
    with pytest.raises(Started):
        cli.main([*common, "--allocator", "mimalloc"])
    assert started["env"]["LD_PRELOAD"] == str(lib) and started["env"]["MIMALLOC_PURGE_DELAY"] == "-1"
