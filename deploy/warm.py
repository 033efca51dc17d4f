"""Warm ClientApp processes: a fork server that stands in for Flower 1.42's fresh process per message.

Flower 1.42's SuperExec starts ``flwr-clientapp`` by name for every message a site receives, and that
process spends 2-3 s importing torch, flwr and ``torch._dynamo`` (torch's first optimizer) before it
reads the message. This module keeps one process per SuperNode that has done those imports once
(the *server*, like ``multiprocessing``'s "forkserver") and puts a ``flwr-clientapp`` *launcher*
first on the SuperExec's PATH. The launcher sends its arguments, environment, working directory and
standard streams to the server over a Unix socket; the server forks a child that runs Flower's own
``flwr-clientapp`` entry point with them, gives the launcher the child's PID and a pidfd (signals
the launcher gets are passed on through it) and, when the child ends, its exit status, which the
launcher exits with.

The app's own code still comes from the FAB Flower installed for the run: after warming, the server
drops this project's packages from ``sys.modules``, so each child imports them afresh (Flower's
loader puts the FAB's folder first on ``sys.path``). Without a reachable server the launcher runs the
real ``flwr-clientapp``, so a missing or crashed server costs time, never a message.

Imports here are the standard library only: the launcher runs for every message.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import json
import os
import selectors
import shlex
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

SOCKET_ENV = "FEDSAMATCH_WARM_SOCKET"  # where the launcher finds the server
FALLBACK_ENV = "FEDSAMATCH_WARM_FALLBACK"  # the real flwr-clientapp, run when no server answers
SERVER_ENV = "FEDSAMATCH_WARM_SERVER"  # set in each child: the PID of the server it was forked from
LAUNCHER = "flwr-clientapp"  # the name Flower's SuperExec starts (TASK_TYPE_TO_COMMAND)
ENTRY = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"
CLIENTAPP_MODULE = "flwr.supernode.runtime.run_clientapp"  # installs the FAB, pulls the message
# What a deployed ClientApp imports: the app, SAM-Match's method (peft, transformers) and torch's
# compiler (imported by the first optimizer); this project's own modules are dropped after warming.
WARM_IMPORTS = ("clients.client_app", "samatch.methods.sam_guided", "torch._dynamo")
PROJECT_PACKAGES = ("samatch", "federation", "clients", "server", "simulations", "deploy")
CONNECT_WAIT_S = 30.0  # a message that arrives while the server is still importing waits this long
MAX_REQUEST = 1 << 20  # bytes: arguments + environment
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # launcher -> child


def unavailable() -> str:
    """Why this system cannot run the warm server ('' when it can): it needs fork, Unix sockets
    that carry file descriptors, and pidfds (Linux 5.3+)."""
    for name in ("fork", "pidfd_open"):
        if not hasattr(os, name):
            return f"os.{name} is missing here (Linux 5.3+ has it)"
    if not hasattr(signal, "pidfd_send_signal"):
        return "signal.pidfd_send_signal is missing here (Linux 5.1+ has it)"
    return "" if hasattr(socket, "send_fds") else "socket.send_fds is missing here"


# ---- the launcher (runs once per message, started by Flower's SuperExec) ------------------------


def write_launcher(folder: Path) -> Path:
    """``folder/flwr-clientapp``: a shell script that runs :func:`launch` with this interpreter,
    isolated and without site-packages (``-I -S``: the launcher needs only the standard library)."""
    path = Path(folder) / LAUNCHER
    repo = Path(__file__).resolve().parents[1]
    code = f"import sys; sys.path.insert(0, {str(repo)!r}); from deploy.warm import launch; "
    code += "sys.exit(launch(sys.argv[1:]))"
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -S -c {shlex.quote(code)} "$@"\n')
    path.chmod(0o700)
    return path


def _connect(path: str, wait_s: float) -> socket.socket | None:
    """A connection to the server; None when nothing listens (a stale socket: at once) or the socket
    has not appeared within ``wait_s`` (a server still importing creates it when ready)."""
    end = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(path)
            return sock
        except FileNotFoundError:
            sock.close()
            if not Path(path).parent.is_dir() or time.monotonic() >= end:
                return None
            time.sleep(0.05)
        except OSError:  # refused: the server is gone
            sock.close()
            return None


def _open_or_null(fd: int) -> int:
    try:
        os.fstat(fd)
        return fd
    except OSError:  # started with that stream closed: the child gets /dev/null
        return os.open(os.devnull, os.O_RDWR)


class _Child:
    """The launcher's view of its child: signals that come before the child exists wait for it."""

    def __init__(self):
        self.pidfd: int | None = None
        self.pending: list[int] = []

    def signal(self, signum: int, _frame=None) -> None:
        if self.pidfd is None:
            self.pending.append(signum)
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass  # it has ended already

    def started(self, pidfd: int) -> None:
        self.pidfd = pidfd
        for signum in self.pending:
            self.signal(signum)


