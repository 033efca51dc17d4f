"""Write-then-rename saving and forgiving loading of the site-local caches (embeddings, slices).

Both caches hold data derived from a site's scans in a folder of that site; a file is written under
a temporary name and renamed, so a concurrent reader (another worker of the same site) never sees a
half-written file, and a file that cannot be read counts as missing and is prepared again.

Set files (one per prepared slice set, per set of embeddings) are derived from files that stay, and
every new grouping of a site's slices (another split, another ``max_unlabeled``, a changed case file)
adds one, so their folder (``sets/`` in each cache folder) is pruned: :func:`keep_set` leaves the
:data:`KEEP_SETS` most recently used (written, or read with ``mark_used``) and every set used in the
last :data:`KEEP_RECENT_S` seconds, and a set pruned is prepared again when next asked for. Only
files named as the caches name them (a 32-digit hex key) are ever deleted, so a folder shared with
other files loses none of them.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

# Set files kept per folder, the most recently used: the labeled and unlabeled sets of 12 sites, as
# when a simulation's sites share one folder (runs/sam_cache).
KEEP_SETS = 24
# ... and, however many there are, every set used within this many seconds: a simulation of more sites
# than that uses each of its sets every round, and a count alone would prune one site's sets for
# another's in every round, so that each site would prepare and write its sets again every round.
KEEP_RECENT_S = 6 * 3600.0
T = TypeVar("T")
SET_NAME = re.compile(r"[0-9a-f]{32}\.pt")  # <key>.pt: what prune may delete


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` (its folder is created) through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def keep(obj: Any, path: Path) -> bool:
    """:func:`save_atomic`, or, when the folder cannot take the file (read-only, full, not a folder),
    a warning naming the file and the error: a cache that cannot be written is skipped, the
    run goes on. True when saved."""
    try:
        save_atomic(obj, path)
    except (OSError, RuntimeError) as err:  # a full disk: torch.save's writer raises RuntimeError
        warnings.warn(
            f"{path}: not kept ({err}); the next process prepares it again", RuntimeWarning, stacklevel=2
        )
        return False
    return True


def keep_set(obj: Any, path: Path) -> bool:
    """:func:`keep` a set file, then remove the set files of its folder beyond the :data:`KEEP_SETS`
    most recently used and not used in the last :data:`KEEP_RECENT_S` seconds (:func:`prune`; the new
    one stays). True when saved."""
    saved = keep(obj, path)
    if saved:
        prune(path.parent, KEEP_SETS, spare=path, recent_s=KEEP_RECENT_S)
    return saved


def set_or_prepare(
    path: Path,
    decode: Callable[[Any], T | None],
    prepare: Callable[[], T],
    encode: Callable[[T], Any] | None = None,
) -> T:
    """A set file's contents: ``decode`` of ``path`` as read (mapped, marked used) when it is readable
    and ``decode`` accepts it (not None); else ``prepare()``, kept (:func:`keep_set`) as its
    ``encode`` (itself when None), so an unreadable or outdated file is replaced."""
    kept = load_or_none(path, mmap=True, mark_used=True)
    found = None if kept is None else decode(kept)
    if found is not None:
        return found
    fresh = prepare()
    keep_set(fresh if encode is None else encode(fresh), path)
    return fresh


def prune(folder: Path, keep_newest: int, spare: Path | None = None, recent_s: float = 0.0) -> list[Path]:
    """Delete the set files (``<32 hex digits>.pt``) directly in ``folder`` but the ``keep_newest``
    most recently modified, those modified in the last ``recent_s`` seconds and ``spare``; returns
    those deleted. Other files are never touched. A file that another process has mapped stays
    readable to it (POSIX), and one that vanishes meanwhile or cannot be deleted is passed over."""

    def modified(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return float("inf")  # gone already: nothing to delete

    sets = [(modified(p), p) for p in folder.glob("*.pt") if SET_NAME.fullmatch(p.name) and p != spare]
    sets.sort(key=lambda pair: pair[0], reverse=True)
    removed = []
    since = time.time() - recent_s
    for mtime, p in sets[max(0, keep_newest - (spare is not None)) :]:
        if mtime >= since:
            continue
        try:
            p.unlink()
        except OSError:
            continue
        removed.append(p)
    return removed


def load_or_none(path: Path, mmap: bool = False, mark_used: bool = False) -> Any | None:
    """``torch.load`` (tensors and plain containers only) of ``path``, or None when it is missing or
    unreadable. ``mmap``: tensors map the file and are read from it as they are used. ``mark_used``:
    a file read is given the current modification time, so :func:`prune` keeps it longest."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # noqa: BLE001 - any unreadable file is simply prepared again
        return None
    if mark_used:
        try:
            os.utime(path)
        except OSError:  # a read-only folder: the file is used, it is just not marked
            pass
    return obj
