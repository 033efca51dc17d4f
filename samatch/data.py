"""Cases -> labeled / unlabeled slice sets at network size, and validation volumes at native size.

Training slices are normalised (per-slice min-max) and resized once, then held as one tensor, so a
batch is a single index-gather: the step never waits for file I/O. Validation volumes stay at their
native resolution; :mod:`samatch.evaluate` resizes predictions back to it.

With ``data.cache_dir`` the prepared slice sets and the validation volumes are also kept in that
(site-local) folder, one file per set, and a process that opens the same cases again maps that file
instead of reading (and resizing) every case: a deployed site starts a new process for every message
(:func:`load_slices_cached`, :func:`load_volumes_cached`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from samatch.filecache import set_or_prepare
from samatch.io.base import Case, CaseMeta, CaseRef
from samatch.preprocess import minmax_normalize, resize_image, resize_label
from samatch.transfer import to_device

if TYPE_CHECKING:  # samatch.splits imports this module
    from samatch.splits import Splits


@dataclass
class SliceSet:
    """``images`` (N, 1, S, S) float32 in [0, 1]; ``labels`` (N, S, S) uint8 or None (unlabeled)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    patient_ids: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def sample(self, batch: int, generator: torch.Generator, device):
        """A random batch drawn with replacement (one gather, then to ``device``).

        Returns images (B,1,S,S), labels (B,S,S) long or None, and the indices (B,) into this set
        (methods that cache per-slice data, like SAM embeddings, look them up by index).
        """
        idx = torch.randint(0, len(self), (batch,), generator=generator)
        img = to_device(self.images[idx], device)
        lab = None if self.labels is None else to_device(self.labels[idx], device).long()
        return img, lab, idx


def load_slices(refs: Sequence[CaseRef], size: int, with_labels: bool, desc: str = "loading") -> SliceSet:
    """Load cases (2D or volumes), split into slices, normalise and resize each to ``size``."""
    images, labels, pids = [], [], []
    for ref in tqdm(refs, desc=desc, leave=False, disable=len(refs) < 50 or None):  # None: off when not a TTY
        case = ref.load()
        images.append(resize_image(minmax_normalize(case.image), size))
        if with_labels:
            if case.label is None:
                raise ValueError(f"{case.meta.source}: labeled case has no label")
            labels.append(resize_label(case.label, size))
        pids.extend([case.meta.patient_id] * case.num_slices)
    if not images:
        raise ValueError(f"no cases to load for {desc}")
    img = torch.from_numpy(np.concatenate(images))[:, None]
    lab = torch.from_numpy(np.concatenate(labels)) if with_labels else None
    return SliceSet(img, lab, pids)


# Raise when the slices prepared from the same files change (load_slices, a reader's loading).
SLICE_CACHE_VERSION = 1


