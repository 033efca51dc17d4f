"""Study: how many labelling iterations the largest-component filter needs on real masks.

On a GPU :func:`samatch.prompts.largest_component` runs a fixed number of iterations (a convergence
test would make the host wait), about ten small kernels each; SAM-Match's pseudo-label prompts use
``max_iters=24``. This measures, on the training-split label masks of ACDC (RV, myocardium filled
with the LV as SAM prompts it, LV), BUSI (lesions) and CHAOS (liver), the iterations that change a
mask's labels before its fixed point, at the network size. ``--noise p`` flips each pixel within
2 pixels of a mask's border with probability p first: ragged edges, holes and islands, like the
confident masks of a U-Net early in training. Each row also gives the share of slices in which the
class is present (``present``).

    python benchmarks/lc_iterations.py [--data ../shared/data] [--size 256] [--noise 0.3]
        [--out runs/lc_iterations.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.record import provenance, write_json  # noqa: E402
from samatch.config import DataConfig  # noqa: E402
from samatch.data import build_splits, load_slices, open_reader  # noqa: E402
from samatch.methods.sam_guided import filled_masks  # noqa: E402
from samatch.prompts import component_labels  # noqa: E402

DATASETS = {  # name: (folder, format, label map, nested classes as SAM prompts them)
    "ACDC": ("ACDC", "acdc-h5", "", {2: (3,)}),
    "BUSI": ("BUSI", "busi", "", {}),
    "CHAOS liver": ("CHAOS_MR_T2", "nifti", "chaos-liver", {}),
}


def fixed_point_iterations(masks: torch.Tensor, limit: int = 512, chunk: int = 256) -> np.ndarray:
    """(N, H, W) bool masks (non-empty) -> (N,) the first iteration whose labels equal the previous
    ones, minus one: the iterations that changed something (limit + 1 where none was found)."""
    out = []
    for part in masks.split(chunk):
        its = component_labels(part[:, None])
        previous = next(its)
        done = torch.full((part.shape[0],), limit + 1)
        for i in range(1, limit + 1):
            labels = next(its)
            same = (labels == previous).flatten(1).all(1)
            done = torch.where(same & (done > limit), torch.tensor(i - 1), done)
            if (done <= limit).all():
                break
            previous = labels
        out.append(done.numpy())
    return np.concatenate(out)


def ragged(masks: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """(N, H, W) bool -> the same with each pixel within 2 px of the border flipped with probability p."""
    x = masks[:, None].float()
    grown = F.max_pool2d(x, 5, 1, 2) > 0
    shrunk = -F.max_pool2d(-x, 5, 1, 2) > 0
    band = (grown & ~shrunk)[:, 0]
    flip = band & (torch.rand(masks.shape, generator=generator) < p)
    return masks ^ flip


def study(root: Path, size: int, noise: float = 0.0) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, (folder, fmt, label_map, enclosed) in DATASETS.items():
        cfg = DataConfig(root=str(root / folder), format=fmt, label_map=label_map, labeled=1, size=size)
        reader = open_reader(cfg)
        splits = build_splits(reader, cfg)  # training split only: validation and test stay unread
        refs = {r.case_id: r for r in reader.cases(None)}
        slices = load_slices([refs[i] for i in splits.labeled + splits.unlabeled], size, True, name)
        classes = torch.arange(1, reader.num_classes).view(1, -1, 1, 1)
        masks = filled_masks(slices.labels[:, None].long() == classes, enclosed)  # (N, C-1, S, S)
        for c in range(masks.shape[1]):
            m = masks[:, c][masks[:, c].flatten(1).any(1)]
            if noise:
                m = ragged(m, noise, generator)
            its = fixed_point_iterations(m)
            rows.append(
                {
                    "dataset": name,
                    "class": reader.class_names[c + 1],
                    "masks": int(m.shape[0]),
                    # slices where the class is present: its share of SAM's ground-truth prompts
                    # that exist (an absent class's prompt is invalid and skipped on the CPU)
                    "present": int(m.shape[0]) / int(masks.shape[0]),
                    "median": float(np.median(its)),
                    "p99": float(np.percentile(its, 99)),
                    "max": int(its.max()),
                    "over_16": int((its > 16).sum()),
                    "over_32": int((its > 32).sum()),
                    "over_64": int((its > 64).sum()),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--noise", type=float, default=0.0, help="border pixels flipped with this probability"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/lc_iterations.json"))
    args = parser.parse_args(argv)
    rows = study(args.data, args.size, args.noise)
    write_json(
        args.out,
        provenance("lc_iterations", __file__, args, argv)
        | {"size": args.size, "noise": args.noise, "rows": rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