def launch(args: list[str], wait_s: float = CONNECT_WAIT_S) -> int:
    """Run ``flwr-clientapp args`` in a child of the warm server; the child's exit status. SIGTERM,
    SIGINT and SIGHUP are passed on to the child.

    When no child could be started (``$FEDSAMATCH_WARM_SOCKET`` unset, nothing listening, no socket
    within ``wait_s``, or the request failed) this process becomes ``$FEDSAMATCH_WARM_FALLBACK args``
    (the real ``flwr-clientapp``)."""
    child = _Child()
    for signum in FORWARDED:
        signal.signal(signum, child.signal)
    path = os.environ.get(SOCKET_ENV, "")
    sock = _connect(path, wait_s) if path else None
    if sock is not None:
        with sock:
            try:
                request = json.dumps({"argv": [LAUNCHER, *args], "env": dict(os.environ), "cwd": os.getcwd()})
                socket.send_fds(sock, [request.encode()], [_open_or_null(fd) for fd in (0, 1, 2)])
                reply, fds, _, _ = socket.recv_fds(sock, 64, 1)
            except OSError as exc:
                print(f"{LAUNCHER}: the warm server at {path} failed: {exc}", file=sys.stderr)
                reply, fds = b"", []
            if reply and fds:  # the child runs: from here on its status is ours
                return _wait(sock, int(reply), fds[0], child)
    if child.pending:  # asked to stop before anything started
        signal.signal(child.pending[0], signal.SIG_DFL)
        os.kill(os.getpid(), child.pending[0])
    fallback = os.environ.get(FALLBACK_ENV, "")
    if not fallback:
        print(f"{LAUNCHER}: no warm server at {path or '(unset)'} and {FALLBACK_ENV} unset", file=sys.stderr)
        return 1
    os.execv(fallback, [fallback, *args])


def _wait(sock: socket.socket, pid: int, pidfd: int, child: _Child) -> int:
    child.started(pidfd)
    status = sock.recv(64)
    child.pidfd = None
    os.close(pidfd)
    if not status:
        print(f"{LAUNCHER}: the warm server closed before child {pid} ended", file=sys.stderr)
        return 1
    code = int(status)
    if code < 0:  # the child was killed by a signal: end the same way, for whoever waits on us
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code if code >= 0 else 128 - code


# ---- the server (one per SuperNode) -----------------------------------------------------------------


def warm_up(modules: tuple[str, ...] = WARM_IMPORTS, project: tuple[str, ...] = PROJECT_PACKAGES) -> float:
    """Import ``modules`` (those that fail are skipped), then drop ``project``'s packages from
    ``sys.modules`` so children import the run's own copy. Seconds spent."""
    t0 = time.perf_counter()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"warm server: not warmed: {name}: {exc}", file=sys.stderr, flush=True)
    drop_project(project)
    return time.perf_counter() - t0


def drop_project(project: tuple[str, ...] = PROJECT_PACKAGES) -> None:
    """Forget ``project``'s modules, so a child imports the run's own copy from its FAB."""
    for name in [m for m in sys.modules if m.partition(".")[0] in project]:
        del sys.modules[name]


