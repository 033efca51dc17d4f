"""Dataset readers by format name, and :func:`open_dataset` that picks one for a folder.

Every reader fulfils the contract of :mod:`samatch.io.base`; see each module for its layout.
"""

from __future__ import annotations

from pathlib import Path

from samatch.io.acdc import AcdcH5Reader, AcdcNiftiReader
from samatch.io.base import Case, CaseMeta, CaseRef, DataError, Reader
from samatch.io.busi import BusiReader
from samatch.io.labelmap import PRESETS, LabelMap, parse_label_map
from samatch.io.nifti import NiftiReader
from samatch.io.packed import PackedReader

# Detection tries formats in this order; the generic NIfTI layout goes last as the loosest match.
READERS: dict[str, type[Reader]] = {}


def register_reader(cls: type[Reader]) -> type[Reader]:
    """Add a reader class under ``cls.name`` (usable as a decorator)."""
    READERS[cls.name] = cls
    return cls


for _cls in (AcdcH5Reader, AcdcNiftiReader, BusiReader, NiftiReader, PackedReader):
    register_reader(_cls)


def detect_format(root: str | Path) -> str:
    """Name of the first registered format whose layout ``root`` matches; DataError if none does."""
    root = Path(root)
    if root.is_file() and PackedReader.detect(root):
        return PackedReader.name
    if not root.is_dir():
        raise DataError(
            root,
            "a file, not a dataset folder (nor a packed dataset)" if root.exists() else "folder not found",
        )
    for name, cls in READERS.items():
        if cls.detect(root):
            return name
    raise DataError(
        root,
        f"cannot detect the dataset format; give it (--format or data.format): one of {', '.join(READERS)}",
    )


def open_dataset(root: str | Path, fmt: str | None = None, label_map: str | LabelMap | None = None) -> Reader:
    """Reader for ``root``: format ``fmt``, or auto-detected when None. ``label_map``: see labelmap."""
    name = detect_format(root) if fmt is None else fmt
    if name not in READERS:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(READERS)}")
    return READERS[name](root, label_map=label_map)


__all__ = [
    "PRESETS",
    "READERS",
    "Case",
    "CaseMeta",
    "CaseRef",
    "DataError",
    "LabelMap",
    "Reader",
    "detect_format",
    "open_dataset",
    "parse_label_map",
    "register_reader",
]
