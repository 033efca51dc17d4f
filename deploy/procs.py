"""Start and stop the processes of a deployment, and only those.

Flower starts its helpers (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``) in new sessions, and a
``flwr-clientapp`` outlives a killed SuperNode, so neither a process-group kill nor a walk of the
tree below a PID finds them all. Every process started here therefore carries an environment
marker (``FEDSAMATCH_DEPLOY_MARKER``) that its children inherit; stopping kills the started PIDs,
the processes below them, and then any process whose ``/proc/<pid>/environ`` holds the marker,
by PID. Nothing else is touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

MARKER_ENV = "FEDSAMATCH_DEPLOY_MARKER"


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; empty where /proc is missing)."""
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        out: list[int] = []
        for task in tasks:
            text = (task / "children").read_text().split()
            out.extend(int(c) for c in text)
        return out
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes_with_env(needle: str, exact: bool = False) -> list[int]:
    """PIDs (not this process) whose environment contains ``needle`` (anywhere, or as one whole
    ``NAME=value`` entry with ``exact``), zombies excluded."""
    raw = needle.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        hit = raw in env.split(b"\0") if exact else raw in env
        if hit and not _is_zombie(int(entry.name)):
            found.append(int(entry.name))
    return found


def processes_with_marker(marker: str) -> list[int]:
    """PIDs (not this process) whose environment holds ``MARKER_ENV=marker``."""
    return processes_with_env(f"{MARKER_ENV}={marker}", exact=True)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def alive(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that run (signalable by us and not zombies)."""
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            continue
        if not _is_zombie(pid):
            out.append(pid)
    return out


@dataclass
class Managed:
    """One started process: its name, Popen handle and log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    _log_handle: IO | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


class ProcessSet:
    """The processes of one deployment (or rehearsal): start, kill one, stop all.

    Use as a context manager: everything started is stopped on exit, also on errors.
    """

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None, marker: str | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.marker = marker or f"deploy-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, **(env or {}), MARKER_ENV: self.marker}
        self.procs: dict[str, Managed] = {}

    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> Managed:
        """Start ``argv`` in its own session, output to ``<log_dir>/<name>.log`` (appended)."""
        if name in self.procs and self.procs[name].running():
            raise RuntimeError(f"process {name!r} is already running (pid {self.procs[name].pid})")
        log = self.log_dir / f"{name}.log"
        handle = open(log, "ab")  # noqa: SIM115 - closed in stop()
        handle.write(f"\n$ {' '.join(argv)}\n".encode())
        handle.flush()
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs[name] = Managed(name, popen, log, handle)
        return self.procs[name]

    def tree(self, name: str) -> list[int]:
        """The named process and every process below it."""
        proc = self.procs[name]
        return [proc.pid, *descendants(proc.pid)]

    def kill(
        self, name: str, sig: int = signal.SIGKILL, timeout: float = 10.0, include_self: bool = True
    ) -> list[int]:
        """Send ``sig`` to the named process and its descendants (a fault: SIGKILL, no clean-up),
        then wait for them; returns the PIDs signalled. ``include_self=False`` spares the named
        process itself (a supervisor that is to restart what it runs)."""
        pids = self.tree(name) if include_self else descendants(self.procs[name].pid)
        _signal(pids, sig)
        deadline = time.monotonic() + timeout
        while alive(pids) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        if alive(pids):
            _signal(pids, signal.SIGKILL)
        self._reap()
        return pids

    def stop(self, name: str, grace: float = 10.0) -> None:
        """SIGTERM the named process and its descendants, SIGKILL after ``grace`` seconds."""
        self.kill(name, signal.SIGTERM, timeout=grace)
        self._close_log(name)

    def _reap(self) -> None:
        for proc in self.procs.values():
            proc.popen.poll()

    def _close_log(self, name: str) -> None:
        handle = self.procs[name]._log_handle
        if handle is not None and not handle.closed:
            handle.close()

    def leftovers(self) -> list[int]:
        """Live processes carrying this set's marker."""
        self._reap()
        return processes_with_marker(self.marker)

    def stop_all(self, grace: float = 10.0) -> list[int]:
        """Stop every process started here and all carrying the marker; returns any PID that had
        to be killed as a straggler (found by the marker only)."""
        names = [n for n, p in self.procs.items() if p.running()]
        pids = [pid for n in names for pid in self.tree(n)]
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while alive(pids) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        _signal(alive(pids), signal.SIGKILL)
        stragglers: list[int] = []
        for _ in range(50):
            found = self.leftovers()
            if not found:
                break
            stragglers.extend(p for p in found if p not in stragglers)
            _signal(found, signal.SIGTERM if _ < 10 else signal.SIGKILL)
            time.sleep(0.2)
        for name in self.procs:
            self._reap()
            self._close_log(name)
        return stragglers

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