def install_fab_once(install, project_dir):
    """``install`` (Flower's ``install_from_fab``, which a ClientApp calls on every message: it
    unzips the FAB into a temporary folder and hashes every file, only to find the app installed,
    0.07-0.25 s here) wrapped to return the installed folder at once when it is there: the folder
    Flower names by the FAB's project, version and hash (``project_dir``: Flower's
    ``get_project_dir``), read from the FAB's ``pyproject.toml`` in memory. Anything else, and any
    FAB that cannot be read so, goes to ``install``."""
    import hashlib
    import io
    import zipfile

    import tomllib
    from flwr.common.config import get_metadata_from_config

    def installed(fab_file, install_dir=None, skip_prompt=False):
        if isinstance(fab_file, bytes) and install_dir is None and skip_prompt:
            try:
                with zipfile.ZipFile(io.BytesIO(fab_file)) as fab:
                    config = tomllib.loads(fab.read("pyproject.toml").decode())
                fab_id, version = get_metadata_from_config(config)
                folder = project_dir(fab_id, version, hashlib.sha256(fab_file).hexdigest())
            except Exception:  # noqa: BLE001  (a FAB not read so goes to Flower's install, which reports it)
                folder = None
            if folder is not None and folder.is_dir():
                return folder
        return install(fab_file, install_dir, skip_prompt)

    installed.__wrapped__ = install
    return installed


def patch_clientapp() -> None:
    """Flower's ClientApp module, set up once in the server for every child: the FAB check skipped
    when the app is installed (:func:`install_fab_once`), and a 0.05 s instead of 1 s first retry of
    a message object that has not reached the SuperNode yet (:mod:`federation.pull_retry`, a module of
    this project's: dropped again afterwards)."""
    clientapp = sys.modules.get(CLIENTAPP_MODULE)
    if clientapp is None:  # another entry point than Flower's
        return
    clientapp.install_from_fab = install_fab_once(clientapp.install_from_fab, clientapp.get_project_dir)
    try:
        from federation import pull_retry

        pull_retry.shorten(clientapp, "pull_and_inflate_object_from_tree")
    except (ImportError, TypeError, ValueError) as exc:
        print(f"warm server: Flower's object retry left as it is: {exc}", file=sys.stderr, flush=True)
    finally:
        drop_project()


