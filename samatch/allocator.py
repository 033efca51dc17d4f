"""The process's memory allocator: mimalloc (or jemalloc) keeping freed pages, chosen at launch.

A training step on the CPU allocates and frees gigabytes of big blocks (the activations of a 256 x
256 batch). glibc's malloc maps each block above 32 MiB afresh and unmaps it when freed, so every
step pays the kernel to map and zero the same memory again: on this project's 2-core CPU most of a
batch-12 step was system time. An allocator that keeps freed pages mapped and reuses them removes
that cost: measured with jemalloc and with mimalloc, steps 1.2-2.2x faster and the joint SAM-Match
step within 1.3x of the UniMatch step (docs/performance.md, "allocator").

The allocator must be in place before the process's first allocation, so it cannot be switched from
inside Python: the launcher preloads its library (``LD_PRELOAD``) with the setting that keeps freed
pages, either in a child's environment (:func:`launch_env`, e.g. ``deploy supernode`` for its
ClientApps) or by starting this same command again under it (:func:`relaunch`, the ``samatch``
command line and the benchmarks). mimalloc comes from PyPI (``cmeel-mimalloc``, a dependency on
Linux x86_64 and aarch64); jemalloc from the system (Debian: ``apt-get install libjemalloc2``).

Choices: ``auto`` (an allocator the launcher preloaded already is kept; else mimalloc where
installed; else the system's), ``system`` (preload nothing: glibc's malloc unless ``LD_PRELOAD``
already names another), ``mimalloc``, ``jemalloc``. The cost: the process keeps its peak memory
until it exits.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

CHOICES = ("auto", "system", "mimalloc", "jemalloc")
ENV_CHOICE = "FEDSAMATCH_ALLOCATOR"  # the default of every --allocator option
_RELAUNCHED = "FEDSAMATCH_ALLOCATOR_RELAUNCHED"  # set in a relaunched process: never relaunch twice

# Each allocator's setting that keeps freed pages mapped (no purge / decay back to the kernel).
KEEP_PAGES = {
    "mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"},
    "jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
}
JEMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
HINT = {
    "mimalloc": "pip install cmeel-mimalloc (Linux)",
    "jemalloc": "apt-get install libjemalloc2",
}


def default_choice() -> str:
    """The ``--allocator`` default: ``$FEDSAMATCH_ALLOCATOR``, else ``auto``."""
    return os.environ.get(ENV_CHOICE, "") or "auto"


def add_allocator_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--allocator``, as every command that starts a training process has it."""
    parser.add_argument(
        "--allocator",
        choices=CHOICES,
        default=default_choice() if default is None else default,
        help=f"host memory allocator (default ${ENV_CHOICE} or auto: an allocator already preloaded "
        "is kept, else mimalloc keeping freed pages where installed; system: add none)",
    )


