"""``python -m deploy.node [--poll-interval S] [--reply-check S] [--no-warm] -- <flower args>``: Flower
1.42's SuperNode with the per-message costs of its runtime cut (what ``deploy supernode`` runs).

* **Idle poll.** The SuperNode asks the SuperLink for a message, and when there is none it sleeps a
  fixed 3 s (``flwr/supernode/start_client_internal.py``, not configurable in 1.42); it always finds
  none right after replying, so each round waits up to 3 s more per site. ``--poll-interval`` caps
  that sleep by replacing the module's ``time`` with :class:`CappedSleep`. Each idle site then asks
  the SuperLink 1 / ``poll-interval`` times a second instead of once every 3 s.
* **Reply checks.** While the ClientApp runs, the SuperNode looks for its reply every 0.5 s, then
  for the reply's objects; ``--reply-check`` (0.05 s) caps those waits (it reads its own state, not
  the network).
* **A fresh process per message.** ``--warm`` (the default) starts :mod:`deploy.warm`'s server
  beside the SuperNode and puts its ``flwr-clientapp`` launcher first on PATH, so each message's
  ClientApp is forked from a process that has already imported torch and flwr.

* **Object retries.** The SuperNode pulls its message's objects with Flower's 1 s first retry;
  :mod:`federation.pull_retry` makes it 0.05 s (the warm server does the same for its ClientApps).

All of them reach into Flower 1.42's internals; ``tests/test_deploy_node.py`` fails if the
SuperNode's loop no longer sleeps through the name patched here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from deploy import warm
from deploy.procs import alive
from federation import pull_retry

DEFAULT_POLL_S = 0.5
POLL_LOOP = "start_client_internal"  # the function whose sleep is the idle poll
# Where the SuperNode waits 0.5 s at a time for the ClientApp's reply, then for the reply's objects
REPLY_WAITS = ("_push_messages", "yield_object_contents")
REPLY_CHECK_S = 0.05


class CappedSleep:
    """Stands in for the ``time`` module inside one module: ``sleep(s)`` called from a function
    named in ``caps`` sleeps ``min(s, caps[name])``, from anywhere else ``s``; every other attribute
    is ``clock``'s."""

    def __init__(self, caps: dict[str, float], clock=time):
        for caller, cap in caps.items():
            if cap <= 0:
                raise ValueError(f"{caller}: wait {cap}: must be > 0 s")
        self.caps, self._clock = dict(caps), clock

    def sleep(self, seconds: float) -> None:
        cap = self.caps.get(sys._getframe(1).f_code.co_name)
        self._clock.sleep(seconds if cap is None else min(seconds, cap))

    def __getattr__(self, name: str):
        return getattr(self._clock, name)


def cap_supernode_poll(cap: float, reply_check: float = REPLY_CHECK_S):
    """Cap the sleep of Flower's SuperNode loop after a request that found no message at ``cap`` s,
    and its waits for the ClientApp's reply at ``reply_check`` s. The patched module."""
    from flwr.supernode import start_client_internal as loop

    clock = loop.time
    caps = {POLL_LOOP: cap, **dict.fromkeys(REPLY_WAITS, reply_check)}
    loop.time = CappedSleep(caps, clock._clock if isinstance(clock, CappedSleep) else clock)
    return loop


WARM_PREFIX = "fedsamatch-warm-"  # + the SuperNode's PID + "-": the warm server's folder in the temp dir