def freeze_heap() -> int:
    """Collect garbage, then exempt everything the server holds from the collector, in the server and
    in every child it forks (``gc.freeze``); returns how many objects.

    The imports leave about 500,000 objects the collector tracks. A full collection in a child (one
    runs whenever enough of the child's objects outlive its younger collections) walked all of them
    and wrote to each one's header, so the kernel copied the pages: 0.30 s per full collection in a
    forked child, 0.001-0.002 s with the heap frozen (``benchmarks/fork_gc.py``, this project's 2-core
    CPU; collecting in the server without freezing leaves it at 0.30 s). In the deployment a
    SAM-Match ClientApp took a median 3.6 s from fork to exit before, 3.0 s after
    (docs/performance_log.md). Python's own recipe instead disables collection from the start, so
    that freed objects leave no holes for a child's new objects to fill page by page; not measured
    here. Cyclic garbage among frozen objects is never reclaimed.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _entry(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _run_child(request: dict, fds: list[int], entry: str) -> None:
    """In the forked child (signals still blocked): take the launcher's streams, folder, environment
    and arguments, run ``entry`` as a fresh process would (``atexit`` handlers included) and exit
    with its status. Never returns."""
    import fcntl  # Unix only, as is this whole server

    code = 1
    try:
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]  # clear of 0-2 first
        for fd in fds:
            os.close(fd)
        for target, fd in enumerate(high):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"], **{SERVER_ENV: str(os.getppid())})
        sys.argv = list(request["argv"])
        print(
            f"warm server {os.getppid()}: forked {sys.argv[0]} process {os.getpid()}",
            file=sys.stderr,
            flush=True,
        )
        try:
            _entry(entry)()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:  # what a fresh interpreter runs at exit, after an error too
            atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001  (report anything, then exit: a child never returns)
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve(
    socket_path: Path, parent_pid: int, entry: str = ENTRY, imports: tuple[str, ...] = WARM_IMPORTS
) -> int:
    """Warm up, then fork a child per launcher request until ``parent_pid`` (the SuperNode) is gone
    or SIGTERM comes. The socket's folder (with the launcher) is removed on the way out.

    Children inherit what the server read at start (``LD_PRELOAD``, ``OMP_NUM_THREADS`` and the
    like, read when a library loads), not the launcher's values of those."""
    me = os.getpid()
    socket_path = Path(socket_path)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop through the clean-up below
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sel = selectors.DefaultSelector()
    try:
        took = warm_up(imports)
        _entry(entry)  # Flower's flwr-clientapp modules
        patch_clientapp()
        freeze_heap()
        if (threads := _threads()) > 1:
            print(
                f"warm server: {threads} threads after warming up; a forked child has only one",
                file=sys.stderr,
            )
        listener.bind(str(socket_path))
        listener.listen(16)
        print(f"warm server {me}: imports done in {took:.1f} s, listening on {socket_path}", flush=True)
        sel.register(listener, selectors.EVENT_READ, None)
        while os.getppid() == parent_pid:
            for key, _ in sel.select(timeout=0.5):
                if key.data is None:  # a launcher connected
                    conn, _ = listener.accept()
                    _fork(conn, sel, entry)
                else:  # a child ended: tell its launcher
                    _reap(key, sel)
    finally:
        if os.getpid() == me:  # never in a child that unwound through here
            listener.close()
            for path in (socket_path, socket_path.parent / LAUNCHER):
                path.unlink(missing_ok=True)
            try:
                socket_path.parent.rmdir()
            except OSError:
                pass
    return 0


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _reap(key: selectors.SelectorKey, sel: selectors.BaseSelector) -> None:
    pid, conn, t0 = key.data
    sel.unregister(key.fileobj)
    os.close(key.fd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    print(
        f"warm server {os.getpid()}: process {pid} exited {code} after {time.monotonic() - t0:.2f} s",
        flush=True,
    )
    with conn:
        try:
            conn.send(str(code).encode())
        except OSError:
            pass  # the launcher is gone


def _fork(conn: socket.socket, sel: selectors.BaseSelector, entry: str) -> None:
    fds: list[int] = []
    try:
        conn.settimeout(5.0)  # a launcher sends its request at once
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
        conn.settimeout(None)
        request = json.loads(data)
        if len(fds) != 3 or not isinstance(request, dict) or not {"argv", "env", "cwd"} <= request.keys():
            raise ValueError(f"not a launcher's request ({len(fds)} streams; argv, env and cwd needed)")
    except (OSError, ValueError) as exc:
        print(f"warm server: bad request: {exc}", file=sys.stderr, flush=True)
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # the child sets its own handlers first
    pid = os.fork()
    if pid == 0:
        try:  # the child holds no socket of the server's: a launcher never waits on it
            for key in list(sel.get_map().values()):
                for obj in (key.fileobj, key.data[1] if key.data else None):  # data: (pid, conn, start)
                    if isinstance(obj, socket.socket):
                        obj.close()
                    elif isinstance(obj, int):
                        os.close(obj)
            sel.close()
            conn.close()
            _run_child(request, fds, entry)
        finally:
            os._exit(1)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    try:
        socket.send_fds(conn, [str(pid).encode()], [pidfd])  # the launcher signals the child through it
    except OSError:
        pass
    sel.register(pidfd, selectors.EVENT_READ, (pid, conn, t0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.warm", description="the warm ClientApp server")
    p.add_argument("--socket", required=True, type=Path)
    p.add_argument("--parent-pid", required=True, type=int, help="exit when this process is gone")
    p.add_argument("--entry", default=ENTRY, help="module:function run in each child")
    p.add_argument(
        "--imports", default=",".join(WARM_IMPORTS), help="modules to import once, comma-separated"
    )
    args = p.parse_args(argv)
    return serve(args.socket, args.parent_pid, args.entry, tuple(filter(None, args.imports.split(","))))


if __name__ == "__main__":
    sys.exit(main())