def library(name: str) -> Path | None:
    """Path of ``name``'s shared library, or None where it is not installed (or not on Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    if name == "mimalloc":
        try:
            dist = metadata.distribution("cmeel-mimalloc")
        except metadata.PackageNotFoundError:
            return None
        # cmeel.prefix/lib/libmimalloc.so.3 (versioned names; not the static archive)
        found = sorted(
            Path(str(dist.locate_file(f)))
            for f in dist.files or []
            if Path(str(f)).name.startswith("libmimalloc.so.")
        )
        return next((p for p in found if p.is_file()), None)
    if name == "jemalloc":
        found = (Path(d) / "libjemalloc.so.2" for d in JEMALLOC_DIRS)
        return next((p for p in found if p.is_file()), None)
    raise ValueError(f"allocator {name!r}: choose one of {', '.join(CHOICES)}")


def preloaded(env: Mapping[str, str]) -> str:
    """The allocator ``env``'s ``LD_PRELOAD`` names (``mimalloc``, ``jemalloc``), else ``system``."""
    names = [Path(p).name for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    for name in ("mimalloc", "jemalloc"):
        if any(n.startswith(f"lib{name}.so") for n in names):
            return name
    return "system"


def _to_add(choice: str, env: Mapping[str, str]) -> str | None:
    """The allocator to preload into ``env`` for ``choice``, or None to leave ``env`` as it is."""
    if choice not in CHOICES:
        raise ValueError(f"allocator {choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "system":
        return None
    if choice == "auto":  # the launcher preloaded one itself (its own settings): keep it
        if preloaded(env) != "system":
            return None
        return "mimalloc" if library("mimalloc") is not None else None
    return choice


def resolve(choice: str, env: Mapping[str, str] | None = None) -> str:
    """The allocator a process started with ``env`` (default: this one's) and ``choice`` runs on:
    ``auto`` -> one already preloaded, else ``mimalloc`` where installed, else ``system``."""
    env = os.environ if env is None else env
    return _to_add(choice, env) or preloaded(env)


def keeps_pages(name: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``env`` (default: this process's) holds ``name``'s keep-freed-pages setting."""
    env = os.environ if env is None else env
    return all(env.get(k) == v for k, v in KEEP_PAGES.get(name, {}).items())


def launch_env(choice: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``choice``'s library preloaded and its
    keep-pages setting; ``system``, and ``auto`` where ``base`` preloads an allocator already, return
    ``base`` unchanged. A named allocator that is not installed is a one-line ValueError saying how
    to install it."""
    env = dict(os.environ if base is None else base)
    name = _to_add(choice, env)
    if name is None:
        return env
    lib = library(name)
    if lib is None:
        raise ValueError(f"allocator {name}: its library is not installed ({HINT[name]})")
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != str(lib)]
    env["LD_PRELOAD"] = ":".join([str(lib), *preload])
    env.update(KEEP_PAGES[name])
    return env


def active() -> str:
    """The allocator this process runs on: ``mimalloc`` or ``jemalloc`` when its library is mapped
    (``/proc/self/maps``), else ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return "system"
    for name in ("mimalloc", "jemalloc"):
        if f"lib{name}.so" in maps:
            return name
    return "system"


def _interactive() -> bool:
    """A REPL or a notebook kernel: never replaced by a relaunch."""
    return hasattr(sys, "ps1") or bool(sys.flags.interactive) or "ipykernel" in sys.modules


def relaunch(choice: str, argv: list[str] | None, parser: argparse.ArgumentParser | None = None) -> None:
    """Start this same command again (``os.execve``: same PID, same arguments) on ``choice``'s
    allocator with its keep-pages setting (:func:`launch_env`). ``argv`` is the calling ``main``'s:
    None (run from the command line) relaunches; a list (an in-process call, e.g. a test) leaves the
    process alone, as do a REPL or notebook and a process that already runs so. A relaunched process
    never relaunches again: if the dynamic loader could not preload the library it goes on as it is,
    with a warning. A bad choice is ``parser.error`` (exit 2) where a parser is given, else a
    ValueError."""
    if os.environ.pop(_RELAUNCHED, None) is not None:  # this is the relaunch; its children may again
        want = resolve(choice)
        if active() != want:
            print(f"warning: allocator {want} was not preloaded; running on {active()}", file=sys.stderr)
        return
    if argv is not None or _interactive():
        return
    try:
        name = _to_add(choice, os.environ)
        if name is None or (active() == name and keeps_pages(name)):  # nothing to add
            return
        env = launch_env(name)
    except ValueError as err:
        if parser is None:
            raise
        parser.error(str(err))
    env[_RELAUNCHED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps the interpreter's own options (`-m samatch.cli`, a console script's path).
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def describe() -> str:
    """One line for logs: the active allocator and whether it keeps freed pages."""
    name = active()
    if name == "system":
        return "host allocator: the system's malloc"
    return f"host allocator: {name} ({'freed pages kept' if keeps_pages(name) else 'default page release'})"


def main(argv: list[str] | None = None) -> int:
    """``python -m samatch.allocator [--allocator CHOICE]``: the shell ``export`` lines that start a
    program on CHOICE's allocator, for launchers that are not Python (``scripts/flwr_run.sh``:
    ``eval "$(python -m samatch.allocator)"``). Prints nothing where nothing is to add."""
    parser = argparse.ArgumentParser(
        prog="python -m samatch.allocator",
        description="print the shell exports that start a program on the chosen allocator",
    )
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    try:
        env = launch_env(args.allocator)
    except ValueError as err:
        parser.error(str(err))
    for key in sorted(env):
        if os.environ.get(key) != env[key]:
            print(f"export {key}={shlex.quote(env[key])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
