"""Split one dataset's patients into N virtual hospitals, written as a JSON manifest plus one samatch
splits JSON per site (the ClientApp reads them through run config ``partition-manifest``).

Partitioners (registered by name), all by patient and seeded:

* ``iid``: shuffled patients dealt round-robin;
* ``size``: non-IID quantity skew, site shares drawn from Dirichlet(``alpha``);
* ``labeled``: the dataset's labeled budget spread one labeled patient per site (in the dataset's own
  order, e.g. ACDC's literature list), the unlabeled pool dealt round-robin;
* ``shift``: acquisition shift proxy, patients sorted by the mean intensity of their first case and
  cut into N contiguous groups (dark scanners in one site, bright in another).

Every site gets ``labeled_per_site`` labeled patients (its first ones), the rest of its patients
unlabeled, and a round-robin share of the dataset's validation patients.

    python -m simulations.partition /work/shared/data/ACDC --format acdc-h5 --sites 3 \
        --partitioner labeled --out simulations/acdc3x1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from samatch.config import DataConfig
from samatch.data import BUDGET_UNITS, open_reader
from samatch.splits import Splits, make_splits, save_splits

Partitioner = Callable[[list[str], int, np.random.Generator, dict], list[list[str]]]
PARTITIONERS: dict[str, Partitioner] = {}


def register(name: str) -> Callable[[Partitioner], Partitioner]:
    def deco(fn: Partitioner) -> Partitioner:
        PARTITIONERS[name] = fn
        return fn

    return deco


def _deal(patients: list[str], n: int) -> list[list[str]]:
    return [patients[i::n] for i in range(n)]


@register("iid")
def iid(patients, n, rng, info):
    order = list(patients)
    rng.shuffle(order)
    return _deal(order, n)


@register("size")
def by_size(patients, n, rng, info):
    order = list(patients)
    rng.shuffle(order)
    minimum = info.get("min_per_site", 2)
    if len(order) < n * minimum:
        raise ValueError(f"{len(order)} patients cannot give {n} sites >= {minimum} each")
    shares = rng.dirichlet([info.get("alpha", 0.5)] * n)
    extra = np.floor(shares * (len(order) - n * minimum)).astype(int)
    extra[np.argmax(shares)] += len(order) - n * minimum - extra.sum()
    cuts = np.cumsum(minimum + extra)[:-1]
    return [list(part) for part in np.split(np.array(order, dtype=object), cuts)]


@register("labeled")
def by_labeled_budget(patients, n, rng, info):
    labeled = info["labeled_order"][:n]  # the dataset's own labeled order: one per site
    rest = [p for p in patients if p not in set(labeled)]
    rng.shuffle(rest)
    return [[lab, *part] for lab, part in zip(labeled, _deal(rest, n), strict=True)]


@register("shift")
def by_acquisition(patients, n, rng, info):
    brightness = info["brightness"]
    order = sorted(patients, key=lambda p: brightness[p])
    return [list(part) for part in np.array_split(np.array(order, dtype=object), n)]


def partition(
    data: DataConfig, sites: int, partitioner: str, out: str | Path, labeled_per_site: int = 1, seed: int = 0
) -> Path:
    """Write ``out/manifest.json`` and ``out/site<i>_splits.json``; returns the manifest path."""
    if partitioner not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {partitioner!r}; choose from {sorted(PARTITIONERS)}")
    reader = open_reader(data)
    unit = BUDGET_UNITS.get(reader.name, "cases")
    base = make_splits(reader, sites * labeled_per_site, "patients" if unit == "slices" else unit, seed)
    refs = {r.case_id: r for r in reader.cases(None)}
    train_cases = base.labeled + base.unlabeled
    by_patient: dict[str, list[str]] = {}
    for cid in train_cases:
        by_patient.setdefault(refs[cid].patient_id, []).append(cid)
    patients = list(by_patient)
    info: dict = {"labeled_order": [refs[c].patient_id for c in base.labeled]}
    info["labeled_order"] = list(dict.fromkeys(info["labeled_order"]))
    if partitioner == "shift":
        info["brightness"] = {p: float(refs[c[0]].load().image.mean()) for p, c in by_patient.items()}
    groups = PARTITIONERS[partitioner](patients, sites, np.random.default_rng(seed), info)
    if any(len(g) <= labeled_per_site for g in groups):
        raise ValueError(f"a site got <= {labeled_per_site} patients: {[len(g) for g in groups]}")
    val_patients = list(dict.fromkeys(refs[c].patient_id for c in base.val))
    val_groups = _deal(val_patients, sites)
    out = Path(out)
    entries = []
    for i, (group, vals) in enumerate(zip(groups, val_groups, strict=True)):
        lab, unl = group[:labeled_per_site], group[labeled_per_site:]
        splits = Splits(
            labeled=[c for p in lab for c in by_patient[p]],
            unlabeled=[c for p in unl for c in by_patient[p]],
            val=[c for c in base.val if refs[c].patient_id in set(vals)],
            test=[],
            format=reader.name,
            budget=labeled_per_site,
            unit="patients",
            seed=seed,
            patients={"labeled": sorted(lab), "unlabeled": sorted(unl), "val": sorted(vals), "test": []},
        )
        name = f"site{i}_splits.json"
        save_splits(splits, out / name)
        entries.append(
            {"name": f"hospital{i}", "splits_file": name, "patients": len(group), "val": len(vals)}
        )
    manifest = {
        "root": str(data.root),
        "format": data.format,
        "partitioner": partitioner,
        "seed": seed,
        "labeled_per_site": labeled_per_site,
        "sites": entries,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="dataset folder, or phantom site list like 0,1,2")
    p.add_argument("--format", default="", help="reader format (auto-detected when empty)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--partitioner", default="iid", choices=sorted(PARTITIONERS))
    p.add_argument("--labeled-per-site", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for manifest.json and the site splits")
    args = p.parse_args(argv)
    path = partition(
        DataConfig(root=args.root, format=args.format, seed=args.seed),
        args.sites,
        args.partitioner,
        args.out,
        args.labeled_per_site,
        args.seed,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
