"""`samatch data pack ROOT --out FILE.npz`: a compact preprocessed copy of a training setup.

Holds the labeled slices of the budget, up to --max-unlabeled unlabeled slices (network size) and
the validation volumes (native size); train on it with `--data FILE.npz` (format `packed`).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="dataset folder")
    p.add_argument("--format", help="acdc-h5 | acdc-nifti | busi | nifti (default: detect)")
    p.add_argument("--label-map")
    p.add_argument("--labeled", type=int, required=True, help="labeled budget in the format's unit")
    p.add_argument("--size", type=int, default=256)
    p.add_argument(
        "--max-unlabeled",
        type=int,
        default=10**9,
        help="at most this many unlabeled cases (slices for ACDC h5; whole volumes for NIfTI)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)


def run(args) -> int:
    from pathlib import Path

    from samatch.config import DataConfig
    from samatch.data import build_splits, open_reader
    from samatch.io.packed import pack_dataset

    data_cfg = DataConfig(
        root=args.root,
        format=args.format or "",
        label_map=args.label_map or "",
        labeled=args.labeled,
        size=args.size,
        seed=args.seed,
    )
    reader = open_reader(data_cfg)
    splits = build_splits(reader, data_cfg)
    out = pack_dataset(reader, splits, args.size, args.max_unlabeled, args.out)
    print(
        f"packed {len(splits.labeled)} labeled case(s), up to {args.max_unlabeled} unlabeled, "
        f"{len(splits.val)} val volume(s) -> {out} ({Path(out).stat().st_size / 2**20:.1f} MiB)"
    )
    return 0