def slices_key(refs: Sequence[CaseRef], size: int, with_labels: bool, reading: str = "") -> str | None:
    """What a prepared slice set depends on -> its cache file's stem: the preparation (version, size,
    labels, ``reading``: how the reader was set up, e.g. its format and label map), and each case's
    id, patient and files: path, size, modification and status-change times and inode, so a file
    rewritten in place, even with its size and modification time kept (``cp -p``, ``rsync -a``),
    gives another key and stale slices are never read. None when a path is not a file (phantoms, a
    packed file's cases, a file gone: the reader reports that)."""
    h = hashlib.sha256(f"fedsamatch-slices-v{SLICE_CACHE_VERSION} {size} {with_labels} {reading}".encode())
    for ref in refs:
        files = []
        for path in ref.paths:
            try:
                st = os.stat(path)
            except OSError:
                return None
            if not stat.S_ISREG(st.st_mode):
                return None
            files.append([os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
        h.update(json.dumps([ref.case_id, ref.patient_id, files]).encode())
    return h.hexdigest()[:32]


def load_slices_cached(
    refs: Sequence[CaseRef],
    size: int,
    with_labels: bool,
    desc: str,
    cache_dir: str | os.PathLike,
    reading: str = "",
) -> SliceSet:
    """:func:`load_slices`, kept in ``cache_dir/sets/<slices_key>.pt``: read from there when that file is
    readable (its tensors mapped, not copied), else prepared and saved (an unreadable file is replaced).
    Cases that are not files (:func:`slices_key` None) are not cached. Each new key adds a file, and
    the folder keeps the most recently used (:func:`samatch.filecache.keep_set`)."""
    key = slices_key(refs, size, with_labels, reading) if refs else None
    if key is None:
        return load_slices(refs, size, with_labels, desc)

    def decode(kept) -> SliceSet | None:
        if isinstance(kept, dict) and set(kept) == {"images", "labels", "patient_ids"}:
            return SliceSet(kept["images"], kept["labels"], list(kept["patient_ids"]))
        return None

    return set_or_prepare(
        Path(cache_dir) / "sets" / f"{key}.pt",
        decode,
        lambda: load_slices(refs, size, with_labels, desc),
        lambda s: {"images": s.images, "labels": s.labels, "patient_ids": s.patient_ids},
    )


def load_volumes(refs: Sequence[CaseRef], desc: str = "validation") -> list[Case]:
    """Validation / test cases at native resolution (labels required)."""
    cases = [r.load() for r in tqdm(refs, desc=desc, leave=False, disable=len(refs) < 10 or None)]
    for c in cases:
        if c.label is None:
            raise ValueError(f"{c.meta.source}: evaluation case has no label")
    return cases


def _case_record(case: Case) -> dict:
    """A case as tensors and plain values (what ``torch.load(weights_only=True)`` reads back)."""
    m = case.meta
    meta = {
        "case_id": m.case_id,
        "patient_id": m.patient_id,
        "source": str(m.source),
        "spacing": None if m.spacing is None else [float(v) for v in m.spacing],
        "affine": None if m.affine is None else torch.from_numpy(np.asarray(m.affine)),
        "axes": m.axes,
        "extra": m.extra,
    }
    return {"image": torch.from_numpy(case.image), "label": torch.from_numpy(case.label), "meta": meta}


def _case_from_record(rec: dict) -> Case:
    meta = dict(rec["meta"])
    meta["spacing"] = None if meta["spacing"] is None else tuple(meta["spacing"])
    meta["affine"] = None if meta["affine"] is None else meta["affine"].numpy()
    return Case(rec["image"].numpy(), rec["label"].numpy(), CaseMeta(**meta))


def load_volumes_cached(
    refs: Sequence[CaseRef], cache_dir: str | os.PathLike, reading: str = "", desc: str = "validation"
) -> list[Case]:
    """:func:`load_volumes`, kept like a slice set (``cache_dir/sets/<key>.pt``, mapped when read):
    an evaluating message of a deployed site reads one file instead of every validation case."""
    key = slices_key(refs, 0, True, f"volumes {reading}") if refs else None
    if key is None:
        return load_volumes(refs, desc)

    def decode(kept) -> list[Case] | None:
        if isinstance(kept, dict) and isinstance(kept.get("cases"), list) and len(kept["cases"]) == len(refs):
            try:
                return [_case_from_record(rec) for rec in kept["cases"]]
            except (KeyError, TypeError, AttributeError):
                pass  # another layout: prepared again
        return None

    return set_or_prepare(
        Path(cache_dir) / "sets" / f"{key}.pt",
        decode,
        lambda: load_volumes(refs, desc),
        lambda cases: {"cases": [_case_record(c) for c in cases]},
    )


class LazyVolumes(Sequence[Case]):
    """Validation volumes read on first use, by ``load`` (:func:`load_volumes` or
    :func:`load_volumes_cached` of the refs). ``len`` and truth read nothing, so a deployed site's
    train message without an evaluation (each message is a new process) never reads them."""

    def __init__(self, refs: Sequence[CaseRef], load: Callable[[], list[Case]] | None = None):
        self.refs = list(refs)
        self._load = load or (lambda: load_volumes(self.refs))
        self._cases: list[Case] | None = None

    def cases(self) -> list[Case]:
        if self._cases is None:
            self._cases = self._load()
        return self._cases

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i):
        return self.cases()[i]

    @property
    def loaded(self) -> bool:
        return self._cases is not None


@dataclass
class TrainData:
    labeled: SliceSet
    unlabeled: SliceSet | None
    val: Sequence[Case]  # a list, or LazyVolumes
    num_classes: int
    class_names: tuple[str, ...]
    splits: Splits | None = None  # the splits the sets were taken from (build_train_data)


# Budget units of each format: what "--labeled N" counts.
BUDGET_UNITS = {
    "acdc-h5": "patients",
    "acdc-nifti": "patients",
    "busi": "images",
    "nifti": "cases",
    "packed": "patients",
    "phantom-cardiac": "patients",
    "phantom-lesion": "patients",
}


def open_reader(data_cfg):
    """The reader for ``cfg.data``: a dataset folder, or a built-in phantom site."""
    fmt = data_cfg.format
    if fmt.startswith("phantom-"):
        from samatch.phantoms import PhantomReader

        # For phantoms, data.root names the site(s): "0", or "0,1,2" for a pooled view.
        try:
            sites = tuple(int(s) for s in (data_cfg.root or "0").split(","))
        except ValueError:
            raise ValueError(
                f"phantom data.root must be site indices like '0,1,2', got {data_cfg.root!r}"
            ) from None
        return PhantomReader(fmt.split("-", 1)[1], site=sites, seed=data_cfg.seed, size=data_cfg.size)
    from samatch.io import open_dataset

    return open_dataset(data_cfg.root, fmt or None, data_cfg.label_map or None)


def build_splits(reader, data_cfg):
    """Make (or reuse ``data.splits_file``) the by-patient splits. Saving them beside the run is the
    caller's job (``TrainData.splits``)."""
    from samatch.splits import load_splits, make_splits

    if data_cfg.splits_file:
        splits = load_splits(data_cfg.splits_file, reader)
    else:
        splits = make_splits(reader, data_cfg.labeled, BUDGET_UNITS.get(reader.name, "cases"), data_cfg.seed)
    return splits


def run_splits(run_dir: str | Path, reader, data_cfg):
    """The splits a run folder's model is evaluated on: its ``splits.json``, else (a federated run
    whose sites made their own splits: the server never sees them) the splits its ``config.json``
    makes, which are those sites' when they made theirs from the same data settings and seed. A
    federation over ``simulations.partition``'s sites has a ``splits.json``: the server writes the
    union of the sites' (``federation.config.manifest_splits``)."""
    path = Path(run_dir) / "splits.json"
    if path.is_file():
        from samatch.splits import load_splits

        return load_splits(path, reader)
    print(
        f"note: {path} not found: using the splits its config.json makes"
        f" ({reader.name} at {reader.root}, data.seed {data_cfg.seed})",
        file=sys.stderr,
    )
    return build_splits(reader, data_cfg)


def build_train_data(cfg, lazy_val: bool = False) -> TrainData:
    """cfg.data -> reader -> splits -> labeled / unlabeled slice sets + validation volumes.

    ``lazy_val``: the validation volumes are read on first use (:class:`LazyVolumes`), not here; a
    missing label is then reported by the first evaluation instead of at the start.
    """
    reader = open_reader(cfg.data)
    splits = build_splits(reader, cfg.data)
    refs = {r.case_id: r for r in reader.cases(None)}
    unlabeled_ids = splits.unlabeled
    if cfg.data.max_unlabeled:
        unlabeled_ids = unlabeled_ids[: cfg.data.max_unlabeled]
    val_refs = [refs[i] for i in splits.val[: cfg.data.max_val_cases or None]]

    # Phantoms are made in memory and a packed file is read whole: nothing to keep.
    cached = bool(cfg.data.cache_dir) and reader.name != "packed" and not reader.name.startswith("phantom")
    label_map = getattr(reader, "label_map", None)  # what the files' values become
    reading = json.dumps([reader.name, cfg.data.label_map, label_map.spec() if label_map else ""])

    def slices(ids: Sequence[str], with_labels: bool, desc: str) -> SliceSet:
        cases = [refs[i] for i in ids]
        if cached:
            return load_slices_cached(cases, cfg.data.size, with_labels, desc, cfg.data.cache_dir, reading)
        return load_slices(cases, cfg.data.size, with_labels, desc)

    def volumes() -> list[Case]:
        if cached:
            return load_volumes_cached(val_refs, cfg.data.cache_dir, reading)
        return load_volumes(val_refs)

    labeled = slices(splits.labeled, True, "labeled")
    unlabeled = slices(unlabeled_ids, False, "unlabeled") if unlabeled_ids else None
    val = LazyVolumes(val_refs, volumes) if lazy_val else volumes()
    if cfg.model.num_classes == 0:  # 0 = take it from the dataset
        cfg.model.num_classes = reader.num_classes
    if reader.num_classes != cfg.model.num_classes:
        raise ValueError(
            f"{cfg.data.root or reader.name}: dataset has {reader.num_classes} classes but "
            f"model.num_classes is {cfg.model.num_classes}"
        )
    return TrainData(labeled, unlabeled, val, reader.num_classes, tuple(reader.class_names), splits)
