"""deploy.node and deploy.warm: the SuperNode's capped poll and the warm ClientApp server.

The server tests start ``python -m deploy.warm`` with a probe entry point instead of Flower's
``flwr-clientapp`` (the rehearsal, tests/test_deploy_rehearsal.py, runs the real one) and talk to it
through the launcher file it would get on a SuperNode's PATH.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tomllib

from deploy import commands as cmd
from deploy import node, warm
from federation import pull_retry

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import atexit, gc, json, os, sys, time

    def main():
        atexit.register(lambda: print("probe: atexit handler ran", file=sys.stderr, flush=True))
        if sys.argv[1:] == ["raise"]:
            raise RuntimeError("probe failed")
        if sys.argv[1:] == ["sleep"]:
            print("ready", flush=True)
            time.sleep(60)
        print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "x": os.environ.get("X"),
                          "server_only": os.environ.get("SERVER_ONLY"), "stdin": sys.stdin.readline(),
                          "ppid": os.getppid(), "server": os.environ.get("FEDSAMATCH_WARM_SERVER"),
                          "heavy": "probe_heavy" in sys.modules, "frozen": gc.get_freeze_count(),
                          "gc": gc.isenabled()}))
        if sys.argv[1] == "return":
            return
        sys.exit(int(sys.argv[1]))
    """
)


class FakeClock:
    def __init__(self):
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def monotonic(self) -> float:
        return 42.0


def test_capped_sleep_shortens_only_the_named_callers_longer_sleeps():
    # Prepare
    clock = FakeClock()
    capped = node.CappedSleep({"start_client_internal": 0.5, "_push_messages": 0.05}, clock)

    def start_client_internal():  # named as the SuperNode's loop
        capped.sleep(3)
        capped.sleep(0.2)

    def _push_messages():  # named as its wait for the ClientApp's reply
        capped.sleep(0.5)

    # Execute
    start_client_internal()
    _push_messages()
    capped.sleep(3)  # from elsewhere: unchanged

    # Assert: 3 s -> 0.5 s, 0.2 s unchanged, 0.5 s -> 0.05 s; the rest is the clock's
    assert clock.slept == [0.5, 0.2, 0.05, 3]
    assert capped.monotonic() == 42.0
    with pytest.raises(ValueError, match="start_client_internal: wait 0: must be > 0"):
        node.CappedSleep({"start_client_internal": 0})


def test_supernode_loop_sleeps_through_the_patched_name():
    # Prepare: Flower 1.42's loop sleeps 3 s through its module's `time` when no message came, and
    # 0.5 s at a time while it waits for the ClientApp's reply and then for the reply's objects
    from flwr.supernode import start_client_internal as loop

    assert "import time\n" in inspect.getsource(loop), "Flower's SuperNode module changed"
    assert "time.sleep(3)" in inspect.getsource(getattr(loop, node.POLL_LOOP)), (
        "Flower's SuperNode loop changed"
    )
    push = inspect.getsource(getattr(loop, node.REPLY_WAITS[0]))
    assert push.count("time.sleep(0.5)") == 2 and f"def {node.REPLY_WAITS[1]}(" in push, (
        "Flower's SuperNode reply wait changed"
    )
    original = loop.time

    # Execute: patched twice (a restarted SuperNode in one process), the cap of the last call holds
    try:
        node.cap_supernode_poll(2.0)
        patched = node.cap_supernode_poll(0.5)
        clock = loop.time
    finally:
        loop.time = original

    # Assert
    assert patched is loop and isinstance(clock, node.CappedSleep)
    assert clock.caps == {"start_client_internal": 0.5, "_push_messages": 0.05, "yield_object_contents": 0.05}
    assert clock._clock is original and clock.time is original.time


def test_node_argv_wraps_the_flower_command():
    # Execute
    flower = ["/venv/bin/flower-supernode", "--superlink", "h:9093", "--insecure"]
    argv = cmd.node_argv(flower, node.RuntimeSettings(poll_interval=0.25, reply_check=0.5, warm=False))

    # Assert
    wrapper = [sys.executable, "-m", "deploy.node", "--poll-interval", "0.25", "--reply-check", "0.5"]
    assert argv == [*wrapper, "--no-warm", "--", *flower[1:]]


