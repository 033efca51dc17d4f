"""Write-then-rename saving and forgiving loading of the site-local caches (embeddings, slices).

Both caches hold data derived from a site's scans in a folder of that site; a file is written under
a temporary name and renamed, so a concurrent reader (another worker of the same site) never sees a
half-written file, and a file that cannot be read counts as missing and is prepared again.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch


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


def load_or_none(path: Path, mmap: bool = False) -> Any | None:
    """``torch.load`` (tensors and plain containers only) of ``path``, or None when it is missing or
    unreadable. ``mmap``: tensors map the file and are read from it as they are used."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # noqa: BLE001 - any unreadable file is simply prepared again
        return None
