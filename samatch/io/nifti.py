"""Generic NIfTI reader: CHAOS-style pairs or an nnU-Net raw dataset folder.

Layouts (detected from names, in this order):

``nnunet``
    ``ROOT/dataset.json``, ``ROOT/imagesTr/CASE_0000.nii.gz``, ``ROOT/labelsTr/CASE.nii.gz``.
    Classes come from ``dataset.json`` ``labels`` (v2 ``{"name": index}`` or v1 ``{"index": "name"}``).
    Only single-channel datasets are supported; ``imagesTs`` (no labels) is ignored.
``chaos``
    ``ROOT/image_N.nii.gz`` with ``ROOT/label_N.nii.gz`` (``.nii`` also accepted); case id ``case_N``.
    Without a label map the classes are *the values found* in the label files: ``num_classes`` is
    the largest value found + 1, computed on first use by reading every label file (not cheap), and
    loading a case does not check the label range. Pass a label map (e.g. ``chaos-liver``) to
    declare the task.

Neither layout has patient ids: every case is its own patient. Neither has splits.

Arrays: NIfTI stores ``(x, y, z)``; the reader returns ``(z, y, x)`` (``meta.axes == "xyz->zyx"``),
``meta.spacing`` is the header's voxel size in the same ``(z, y, x)`` order, and ``meta.affine`` is
the file's own affine (for the ``(x, y, z)`` axis order), so a writer can transpose back and reuse it.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from samatch.io.base import (
    Case,
    CaseMeta,
    CaseRef,
    DataError,
    Reader,
    check_case,
    require_file,
    to_label_values,
)
from samatch.io.labelmap import LabelMap, parse_label_map

# What nibabel and gzip raise for truncated or corrupt files.
_NIFTI_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)

_CHAOS_RE = re.compile(r"^(image|label)_(\d+)\.nii(\.gz)?$")


def read_nifti(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a 3D NIfTI file.

    Returns ``(data, spacing, affine)``: ``data`` as stored (scaling applied, dtype kept) transposed
    to ``(Z, Y, X)``; ``spacing`` ``(z, y, x)`` mm from the header; ``affine`` 4x4 of the file's axes.
    Raises DataError for a missing, unreadable or non-3D file.
    """
    p = require_file(path)
    try:
        img = nib.load(str(p))
        shape = img.shape
    except _NIFTI_ERRORS as err:
        raise DataError(p, f"cannot read NIfTI (truncated or corrupt?): {_one_line(err)}") from None
    # Checked before reading the data so a 4D cine file is refused without decompressing it.
    if len(shape) == 4:
        raise DataError(p, f"4D image of shape {shape}; expected a 3D volume (pass one frame)")
    if len(shape) != 3:
        raise DataError(p, f"{len(shape)}D image of shape {shape}; expected a 3D volume")
    try:
        data = np.asanyarray(img.dataobj)
        zooms = img.header.get_zooms()[:3]
        affine = np.asarray(img.affine, dtype=np.float64)
    except _NIFTI_ERRORS as err:
        raise DataError(p, f"cannot read NIfTI (truncated or corrupt?): {_one_line(err)}") from None
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    return np.ascontiguousarray(data.transpose(2, 1, 0)), spacing, affine


