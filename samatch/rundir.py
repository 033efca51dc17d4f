"""A new run never writes into an earlier run's folder: the earlier run is moved aside first.

Without this, a second run with the same ``--out`` (or a second ``make run``) appended its rows to
the first run's ``metrics.csv``, left the first run's ``eval_val/`` beside the new ``best.pt``, and
kept a ``splits.json`` the new run had not written. Renaming the folder loses nothing and leaves the
named folder to the new run. A folder counts as a run's when it holds the ``config.json`` that every
run (centralized, federated, comparison) writes first; any other folder is left as it is.
"""

from __future__ import annotations

import time
from pathlib import Path

RUN_MARKER = "config.json"


def set_aside(out: str | Path) -> Path | None:
    """Rename the run folder ``out`` to ``<out>.<YYYYmmdd-HHMMSS>`` (when its config.json was
    written, i.e. when that run started; ``-2``, ``-3``... on a clash) and return the new path; None
    when ``out`` holds no run."""
    out = Path(out).resolve()  # also names "." or ".."
    marker = out / RUN_MARKER
    if not marker.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(marker.stat().st_mtime))
    target, n = out.with_name(f"{out.name}.{stamp}"), 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.{stamp}-{n}")
    out.rename(target)
    return target


def moved_note(out: str | Path, moved: Path) -> str:
    """The line a command prints after :func:`set_aside` moved ``out``."""
    return f"{out} held an earlier run: moved it to {moved}"


def in_folder(path: str | Path, folder: str | Path) -> bool:
    """``path`` (a checkpoint, or the folder holding one) is ``folder`` or a file in it: a resume
    that continues the run in ``folder``, which must stay where it is."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return f in (p, p.parent)
