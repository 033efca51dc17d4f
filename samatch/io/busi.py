"""BUSI breast ultrasound reader (``busi``): ``ROOT/<category>/<name> (N).png`` with masks beside them.

Layout (Dataset_BUSI_with_GT): categories ``benign``, ``malignant``, ``normal``; image
``benign (N).png``, mask ``benign (N)_mask.png`` and, for a few images with several lesions, extra
masks ``benign (N)_mask_1.png``, ``_mask_2.png``... that are OR-merged into one lesion mask.
Normal images have empty masks. Classes: 0 background, 1 lesion (any mask value > 0).

Images are stored as RGB although they are grayscale scans (a few carry coloured annotation
marks); they are converted to one channel with ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B``,
computed in float32 and kept in the stored 0..255 range (no normalisation here).

BUSI has no patient ids: each image is treated as its own patient (``patient_id == case_id``),
so a split cannot guarantee that two images of one woman end up on the same side. There are no
dataset splits and PNG carries no physical pixel spacing (``meta.spacing`` is None). Case ids are
``<category>_<NNN>``, e.g. ``benign_004``; ``meta.extra["category"]`` and ``CaseRef.category``
hold the category, so splits can be stratified by it without reading pixels.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from samatch.io.base import Case, CaseMeta, CaseRef, DataError, Reader, check_case, require_file
from samatch.io.labelmap import LabelMap, parse_label_map

CATEGORIES = ("benign", "malignant", "normal")
BUSI_CLASSES = ("background", "lesion")
LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_FILE_RE = re.compile(r"^(?P<name>.+) \((?P<n>\d+)\)(?P<mask>_mask(?:_(?P<k>\d+))?)?\.png$")


def read_gray(path: str | Path) -> np.ndarray:
    """PNG -> float32 (H, W): single-channel modes as stored, colour modes by BT.601 luma (alpha dropped)."""
    p = require_file(path)
    try:
        with Image.open(p) as im:
            im.load()  # decode now: a truncated file fails here, not later
            if im.mode in ("RGB", "RGBA", "LA", "1", "L", "I", "I;16", "F"):
                arr = np.asarray(im)
            else:  # palette and other modes: let Pillow expand to RGB first
                arr = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(p, f"cannot read PNG (truncated or corrupt?): {' '.join(str(err).split())}") from None
    arr = arr.astype(np.float32)
    if arr.ndim == 3:
        # LA -> L; RGB(A) -> luma of the colour channels.
        arr = arr[..., 0] if arr.shape[-1] == 2 else arr[..., :3] @ LUMA_601
    return np.ascontiguousarray(arr, dtype=np.float32)


class BusiReader(Reader):
    """BUSI folder (see module docstring)."""

    name = "busi"

    def __init__(self, root: str | Path, label_map: str | LabelMap | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "folder not found")
        if not any((self.root / c).is_dir() for c in CATEGORIES):
            raise DataError(self.root, f"no category folder ({', '.join(CATEGORIES)})")
        self.label_map = parse_label_map(label_map)
        self.class_names = self.label_map.class_names if self.label_map is not None else BUSI_CLASSES
        self.num_classes = len(self.class_names)

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any((root / c).is_dir() and any((root / c).glob("*.png")) for c in CATEGORIES)

    def available_splits(self) -> list[str]:
        return []

    def cases(self, split: str | None = None) -> list[CaseRef]:
        if split is not None:
            raise DataError(self.root, f"split {split!r} not available: BUSI has no splits")
        refs = []
        for category in CATEGORIES:
            folder = self.root / category
            if folder.is_dir():
                refs.extend(self._category_cases(category, folder))
        return refs

    def _category_cases(self, category: str, folder: Path) -> list[CaseRef]:
        # (name, N) -> {"image": path, "mask": path, k: extra mask path}
        groups: dict[tuple[str, int], dict] = {}
        for p in folder.iterdir():
            m = _FILE_RE.match(p.name)
            if not m:
                continue
            slot = "image" if not m["mask"] else ("mask" if m["k"] is None else int(m["k"]))
            groups.setdefault((m["name"], int(m["n"])), {})[slot] = p
        refs = []
        for (name, n), files in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            # Absent files keep their expected names, so loading reports exactly what is missing.
            image = files.get("image", folder / f"{name} ({n}).png")
            mask = files.get("mask", folder / f"{name} ({n})_mask.png")
            extras = [files[k] for k in sorted(k for k in files if isinstance(k, int))]
            case_id = f"{name.replace(' ', '_')}_{n:03d}"
            refs.append(
                CaseRef(
                    case_id=case_id,
                    patient_id=case_id,
                    split=None,
                    paths=(str(image), str(mask), *map(str, extras)),
                    loader=self._load,
                    category=category,
                    num_slices=1,
                )
            )
        return refs

    def _load(self, ref: CaseRef) -> Case:
        image_path, mask_path, *extra_paths = ref.paths
        require_file(image_path)
        if not Path(mask_path).is_file():
            raise DataError(image_path, f"image has no mask (expected {Path(mask_path).name!r})")
        image = read_gray(image_path)
        mask = np.zeros(image.shape, dtype=bool)
        for path in (mask_path, *extra_paths):
            part = read_gray(path)
            if part.shape != image.shape:
                raise DataError(path, f"mask shape {part.shape} differs from image shape {image.shape}")
            mask |= part > 0
        label = mask.astype(np.uint8)
        if self.label_map is not None:
            label = self.label_map.apply(label)
        check_case(image[None], label[None], self.num_classes, image_path, mask_path)
        meta = CaseMeta(
            case_id=ref.case_id,
            patient_id=ref.patient_id,
            source=image_path,
            spacing=None,
            axes="zyx",
            extra={
                "category": ref.category,
                "mask_files": [mask_path, *extra_paths],
                "spacing_note": "PNG carries no physical pixel spacing",
            },
        )
        return Case(image=image[None], label=label[None], meta=meta)