def load_nifti_case(
    ref: CaseRef, num_classes: int | None, label_map: LabelMap | None, extra: dict | None = None
) -> Case:
    """Load ``ref.paths == (image, label)`` and validate (shared by the NIfTI readers)."""
    image_path, label_path = ref.paths
    require_file(image_path)
    require_file(label_path)
    raw, spacing, affine = read_nifti(image_path)
    image = raw.astype(np.float32)
    raw_label, _, _ = read_nifti(label_path)
    label = to_label_values(raw_label, label_path)
    if label_map is not None:
        label = label_map.apply(label)
    check_case(image, label, num_classes, image_path, label_path)
    meta = CaseMeta(
        case_id=ref.case_id,
        patient_id=ref.patient_id,
        source=str(image_path),
        spacing=spacing,
        affine=affine,
        axes="xyz->zyx",
        extra=dict(extra or {}, label_source=str(label_path)),
    )
    return Case(image=image, label=label, meta=meta)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class NiftiReader(Reader):
    """CHAOS-style or nnU-Net-style NIfTI folder (see module docstring)."""

    name = "nifti"

    def __init__(self, root: str | Path, label_map: str | LabelMap | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "folder not found")
        self.label_map = parse_label_map(label_map)
        self.layout = "nnunet" if (self.root / "imagesTr").is_dir() else "chaos"
        self._ending = ".nii.gz"
        self._declared: tuple[str, ...] | None = None
        if self.layout == "nnunet":
            self._declared, self._ending = _read_dataset_json(self.root / "dataset.json")
        self._found: tuple[str, ...] | None = None

    @classmethod
    def detect(cls, root: Path) -> bool:
        if (root / "imagesTr").is_dir() or (root / "dataset.json").is_file():
            return True
        return any(_CHAOS_RE.match(p.name) for p in root.glob("image_*"))

    # Classes: label map first, then dataset.json, then (CHAOS without a map) the values found.
    @property
    def class_names(self) -> tuple[str, ...]:
        declared = self.declared_classes()
        if declared is not None:
            return declared
        if self._found is None:
            self._found = self._scan_label_values()
        return self._found

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def declared_classes(self) -> tuple[str, ...] | None:
        if self.label_map is not None:
            return self.label_map.class_names
        return self._declared

    def _check_classes(self) -> int | None:
        """Class count to validate labels against, or None when classes are defined by the data."""
        declared = self.declared_classes()
        return None if declared is None else len(declared)

    def available_splits(self) -> list[str]:
        return []

    def cases(self, split: str | None = None) -> list[CaseRef]:
        if split is not None:
            raise DataError(
                self.root, f"split {split!r} not available: this {self.layout} folder has no splits"
            )
        pairs = self._nnunet_pairs() if self.layout == "nnunet" else self._chaos_pairs()
        if not pairs:
            raise DataError(self.root, f"no {self.layout}-style NIfTI cases found")
        return [
            CaseRef(case_id=cid, patient_id=cid, split=None, paths=(str(img), str(lab)), loader=self._load)
            for cid, img, lab in pairs
        ]

    def _chaos_pairs(self) -> list[tuple[str, Path, Path]]:
        found: dict[int, dict[str, Path]] = {}
        for p in self.root.iterdir():
            m = _CHAOS_RE.match(p.name)
            if m:
                found.setdefault(int(m.group(2)), {})[m.group(1)] = p
        # A half pair still becomes a case: loading it reports the missing file by name.
        return [
            (
                f"case_{n}",
                found[n].get("image", self.root / f"image_{n}.nii.gz"),
                found[n].get("label", self.root / f"label_{n}.nii.gz"),
            )
            for n in sorted(found)
        ]

    def _nnunet_pairs(self) -> list[tuple[str, Path, Path]]:
        images = self.root / "imagesTr"
        end = self._ending
        stems = sorted(p.name[: -len(end)] for p in images.iterdir() if p.name.endswith(end))
        # nnU-Net names channel k of case C as C_000k; only channel 0 is supported.
        channels = {stem[-4:] for stem in stems if re.search(r"_\d{4}$", stem)}
        if channels - {"0000"}:
            raise DataError(
                images, f"multi-channel nnU-Net datasets are not supported (channels {sorted(channels)})"
            )
        cases = [stem[:-5] for stem in stems if stem.endswith("_0000")]
        return [(c, images / f"{c}_0000{end}", self.root / "labelsTr" / f"{c}{end}") for c in cases]

    def _load(self, ref: CaseRef) -> Case:
        return load_nifti_case(ref, self._check_classes(), self.label_map, {"layout": self.layout})

    def _scan_label_values(self) -> tuple[str, ...]:
        top = 0
        for ref in self.cases():
            raw, _, _ = read_nifti(ref.paths[1])
            lab = to_label_values(raw, ref.paths[1])
            top = max(top, int(lab.max()) if lab.size else 0)
        return ("background",) + tuple(f"class{i}" for i in range(1, top + 1))


def _read_dataset_json(path: Path) -> tuple[tuple[str, ...], str]:
    """nnU-Net ``dataset.json`` -> (class names by index, file ending)."""
    require_file(path)
    try:
        info = json.loads(path.read_text())
        labels = info["labels"]
        if all(str(k).isdigit() for k in labels):  # v1: {"0": "background", "1": "liver"}
            by_index = {int(k): str(v) for k, v in labels.items()}
        else:  # v2: {"background": 0, "liver": 1}
            by_index = {int(v): str(k) for k, v in labels.items()}
        ending = str(info.get("file_ending", ".nii.gz"))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(path, f"cannot read nnU-Net labels: {_one_line(err)}") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(path, f"label indices must be 0..N-1, got {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index))), ending
