"""ACDC cardiac MRI readers: the SSL4MIS h5 layout (``acdc-h5``) and the raw NIfTI layout (``acdc-nifti``).

Classes: 0 background, 1 RV (right ventricle cavity), 2 myocardium, 3 LV (left ventricle cavity).
Case names follow ACDC: ``patientXXX_frameYY`` for a volume (one cardiac phase of one patient) and
``patientXXX_frameYY_slice_Z`` for one 2D slice of it; the patient id is ``patientXXX``.

``acdc-h5`` (``ROOT/train_slices.list``, ``ROOT/val.list``, ``ROOT/test.list``, files under ``ROOT/data``)
    split ``train``: the slices of ``train_slices.list`` in list order (``data/slices/NAME.h5``,
    each a case with ``Z == 1``); splits ``val``/``test``: the volumes of ``val.list``/``test.list``
    (``data/NAME.h5``, ``(Z, H, W)``). A list that is absent means that split is absent. The h5 files
    carry no voxel spacing: ``meta.spacing`` is None and ``meta.extra["spacing_note"]`` says so.
``acdc-nifti`` (``ROOT/patientXXX/patientXXX_frameYY.nii.gz`` with ``..._gt.nii.gz``)
    one case per labelled frame; ``patientXXX_4d.nii.gz`` and ``Info.cfg`` are ignored. No split by
    default; if ``ROOT/train.list`` (or else ``train_slices.list``, reduced to its volumes),
    ``val.list`` or ``test.list`` exist they define the splits. Spacing and affine come from the
    header, axes as in :mod:`samatch.io.nifti`.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

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
from samatch.io.nifti import load_nifti_case

ACDC_CLASSES = ("background", "RV", "myocardium", "LV")
SPLIT_ORDER = ("train", "val", "test")
_NAME_RE = re.compile(r"^(patient\d{3})_frame\d{2}(_slice_\d+)?$")
_FRAME_FILE_RE = re.compile(r"^(patient\d{3}_frame\d{2})\.nii(\.gz)?$")


def patient_of(name: str, list_path: Path, line: int) -> str:
    """``patient099_frame01[_slice_3]`` -> ``patient099``; DataError naming the list line otherwise."""
    m = _NAME_RE.match(name)
    if not m:
        raise DataError(list_path, f"line {line}: {name!r} is not an ACDC name patientXXX_frameYY[_slice_Z]")
    return m.group(1)


def read_list(path: Path) -> list[tuple[str, str]]:
    """A ``.list`` file -> ``[(name, patient_id), ...]`` in file order; blank lines skipped."""
    require_file(path)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, raw in enumerate(path.read_text().splitlines(), start=1):
        name = raw.strip()
        if not name:
            continue
        if name in seen:
            raise DataError(path, f"line {i}: {name!r} listed twice")
        seen.add(name)
        out.append((name, patient_of(name, path, i)))
    return out


def _classes(label_map: LabelMap | None) -> tuple[str, ...]:
    return label_map.class_names if label_map is not None else ACDC_CLASSES


class _AcdcBase(Reader):
    """Shared split handling: ``_lists`` maps split name -> list file name."""

    _lists: dict[str, str] = {}

    def __init__(self, root: str | Path, label_map: str | LabelMap | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "folder not found")
        self.label_map = parse_label_map(label_map)
        self.class_names = _classes(self.label_map)
        self.num_classes = len(self.class_names)

    def available_splits(self) -> list[str]:
        return [s for s in SPLIT_ORDER if s in self._lists and (self.root / self._lists[s]).is_file()]

    def _split_list(self, split: str) -> list[tuple[str, str]]:
        if split not in self._lists:
            raise DataError(self.root, f"unknown split {split!r}; {self.name} splits are {list(self._lists)}")
        path = self.root / self._lists[split]
        if not path.is_file():
            raise DataError(path, f"split {split!r} not available: list file not found")
        return read_list(path)

    def _label(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        lab = to_label_values(raw, path)
        return self.label_map.apply(lab) if self.label_map is not None else lab


class AcdcH5Reader(_AcdcBase):
    """SSL4MIS-preprocessed ACDC (see module docstring). Images are already scaled to [0, 1]."""

    name = "acdc-h5"
    _lists = {"train": "train_slices.list", "val": "val.list", "test": "test.list"}
    SPACING_NOTE = "ACDC h5 files carry no voxel spacing"

    def __init__(self, root: str | Path, label_map: str | LabelMap | None = None):
        super().__init__(root, label_map)
        if not self.available_splits():
            raise DataError(self.root, f"no split list found ({', '.join(self._lists.values())})")

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "data").is_dir() and any((root / n).is_file() for n in cls._lists.values())

    def cases(self, split: str | None = None) -> list[CaseRef]:
        if split is None:
            return [ref for s in self.available_splits() for ref in self.cases(s)]
        entries = self._split_list(split)
        is_slice = split == "train"
        folder = self.root / "data" / ("slices" if is_slice else "")
        return [
            CaseRef(
                case_id=name,
                patient_id=pid,
                split=split,
                paths=(str(folder / f"{name}.h5"),),
                loader=self._load,
                num_slices=1 if is_slice else None,
            )
            for name, pid in entries
        ]

    def _load(self, ref: CaseRef) -> Case:
        path = ref.paths[0]
        raw_image, raw_label = read_h5(path)
        image = raw_image.astype(np.float32)
        label = self._label(raw_label, path)
        check_case(image, label, self.num_classes, path)
        meta = CaseMeta(
            case_id=ref.case_id,
            patient_id=ref.patient_id,
            source=path,
            spacing=None,
            axes="zyx",
            extra={"spacing_note": self.SPACING_NOTE},
        )
        return Case(image=image, label=label, meta=meta)


def read_h5(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """SSL4MIS h5 -> ``(image, label)`` as stored, each lifted to ``(Z, H, W)`` (2D slices get Z=1)."""
    p = require_file(path)
    try:
        with h5py.File(p, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            arrays = None if missing else (f["image"][()], f["label"][()])
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        # h5py raises OSError for truncated/corrupt files and for unreadable chunks.
        raise DataError(
            p, f"cannot read HDF5 (truncated or corrupt?): {' '.join(str(err).split())}"
        ) from None
    if arrays is None:
        raise DataError(p, f"HDF5 file has no dataset {missing[0]!r}")
    out = []
    for key, arr in zip(("image", "label"), arrays, strict=True):
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.ndim != 3:
            raise DataError(p, f"{key} has {arr.ndim} dimensions {arr.shape}; expected (H, W) or (Z, H, W)")
        out.append(arr)
    return out[0], out[1]


class AcdcNiftiReader(_AcdcBase):
    """Raw ACDC NIfTI frames (see module docstring)."""

    name = "acdc-nifti"
    _lists = {"train": "train.list", "val": "val.list", "test": "test.list"}

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any(_FRAME_FILE_RE.match(p.name) for p in root.glob("patient*/patient*_frame*"))

    def available_splits(self) -> list[str]:
        found = super().available_splits()
        if "train" not in found and (self.root / "train_slices.list").is_file():
            found.insert(0, "train")
        return found

    def cases(self, split: str | None = None) -> list[CaseRef]:
        if split is None:
            names = sorted(
                m.group(1)
                for p in self.root.glob("patient*/patient*_frame*")
                if (m := _FRAME_FILE_RE.match(p.name)) and p.parent.name == p.name[:10]
            )
            entries = [(n, n[:10]) for n in names]
        elif (
            split == "train" and not (self.root / "train.list").is_file() and split in self.available_splits()
        ):
            # Only the slice list exists: its volumes, in order of first appearance.
            slices = read_list(self.root / "train_slices.list")
            entries = list(dict.fromkeys((n.split("_slice_")[0], pid) for n, pid in slices))
        else:
            entries = self._split_list(split)
            bad = [n for n, _ in entries if "_slice_" in n]
            if bad:
                raise DataError(
                    self.root / self._lists[split], f"{bad[0]!r} is a slice; acdc-nifti lists volumes"
                )
        return [
            CaseRef(case_id=n, patient_id=pid, split=split, paths=self._paths(n, pid), loader=self._load)
            for n, pid in entries
        ]

    def _paths(self, name: str, pid: str) -> tuple[str, str]:
        folder = self.root / pid
        ext = ".nii" if (folder / f"{name}.nii").is_file() else ".nii.gz"
        return str(folder / f"{name}{ext}"), str(folder / f"{name}_gt{ext}")

    def _load(self, ref: CaseRef) -> Case:
        return load_nifti_case(ref, self.num_classes, self.label_map)
