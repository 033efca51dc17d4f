"""The one reader contract every dataset reader fulfils.

A reader turns a dataset folder into *case references* cheaply (no pixel data read) and loads one
case on demand. Every loaded case has the same form, whatever the file format:

``Case.image``
    ``float32`` array of shape ``(Z, H, W)``: slices first, then rows, then columns. A 2D image
    (BUSI PNG, one ACDC training slice) has ``Z == 1``. Intensities are as stored in the file
    (no normalisation here; see :mod:`samatch.preprocess`).
``Case.label``
    ``uint8`` array of the same shape, class indices ``0..num_classes-1`` after the reader's label
    map has been applied, or ``None`` for an unlabeled case.
``Case.meta`` (:class:`CaseMeta`)
    ``case_id`` (unique within the dataset), ``patient_id`` (splits are made by patient),
    ``spacing`` (``(z, y, x)`` in mm, or ``None`` when the format carries none, as ACDC's h5 files),
    ``affine`` (4x4 voxel-to-world matrix of the *file's* axis order, or ``None``), ``source`` (the
    image file's path), ``axes`` (how ``(Z, H, W)`` was obtained from the file, so that a writer can
    invert it: ``"zyx"`` for data already stored slices-first, ``"xyz->zyx"`` for NIfTI).

Readers raise :class:`DataError` with a one-line message naming the file and the problem; nothing
else escapes them for bad input. Every reader subclasses :class:`Reader` and checks each loaded
case with :func:`check_case` (finite, non-constant image; label of the image's shape with values
among the declared classes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np


class DataError(ValueError):
    """Bad input data. ``str(err)`` is one line: ``<path>: <problem>``."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class CaseMeta:
    case_id: str
    patient_id: str
    source: str
    spacing: tuple[float, float, float] | None = None
    affine: np.ndarray | None = field(default=None, compare=False, repr=False)
    axes: str = "zyx"
    extra: dict = field(default_factory=dict, compare=False)


@dataclass
class Case:
    image: np.ndarray  # (Z, H, W) float32
    label: np.ndarray | None  # (Z, H, W) uint8 or None
    meta: CaseMeta

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True)
class CaseRef:
    """A case found on disk but not read: enough to split by patient and to load later.

    ``split`` is the dataset's own split name where the layout has one (``train``, ``val``,
    ``test``), else ``None``. ``load`` reads and validates the files (raises :class:`DataError`).
    """

    case_id: str
    patient_id: str
    split: str | None
    paths: tuple[str, ...]
    loader: Callable[[CaseRef], Case] = field(compare=False, repr=False)
    # Known from the path alone, so splits can use them without reading pixels:
    # ``category`` is a coarse class of the case used to stratify splits (BUSI benign/malignant/normal),
    # ``num_slices`` is Z where the layout fixes it (1 for a 2D slice or image), else None.
    category: str | None = None
    num_slices: int | None = None

    def load(self) -> Case:
        return self.loader(self)


class Reader:
    """Base of every dataset reader: a folder in, :class:`CaseRef` lists out.

    Subclasses set ``name`` (the format name used by ``--format``), fill ``num_classes`` and
    ``class_names`` in ``__init__(root, label_map=None)``, and implement :meth:`available_splits`,
    :meth:`cases` and :meth:`detect`. ``cases`` must stay cheap (no pixel data read);
    ``CaseRef.load`` reads and validates with :func:`check_case`.
    """

    name: ClassVar[str] = ""
    root: Path
    num_classes: int
    class_names: tuple[str, ...]

    def available_splits(self) -> list[str]:
        """The dataset's own split names present on disk (``[]`` when the layout has none)."""
        raise NotImplementedError

    def cases(self, split: str | None = None) -> list[CaseRef]:
        """Cases of ``split``; ``None`` means every case the reader finds."""
        raise NotImplementedError

    @classmethod
    def detect(cls, root: Path) -> bool:
        """True when ``root`` looks like this format (cheap: names only)."""
        raise NotImplementedError

    def declared_classes(self) -> tuple[str, ...] | None:
        """Class names known without reading label files, or None where the data defines them."""
        return self.class_names


def require_file(path: str | Path) -> Path:
    """``path`` as a Path, or :class:`DataError` when it is not an existing file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "file not found" if not p.exists() else "not a file")
    return p


def to_label_values(raw: np.ndarray, path: str | Path) -> np.ndarray:
    """Stored label values as ``uint8``, or :class:`DataError` when they cannot be class indices.

    NIfTI labels are often stored as float; they must still be whole numbers in ``0..255``.
    """
    lab = np.asarray(raw)
    if lab.size == 0:
        return lab.astype(np.uint8)
    if lab.dtype.kind == "f":
        if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
            raise DataError(path, "label has non-integer values")
    elif lab.dtype.kind not in "iub":
        raise DataError(path, f"label has unsupported dtype {lab.dtype}")
    lo, hi = lab.min(), lab.max()
    if lo < 0 or hi > 255:
        raise DataError(path, f"label values outside 0..255 (min {lo}, max {hi})")
    return lab.astype(np.uint8)


def check_case(
    image: np.ndarray,
    label: np.ndarray | None,
    num_classes: int | None,
    image_path: str | Path,
    label_path: str | Path | None = None,
) -> None:
    """Raise :class:`DataError` unless ``image``/``label`` meet the contract above.

    ``image``: float32 (Z, H, W), finite, not constant. ``label``: uint8 of the same shape with
    values below ``num_classes`` (skipped when ``num_classes`` is None: classes not declared).
    """
    label_path = image_path if label_path is None else label_path
    if image.ndim != 3 or image.dtype != np.float32:
        # A reader bug, not bad data: readers convert before checking.
        raise TypeError(f"reader must pass a float32 (Z, H, W) image, got {image.dtype} {image.shape}")
    if image.size == 0:
        raise DataError(image_path, f"empty image of shape {image.shape}")
    bad = ~np.isfinite(image)
    if bad.any():
        raise DataError(image_path, f"image has {int(bad.sum())} NaN or inf values")
    if image.min() == image.max():
        raise DataError(image_path, f"image is constant (every voxel {float(image.flat[0]):g})")
    if label is None:
        return
    if label.shape != image.shape:
        raise DataError(label_path, f"label shape {label.shape} differs from image shape {image.shape}")
    if num_classes is not None and label.size and int(label.max()) >= num_classes:
        values = sorted(int(v) for v in np.unique(label) if v >= num_classes)
        raise DataError(label_path, f"label values {values} outside the {num_classes} declared classes")
