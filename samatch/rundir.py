"""A new run never writes into an earlier run's folder: the earlier run is moved aside first.

Without this, a second run with the same ``--out`` (or a second ``make run``) appended its rows to
the first run's ``metrics.csv``, left the first run's ``eval_val/`` beside the new ``best.pt``, and
kept a ``splits.json`` the new run had not written. Renaming the folder loses nothing and leaves the
named folder to the new run. A folder counts as a run's when it holds the ``config.json`` that every
run (centralized, federated, comparison) writes first; any other folder is left as it is.

Callers move the folder only once the new run's inputs have been read and checked, so a command that
fails on bad input leaves the earlier run where it was.

A live run holds its folder (:func:`hold`: an advisory lock on ``<out>/.run.lock``, which the
kernel releases when the process ends, however it ends); a folder held by another process is neither
moved aside nor taken by a second run. Where the platform has no ``fcntl`` (Windows) nothing is held.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

RUN_MARKER = "config.json"
LOCK_NAME = ".run.lock"


_HELD: set[int] = set()  # descriptors through which this process holds run folders


def _close_held_in_child() -> None:
    """A forked child shares its parent's locks (flock belongs to the open file, not the process)
    and would keep a folder held after the parent let go: the child closes its copies, which leaves
    the parent's lock in place (it is released by the last close). Until the handler has run, just
    after the fork, the two still share it."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


if fcntl is not None:
    os.register_at_fork(after_in_child=_close_held_in_child)


def _lock(path: Path, create: bool) -> int | None:
    """A descriptor holding the exclusive lock on ``path/.run.lock``, or None: no lock file there
    and ``create`` false (no run of this version held the folder), a lock file this process may not
    read, or nothing can be locked (no ``fcntl``; a file system without locks). Raises ValueError,
    one line naming the folder, when another process holds it, or (``create``) when the lock file
    cannot be written or the folder moves meanwhile."""
    if fcntl is None:
        return None
    lock = path / LOCK_NAME
    try:
        fd = os.open(lock, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o644)
    except OSError as err:
        if create:
            raise ValueError(
                f"{path}: cannot write the run's lock file {LOCK_NAME} ({err.strerror})"
            ) from None
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ValueError(f"{path}: a live run ({holder}) is writing there; wait for it to end") from None
    except OSError:  # no locks on this file system (ENOLCK, EOPNOTSUPP)
        os.close(fd)
        return None
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(lock))
    except FileNotFoundError:
        same = False
    if not same:  # renamed (moved aside) between the open and the lock: this lock guards nothing
        os.close(fd)
        raise ValueError(f"{path}: another run moved the folder while this one was taking it; try again")
    _HELD.add(fd)
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        _HELD.discard(fd)
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


def check_free(out: str | Path) -> None:
    """Raise the ValueError of :func:`hold` now if another process holds ``out``: before a run's
    slow set-up, which would otherwise be refused only at its end."""
    path = Path(out)
    if path.is_dir():
        _release(_lock(path, create=False))


@contextmanager
def hold(out: str | Path) -> Iterator[Path]:
    """While the block runs, the folder ``out`` (made if missing) is this process's run folder:
    :func:`set_aside` in any other process refuses to move it and a second :func:`hold` on it fails
    (ValueError naming the holder's pid and host)."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    fd = _lock(path, create=True)
    try:
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        _release(fd)


def set_aside(out: str | Path, inputs: Iterable[str | Path] = ()) -> Path | None:
    """Rename the run folder ``out`` to ``<out>.<YYYYmmdd-HHMMSS>`` (when its config.json was last
    written: the run's start, or its last resume; ``-2``, ``-3``... on a clash) and return the new
    path (relative when ``out`` is); None when ``out`` holds no run.

    A symbolic link is renamed itself, its target left as it is. Refused (ValueError) when the
    working folder lies in ``out``, or when one of ``inputs`` (files or folders the new run still
    has to read) does: moving them would pull them from under the new run; or when a live run
    holds it (:func:`hold`).
    """
    given = Path(out)
    path = Path(os.path.abspath(given))  # absolute, links not followed: "runs/x/.." is "runs"
    marker = path / RUN_MARKER
    if not marker.is_file():
        return None
    for inside in [Path.cwd(), *(Path(os.path.abspath(p)) for p in inputs if str(p))]:
        if inside == path or path in inside.parents:
            what = "the working folder" if inside == Path.cwd() else str(inside)
            raise ValueError(
                f"{given}: holds an earlier run, which a new run moves aside, and {what} lies in it; "
                "choose another output folder (or resume)"
            )
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(marker.stat().st_mtime))
    target, n = path.with_name(f"{path.name}.{stamp}"), 1
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f"{path.name}.{stamp}-{n}")
    fd = _lock(path, create=False)  # held across the rename: no run starts in it meanwhile
    try:
        path.rename(target)
    finally:
        _release(fd)
    return target if given.is_absolute() else Path(os.path.relpath(target))


def moved_note(out: str | Path, moved: Path) -> str:
    """The line a command prints after :func:`set_aside` moved ``out``."""
    return f"{out} held an earlier run: moved it to {moved}"


def in_folder(path: str | Path, folder: str | Path) -> bool:
    """``path`` (a checkpoint, or the folder holding one) is ``folder`` or a file in it: a resume
    that continues the run in ``folder``, which must stay where it is."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return f in (p, p.parent)