def test_runtime_settings_round_trip_through_the_parser():
    # Setup: the options deploy.node and deploy supernode share
    parser = argparse.ArgumentParser()
    node.add_runtime_arguments(parser)
    changed = node.RuntimeSettings(poll_interval=2.0, reply_check=0.05, warm=False)

    # Execute
    only_changed = changed.argv(changed_only=True)
    parsed = node.RuntimeSettings.from_args(parser.parse_args(changed.argv()))

    # Assert: the default reply check is left out, and the options give the settings back
    assert only_changed == ["--poll-interval", "2", "--no-warm"]
    assert node.RuntimeSettings().argv(changed_only=True) == []
    assert parsed == changed
    assert node.RuntimeSettings.from_args(parser.parse_args(only_changed)) == changed


@pytest.fixture
def supernode_loop(monkeypatch):
    """Flower's SuperNode module, restored afterwards, and its entry point replaced by a recorder of
    the arguments it would have started with."""
    from flwr.supernode import start_client_internal as loop

    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the package shadows the name

    started = []
    for name in ("time", "pull_objects"):
        monkeypatch.setattr(loop, name, getattr(loop, name))
    monkeypatch.setattr(cli, "flower_supernode", lambda: started.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.delenv(pull_retry.ENV, raising=False)
    return loop, started


def test_node_main_caps_the_waits_and_shortens_the_object_retry(supernode_loop):
    loop, started = supernode_loop

    # Execute: what `deploy supernode --no-warm --poll-interval 0.25 --reply-check 0.1` runs
    code = node.main(["--poll-interval", "0.25", "--reply-check", "0.1", "--no-warm", "--", "--insecure"])

    # Assert: Flower's SuperNode started with its own arguments, its waits capped, its retry 0.05 s
    assert code == 0 and started == [["flower-supernode", "--insecure"]]
    assert loop.time.caps == {
        "start_client_internal": 0.25,
        "_push_messages": 0.1,
        "yield_object_contents": 0.1,
    }
    assert loop.pull_objects.keywords == {"initial_backoff": 0.05}


def test_node_main_refuses_a_bad_retry_setting_in_one_line(supernode_loop, monkeypatch, capsys):
    _, started = supernode_loop
    monkeypatch.setenv(pull_retry.ENV, "soon")
    with pytest.raises(SystemExit) as exit_info:
        node.main(["--no-warm", "--", "--insecure"])
    assert exit_info.value.code == 2 and not started
    assert "$FEDSAMATCH_PULL_RETRY_S='soon': must be a number of seconds" in capsys.readouterr().err


def test_warm_up_drops_the_project_packages_it_imported(tmp_path, monkeypatch):
    # Prepare: a project package and a third-party-like module
    (tmp_path / "fakeproj").mkdir()
    (tmp_path / "fakeproj" / "__init__.py").write_text("")
    (tmp_path / "fakeproj" / "sub.py").write_text("import fakelib\n")
    (tmp_path / "fakelib.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))

    # Execute
    try:
        warm.warm_up(("fakeproj.sub", "no_such_module_xyz"), project=("fakeproj",))
        kept = "fakelib" in sys.modules
        dropped = not any(name.startswith("fakeproj") for name in sys.modules)
    finally:
        sys.modules.pop("fakelib", None)

    # Assert: the dependency stays imported, the project's own modules are gone, a missing one skipped
    assert kept and dropped


# Lists the probe's heavy import keeps alive, objects the garbage collector tracks: more than a bare
# interpreter with deploy.warm holds (about 10,000), so only a heap frozen after the imports has them.
HEAVY = 50_000


@pytest.fixture
def server(tmp_path):
    """A warm server with the probe entry point; yields (process, launcher, socket)."""
    (tmp_path / "probe.py").write_text(PROBE)
    heavy = f"open({str(tmp_path / 'imports.txt')!r}, 'a').write('x')\nKEPT = [[] for _ in range({HEAVY})]\n"
    (tmp_path / "probe_heavy.py").write_text(heavy)
    folder = tmp_path / "warm"
    folder.mkdir()
    launcher = warm.write_launcher(folder)
    sock = folder / "server.sock"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "SERVER_ONLY": "server"}
    argv = [sys.executable, "-m", "deploy.warm", "--socket", str(sock), "--parent-pid", str(os.getpid())]
    proc = subprocess.Popen([*argv, "--entry", "probe:main", "--imports", "probe_heavy"], cwd=REPO, env=env)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        yield proc, launcher, sock
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_each_launch_runs_in_a_fork_of_the_warm_server(server, tmp_path):
    # Prepare
    proc, launcher, sock = server
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, warm.SOCKET_ENV: str(sock), "X": "hello"}

    # Execute: three messages' ClientApps (exit 3, exit 0, return)
    out = dict(cwd=work, env=env, capture_output=True, text=True, timeout=60)
    runs = [subprocess.run([str(launcher), arg], input=f"in {arg}\n", **out) for arg in ("3", "0", "return")]

    # Assert: arguments, folder, environment (only the launcher's), standard streams and exit status
    # are the launcher's; the parent is the server, which imported the warm module once for all and
    # froze its heap (the heavy module's lists among it) before forking, with collection still on
    assert [r.returncode for r in runs] == [3, 0, 0], [r.stderr for r in runs]
    for run, arg in zip(runs, ("3", "0", "return"), strict=True):
        seen = json.loads(run.stdout)
        assert seen.pop("frozen") > HEAVY
        assert seen == {
            "argv": ["flwr-clientapp", arg],
            "cwd": str(work),
            "x": "hello",
            "server_only": None,
            "stdin": f"in {arg}\n",
            "ppid": proc.pid,
            "server": str(proc.pid),
            "heavy": True,
            "gc": True,
        }
        assert f"warm server {proc.pid}: forked flwr-clientapp process" in run.stderr
        # the entry's exit handlers run, as in a fresh process, and the child exits cleanly
        assert "probe: atexit handler ran" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert (tmp_path / "imports.txt").read_text() == "x"


