"""A compact, preprocessed copy of a training setup in one ``.npz`` file (format ``packed``).

``samatch data pack`` writes it from any readable dataset: the labeled slices and up to N unlabeled
slices at network size, and the validation volumes at native size, every slice min-max normalised
and stored as uint8 (the network sees [0, 1] anyway; 8 bits lose < 0.2% of the range). It exists
so that a run can be moved to a machine without the dataset (a lent GPU box) in a few tens of MB.

The packed file fulfils the reader contract: split ``train`` = 2D slices in labeled-first order
(so ``make_splits`` with the same patient budget picks the same labeled patients; the unlabeled
slices have no label), split ``val`` = volumes with their spacing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from samatch.io.base import Case, CaseMeta, CaseRef, DataError, Reader

MAGIC = "fedsamatch-packed-v1"


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def pack_dataset(reader, splits, size: int, max_unlabeled: int, out: str | Path) -> Path:
    """Write labeled + first ``max_unlabeled`` unlabeled slices (size x size) and val volumes."""
    from samatch.preprocess import minmax_normalize, resize_image, resize_label

    refs = {r.case_id: r for r in reader.cases(None)}
    train_img, train_lab, train_ids, train_pids, labeled = [], [], [], [], []
    for ids, has_label in ((splits.labeled, True), (splits.unlabeled[:max_unlabeled], False)):
        for cid in ids:
            case = refs[cid].load()
            img = resize_image(minmax_normalize(case.image), size)
            lab = resize_label(case.label, size) if has_label else np.zeros_like(img, dtype=np.uint8)
            for z in range(img.shape[0]):
                train_img.append(_to_u8(img[z]))
                train_lab.append(lab[z])
                suffix = f"_z{z}" if img.shape[0] > 1 else ""
                train_ids.append(cid + suffix)
                train_pids.append(case.meta.patient_id)
                labeled.append(has_label)
    vols = [refs[cid].load() for cid in splits.val]
    meta = {
        "magic": MAGIC,
        "source": str(reader.root),
        "format": reader.name,
        "size": size,
        "class_names": list(reader.class_names),
        "budget": splits.budget,
        "unit": splits.unit,
        "train_ids": train_ids,
        "train_patients": train_pids,
        "labeled": labeled,
        "val_ids": [v.meta.case_id for v in vols],
        "val_patients": [v.meta.patient_id for v in vols],
        "val_spacing": [v.meta.spacing for v in vols],
        "val_shapes": [list(v.image.shape) for v in vols],
    }
    val_img = np.concatenate([_to_u8(minmax_normalize(v.image)).reshape(-1) for v in vols])
    val_lab = np.concatenate([v.label.reshape(-1) for v in vols])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        train_images=np.stack(train_img),
        train_labels=np.stack(train_lab),
        val_images=val_img,
        val_labels=val_lab,
    )
    return out


class PackedReader(Reader):
    """Reads a file written by :func:`pack_dataset` (root = the .npz path)."""

    name = "packed"

    def __init__(self, root: str | Path, label_map=None):
        self.root = Path(root)
        if not self.root.is_file():
            raise DataError(self.root, "packed file not found")
        try:
            z = np.load(self.root)
            self.meta = json.loads(bytes(z["meta"]).decode())
            self._arrays = {k: z[k] for k in ("train_images", "train_labels", "val_images", "val_labels")}
        except (OSError, ValueError, KeyError) as err:
            raise DataError(self.root, f"not a readable packed file: {err}") from None
        if self.meta.get("magic") != MAGIC:
            raise DataError(self.root, "not a fedsamatch packed file (bad magic)")
        self.class_names = tuple(self.meta["class_names"])
        self.num_classes = len(self.class_names)
        offsets = np.cumsum([0] + [int(np.prod(s)) for s in self.meta["val_shapes"]])
        self._val_slices = [(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    @classmethod
    def detect(cls, root) -> bool:
        return str(root).endswith(".npz")

    def available_splits(self) -> list[str]:
        return ["train", "val"]

    def _load(self, ref: CaseRef) -> Case:
        split, i = ref.paths[0], int(ref.paths[1])
        a = self._arrays
        if split == "train":
            img = a["train_images"][i : i + 1].astype(np.float32) / 255
            lab = a["train_labels"][i : i + 1].copy() if self.meta["labeled"][i] else None
            return Case(img, lab, CaseMeta(ref.case_id, ref.patient_id, str(self.root)))
        lo, hi = self._val_slices[i]
        shape = self.meta["val_shapes"][i]
        img = a["val_images"][lo:hi].reshape(shape).astype(np.float32) / 255
        lab = a["val_labels"][lo:hi].reshape(shape).copy()
        sp = self.meta["val_spacing"][i]
        return Case(
            img, lab, CaseMeta(ref.case_id, ref.patient_id, str(self.root), tuple(sp) if sp else None)
        )

    def cases(self, split: str | None = None) -> list[CaseRef]:
        m = self.meta
        refs = []
        if split in (None, "train"):
            refs += [
                CaseRef(cid, pid, "train", ("train", str(i)), self._load, num_slices=1)
                for i, (cid, pid) in enumerate(zip(m["train_ids"], m["train_patients"], strict=True))
            ]
        if split in (None, "val"):
            refs += [
                CaseRef(cid, pid, "val", ("val", str(i)), self._load, num_slices=m["val_shapes"][i][0])
                for i, (cid, pid) in enumerate(zip(m["val_ids"], m["val_patients"], strict=True))
            ]
        return refs