def sweep_warm_folders(root: Path) -> list[Path]:
    """Remove the warm servers' folders under ``root`` whose SuperNode is gone (a server removes its
    own when it stops, but not when it is SIGKILLed); the folders removed."""
    removed = []
    for folder in Path(root).glob(f"{WARM_PREFIX}*-*"):
        pid = folder.name[len(WARM_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or alive([int(pid)]):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def start_warm_server(real_clientapp: Path) -> subprocess.Popen:
    """Start :mod:`deploy.warm`'s server for this process (it exits when this process does) and
    point ``flwr-clientapp`` on this process's PATH at its launcher."""
    sweep_warm_folders(Path(tempfile.gettempdir()))
    # short: a socket path has <= 107 bytes
    folder = Path(tempfile.mkdtemp(prefix=f"{WARM_PREFIX}{os.getpid()}-"))
    warm.write_launcher(folder)
    sock = folder / "server.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "deploy.warm", "--socket", str(sock), "--parent-pid", str(os.getpid())],
        cwd=Path(__file__).resolve().parents[1],
        start_new_session=True,  # a terminal's Ctrl-C reaches a child once, through its launcher
    )
    os.environ[warm.SOCKET_ENV] = str(sock)
    os.environ[warm.FALLBACK_ENV] = str(real_clientapp)
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
    return server


def reap_warm_server(server: subprocess.Popen) -> threading.Thread:
    """Wait for the warm server in a daemon thread: if it dies before this process (a crash, a kill),
    it is reaped at once instead of staying a zombie, and the log says that messages now start fresh
    processes (its launcher falls back to Flower's ``flwr-clientapp`` when the socket refuses)."""

    def wait() -> None:
        code = server.wait()
        print(
            f"deploy.node: the warm ClientApp server (process {server.pid}) exited with code {code}; "
            "each message now starts a fresh process",
            flush=True,
        )

    thread = threading.Thread(target=wait, name="warm-server-reaper", daemon=True)
    thread.start()
    return thread


def poll_seconds(text: str) -> float:
    """``--poll-interval``'s type: seconds, > 0."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be > 0 s")
    return value


@dataclass(frozen=True)
class RuntimeSettings:
    """How a SuperNode runs here (this module's options, and ``deploy supernode``'s of the same names):
    its idle poll, its looks for a ClientApp's reply, and warm ClientApps."""

    poll_interval: float = DEFAULT_POLL_S
    reply_check: float = REPLY_CHECK_S
    warm: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RuntimeSettings:
        """From a parser that :func:`add_runtime_arguments` set up."""
        return cls(args.poll_interval, args.reply_check, args.warm)

    def argv(self, changed_only: bool = False) -> list[str]:
        """The options that give these settings; ``changed_only``: those that differ from the defaults."""
        default = RuntimeSettings()
        out = []
        for option, value, default_value in (
            ("--poll-interval", self.poll_interval, default.poll_interval),
            ("--reply-check", self.reply_check, default.reply_check),
        ):
            if not changed_only or value != default_value:
                out += [option, f"{value:g}"]
        if not changed_only or self.warm != default.warm:
            out.append("--warm" if self.warm else "--no-warm")
        return out


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--poll-interval``, ``--reply-check`` and ``--warm`` / ``--no-warm``: here and on
    ``deploy supernode``."""
    p.add_argument(
        "--poll-interval",
        type=poll_seconds,
        default=DEFAULT_POLL_S,
        help=f"longest wait (s) before asking again for a message (Flower: a fixed 3; {DEFAULT_POLL_S:g})",
    )
    p.add_argument(
        "--reply-check",
        type=poll_seconds,
        default=REPLY_CHECK_S,
        help=f"longest wait (s) between looks for a ClientApp's reply (Flower: 0.5; {REPLY_CHECK_S:g})",
    )
    p.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fork each message's ClientApp from a process that has imported torch and flwr",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.node", description=__doc__.split("\n\n")[0])
    add_runtime_arguments(p)
    p.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's arguments")
    args = p.parse_args(argv)
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    settings = RuntimeSettings.from_args(args)
    loop = cap_supernode_poll(settings.poll_interval, settings.reply_check)
    try:  # its message's objects, while the server still sends them
        pull_retry.shorten(loop, "pull_objects")
    except ValueError as exc:  # a bad $FEDSAMATCH_PULL_RETRY_S
        p.error(str(exc))
    if settings.warm and (why := warm.unavailable()):
        print(f"deploy.node: no warm ClientApps: {why}; each message starts a fresh process", flush=True)
    elif settings.warm:
        reap_warm_server(start_warm_server(Path(sys.executable).parent / warm.LAUNCHER))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