def test_a_child_that_fails_runs_its_exit_handlers_and_exits_1(server):
    _, launcher, sock = server
    env = {**os.environ, warm.SOCKET_ENV: str(sock)}
    run = subprocess.run([str(launcher), "raise"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "RuntimeError: probe failed" in run.stderr and "probe: atexit handler ran" in run.stderr


def test_a_signal_to_the_launcher_reaches_the_child(server):
    # Prepare
    _, launcher, sock = server
    env = {**os.environ, warm.SOCKET_ENV: str(sock)}
    run = subprocess.Popen(
        [str(launcher), "sleep"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert run.stdout.readline() == "ready\n"
    child = int(run.stderr.readline().rsplit(" ", 1)[1])

    # Execute
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=30)

    # Assert: the child ended by the same signal, and so did the launcher
    assert run.returncode == -signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


@pytest.mark.parametrize("left", ["nothing", "a stale socket"])
def test_without_a_server_the_launcher_runs_the_real_clientapp(tmp_path, left):
    # Prepare: a stand-in for the real flwr-clientapp; no folder, or the socket of a killed server
    real = tmp_path / "real-clientapp"
    real.write_text('#!/bin/sh\necho real "$@"\nexit 4\n')
    real.chmod(0o700)
    launcher = warm.write_launcher(tmp_path)
    sock = tmp_path / "gone" / "server.sock"
    if left == "a stale socket":
        sock.parent.mkdir()
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dead.bind(str(sock))
        dead.close()  # the file stays, nothing listens
    env = {**os.environ, warm.SOCKET_ENV: str(sock), warm.FALLBACK_ENV: str(real)}

    # Execute: well within the launcher's wait for a server that is still starting
    run = subprocess.run([str(launcher), "--token", "t"], env=env, capture_output=True, text=True, timeout=10)

    # Assert
    assert (run.returncode, run.stdout) == (4, "real --token t\n")


def test_warm_imports_exist_and_the_project_packages_are_all_dropped():
    # Every module the server warms can be found, and every package the project installs is one
    # whose modules the server drops (else a child would run the server's copy, not the run's FAB)
    assert all(importlib.util.find_spec(name) is not None for name in warm.WARM_IMPORTS)
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = setuptools["packages"]["find"]["include"]
    assert {name.rstrip("*") for name in include} <= set(warm.PROJECT_PACKAGES)


def test_the_server_stops_with_its_parent_and_removes_its_folder(tmp_path):
    # Prepare: the server's parent is this test's process, not the PID it is told to watch
    folder = tmp_path / "warm"
    folder.mkdir()
    warm.write_launcher(folder)
    gone = subprocess.Popen(["true"])  # a process that has exited: its PID is nobody's parent
    gone.wait()
    argv = [sys.executable, "-m", "deploy.warm", "--socket", str(folder / "s.sock")]
    argv += ["--parent-pid", str(gone.pid)]

    # Execute
    rc = subprocess.run([*argv, "--imports", ""], cwd=REPO, timeout=60).returncode

    # Assert
    assert rc == 0 and not folder.exists()


def test_a_warm_server_that_dies_is_reaped_and_reported(capsys):
    # Prepare: a stand-in "server" that dies with code 3
    server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    # Execute
    node.reap_warm_server(server).join(timeout=30)

    # Assert: waited for (no zombie left in the process table) and said so
    assert server.returncode == 3 and not Path(f"/proc/{server.pid}").exists()
    assert f"warm ClientApp server (process {server.pid}) exited with code 3" in capsys.readouterr().out


def test_unavailable_names_what_this_system_lacks(monkeypatch):
    # On this Linux machine everything is there; without pidfds the warm server cannot run
    assert warm.unavailable() == ""
    monkeypatch.delattr(os, "pidfd_open")
    assert warm.unavailable() == "os.pidfd_open is missing here (Linux 5.3+ has it)"


def test_sweep_removes_only_the_folders_of_gone_supernodes(tmp_path):
    # Prepare: a folder of a SuperNode that has exited, one of this (live) process, and an unrelated one
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"{node.WARM_PREFIX}{gone.pid}-abc"
    live = tmp_path / f"{node.WARM_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{node.WARM_PREFIX}xyz"
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "server.sock").write_text("")

    # Execute
    removed = node.sweep_warm_folders(tmp_path)

    # Assert
    assert removed == [dead] and not dead.exists() and live.is_dir() and other.is_dir()


def test_poll_interval_must_be_positive_seconds():
    # deploy supernode and deploy.node share the option: 0.25 s is read as is, 0 and -1 s are refused
    assert node.poll_seconds("0.25") == 0.25
    for bad in ("0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"{bad}: must be > 0 s"):
            node.poll_seconds(bad)


def fab_bytes(pyproject: str | None) -> bytes:
    """A FAB as Flower sends it: a zip with the app's pyproject.toml (None: without one)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        fab.writestr("clients/app.py", "app = None\n")
        if pyproject is not None:
            fab.writestr("pyproject.toml", pyproject)
    return buffer.getvalue()


APP_TOML = '[project]\nname = "fedsamatch"\nversion = "0.1.0"\n[tool.flwr.app]\npublisher = "lab"\n'


def test_an_installed_fab_is_found_without_unpacking_it(tmp_path):
    # Prepare: Flower's folder naming (publisher.name.version.hash[:8]) and an install that records calls
    import hashlib

    def project_dir(fab_id, version, fab_hash):
        return tmp_path / "apps" / f"{fab_id.replace('/', '.')}.{version}.{fab_hash[:8]}"

    calls = []

    def install(fab_file, install_dir=None, skip_prompt=False):
        calls.append((install_dir, skip_prompt))
        return Path("installed-by-flower")

    fab = fab_bytes(APP_TOML)
    folder = tmp_path / "apps" / f"lab.fedsamatch.0.1.0.{hashlib.sha256(fab).hexdigest()[:8]}"
    wrapped = warm.install_fab_once(install, project_dir)

    # Execute / Assert: not installed yet -> Flower's install; installed -> its folder, no install
    assert wrapped(fab, skip_prompt=True) == Path("installed-by-flower") and calls == [(None, True)]
    folder.mkdir(parents=True)
    assert wrapped(fab, skip_prompt=True) == folder and len(calls) == 1
    # Flower's own path for anything else: a prompt wanted, another folder, no pyproject, not a zip
    for args, kwargs in (
        ((fab,), {}),
        ((fab, tmp_path), {"skip_prompt": True}),
        ((fab_bytes(None),), {"skip_prompt": True}),
        ((fab_bytes('[project]\nname = "x"\n'),), {"skip_prompt": True}),
        ((b"not a zip",), {"skip_prompt": True}),
    ):
        assert wrapped(*args, **kwargs) == Path("installed-by-flower")
    assert len(calls) == 6


def test_the_shortcut_finds_the_folder_flower_installs(tmp_path, monkeypatch):
    # Prepare: this project's FAB, installed by Flower into a private FLWR_HOME
    from flwr.cli.build import build_fab_from_disk
    from flwr.supernode.runtime import run_clientapp as flower

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    fab = build_fab_from_disk(REPO)
    installed = flower.install_from_fab(fab, skip_prompt=True)

    # Execute: the ClientApp's next message, through the warm server's shortcut
    def install(*args, **kwargs):
        raise AssertionError("installed again")

    found = warm.install_fab_once(install, flower.get_project_dir)(fab, skip_prompt=True)

    # Assert
    assert found == installed and (found / "pyproject.toml").is_file()
