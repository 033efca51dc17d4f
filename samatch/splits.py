"""Labeled / unlabeled / validation / test splits, made by patient and stored as JSON.

Rules (:func:`make_splits`):

* Splits are by patient, never by slice: a patient's cases all go to one split, and a patient
  found in two splits is a :class:`DataError`.
* Datasets with their own lists (ACDC h5: ``train_slices.list``, ``val.list``, ``test.list``) keep
  them: the labeled set is the first N *patients* in ``train`` list order, taking all their slices
  (the SSL4MIS / UniMatch budgets: 1 patient = 32 slices, 3 = 68 slices of patients 099, 038, 050,
  7 = 136), the rest of ``train`` is unlabeled, ``val``/``test`` are the listed ones (empty when the
  list is absent). The seed is recorded but the list order decides.
* Datasets without splits (BUSI, CHAOS / generic NIfTI): a seeded validation holdout of
  ``val_fraction`` of the patients (default 20%: 26 of 130 BUSI images, 16/8/2 per category;
  3 of 15 CHAOS cases), stratified by ``CaseRef.category`` where the reader sets one; then the
  labeled budget is drawn from the rest, seeded and stratified (each category contributes in
  proportion to its size), and everything else is unlabeled. ``test`` is empty: these folders hold
  no test data.

Budget units: ``patients``; ``cases`` (alias ``images``): number of cases; ``slices``: sum of
``CaseRef.num_slices``. A budget in cases or slices must fall on a patient boundary (68 ACDC slices
is 3 patients; 70 is refused).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from samatch.io.base import CaseRef, DataError, Reader, require_file

SPLIT_NAMES = ("labeled", "unlabeled", "val", "test")
UNITS = ("patients", "cases", "images", "slices")
FORMAT_VERSION = 1


@dataclass
class Splits:
    """Case ids per split plus how they were made. ``patients``: split name -> sorted patient ids."""

    labeled: list[str]
    unlabeled: list[str]
    val: list[str]
    test: list[str]
    format: str
    budget: int
    unit: str
    seed: int
    val_fraction: float | None = None  # None when the dataset's own validation list was used
    patients: dict[str, list[str]] = field(default_factory=dict)

    def check(self, where: str | Path) -> None:
        """DataError (naming ``where``) if a case or a patient is in two splits."""
        for i, a in enumerate(SPLIT_NAMES):
            for b in SPLIT_NAMES[i + 1 :]:
                for what, left, right in (
                    ("case", getattr(self, a), getattr(self, b)),
                    ("patient", self.patients.get(a, []), self.patients.get(b, [])),
                ):
                    both = sorted(set(left) & set(right))
                    if both:
                        raise DataError(
                            where, f"{what} {both[0]} is in both {a} and {b} ({len(both)} in all)"
                        )
        for name in SPLIT_NAMES:
            ids = getattr(self, name)
            if len(set(ids)) != len(ids):
                raise DataError(where, f"split {name} lists a case twice")


def union_splits(parts: list[Splits]) -> Splits:
    """The sites' splits pooled: every split the concatenation of theirs (a centralized view of a
    federation); the budget counts labeled patients. Not checked: callers check where they know the
    source (a site's case in two sites' splits is a partition error)."""
    first = parts[0]
    return Splits(
        **{name: [c for part in parts for c in getattr(part, name)] for name in SPLIT_NAMES},
        format=first.format,
        budget=sum(len(part.patients.get("labeled", [])) for part in parts),
        unit="patients",
        seed=first.seed,
        patients={
            name: sorted({p for part in parts for p in part.patients.get(name, [])}) for name in SPLIT_NAMES
        },
    )


def _count(refs: list[CaseRef], unit: str, where: Path) -> int:
    if unit == "patients":
        return 1
    if unit in ("cases", "images"):
        return len(refs)
    if any(r.num_slices is None for r in refs):
        raise DataError(where, "budget in slices needs 2D cases; use 'patients' or 'cases' for volumes")
    return sum(r.num_slices for r in refs)  # type: ignore[misc]


def _by_patient(refs: list[CaseRef]) -> dict[str, list[CaseRef]]:
    """Patient id -> its cases, patients in order of first appearance."""
    out: dict[str, list[CaseRef]] = {}
    for r in refs:
        out.setdefault(r.patient_id, []).append(r)
    return out


def _stratified_order(groups: dict[str, list[CaseRef]], rng: np.random.Generator) -> list[str]:
    """Seeded patient order whose every prefix holds each category in proportion to its size.

    Each category is shuffled, its i-th member of n gets the key (i + 0.5) / n, and all patients
    are sorted by key: a prefix of length k then takes about k * n_c / N from category c.
    """
    cats: dict[str, list[str]] = {}
    for pid, refs in groups.items():
        cats.setdefault(str(refs[0].category), []).append(pid)
    keyed = []
    for ci, cat in enumerate(sorted(cats)):
        members = [cats[cat][j] for j in rng.permutation(len(cats[cat]))]
        keyed += [((i + 0.5) / len(members), ci, pid) for i, pid in enumerate(members)]
    return [pid for _, _, pid in sorted(keyed)]


def _holdout(groups: dict[str, list[CaseRef]], fraction: float, rng: np.random.Generator) -> set[str]:
    """Seeded validation patients: round(fraction * n_c) from each category c (half rounds up)."""
    cats: dict[str, list[str]] = {}
    for pid, refs in groups.items():
        cats.setdefault(str(refs[0].category), []).append(pid)
    held: set[str] = set()
    for cat in sorted(cats):
        n_val = int(np.floor(fraction * len(cats[cat]) + 0.5))
        held.update(cats[cat][j] for j in rng.permutation(len(cats[cat]))[:n_val])
    return held


def _take_budget(
    order: list[str], groups: dict[str, list[CaseRef]], budget: int, unit: str, where: Path
) -> set[str]:
    """First patients of ``order`` whose units add up to exactly ``budget``."""
    taken: set[str] = set()
    total = 0
    for pid in order:
        if total >= budget:
            break
        n = _count(groups[pid], unit, where)
        if total + n > budget:
            raise DataError(
                where,
                f"a budget of {budget} {unit} would split patient {pid}; nearest: {total} or {total + n}",
            )
        taken.add(pid)
        total += n
    if total < budget:
        raise DataError(where, f"budget of {budget} {unit} exceeds the {total} available for labeling")
    return taken


def make_splits(reader: Reader, labeled: int, unit: str, seed: int = 0, val_fraction: float = 0.2) -> Splits:
    """Labeled budget ``labeled`` in ``unit`` (see module docstring); deterministic given ``seed``."""
    if unit not in UNITS:
        raise ValueError(f"unknown budget unit {unit!r}; use one of {UNITS}")
    if labeled < 0 or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"need labeled >= 0 and 0 <= val_fraction < 1, got {labeled}, {val_fraction}")
    where = Path(reader.root)
    rng = np.random.default_rng(seed)
    own = reader.available_splits()
    val = reader.cases("val") if "val" in own else []
    test = reader.cases("test") if "test" in own else []
    if "train" in own:
        pool = reader.cases("train")
    else:
        not_pool = {r.case_id for r in val + test}
        pool = [r for r in reader.cases(None) if r.case_id not in not_pool]
    groups = _by_patient(pool)
    frac_used: float | None = None
    if "val" not in own:
        frac_used = val_fraction
        held = _holdout(groups, val_fraction, rng)
        val = [r for r in pool if r.patient_id in held]
        pool = [r for r in pool if r.patient_id not in held]
        groups = {p: g for p, g in groups.items() if p not in held}
    # A dataset's own train list carries the literature's order; otherwise draw a seeded order.
    order = list(groups) if "train" in own else _stratified_order(groups, rng)
    chosen = _take_budget(order, groups, labeled, unit, where)
    parts = {
        "labeled": [r for r in pool if r.patient_id in chosen],
        "unlabeled": [r for r in pool if r.patient_id not in chosen],
        "val": val,
        "test": test,
    }
    splits = Splits(
        **{k: [r.case_id for r in v] for k, v in parts.items()},
        format=reader.name,
        budget=labeled,
        unit=unit,
        seed=seed,
        val_fraction=frac_used,
        patients={k: sorted({r.patient_id for r in v}) for k, v in parts.items()},
    )
    splits.check(where)
    return splits


def save_splits(splits: Splits, path: str | Path) -> Path:
    """Write ``splits`` as JSON (parents created). Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"version": FORMAT_VERSION, **asdict(splits)}, indent=1) + "\n")
    return p


def load_splits(path: str | Path, reader: Reader | None = None) -> Splits:
    """Read a splits JSON; DataError for a missing/malformed file or a patient in two splits.

    With ``reader``, also checks every case id exists there and recomputes the patients from it.
    """
    p = require_file(path)
    try:
        data = json.loads(p.read_text())
        if data.pop("version", None) != FORMAT_VERSION:
            raise DataError(p, f"unsupported splits file version (expected {FORMAT_VERSION})")
        splits = Splits(**data)
        for name in SPLIT_NAMES:
            ids = getattr(splits, name)
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise DataError(p, f"split {name} must be a list of case ids")
    except (ValueError, TypeError, AttributeError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(p, f"not a splits file: {' '.join(str(err).split())}") from None
    if reader is not None:
        patient_of = {r.case_id: r.patient_id for r in reader.cases(None)}
        for name in SPLIT_NAMES:
            unknown = [c for c in getattr(splits, name) if c not in patient_of]
            if unknown:
                raise DataError(p, f"split {name}: case {unknown[0]} not found in {reader.root}")
            splits.patients[name] = sorted({patient_of[c] for c in getattr(splits, name)})
    splits.check(p)
    return splits
