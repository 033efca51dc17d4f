"""Splits by patient: literature budgets on real ACDC, seeded stratified holdouts, JSON round trip."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from samatch.io import DataError, open_dataset
from samatch.splits import Splits, load_splits, make_splits, save_splits


def _patients_of(ids: list[str]) -> set[str]:
    return {i.split("_")[0] for i in ids}  # ACDC names start with patientXXX


# ---- real data -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acdc(acdc_root):
    return open_dataset(acdc_root)


@pytest.mark.parametrize("patients, slices", [(1, 32), (3, 68), (7, 136)])
def test_real_acdc_literature_budgets(acdc, patients, slices):
    splits = make_splits(acdc, patients, "patients")
    assert len(splits.labeled) == slices
    assert len(splits.labeled) + len(splits.unlabeled) == 1312
    assert len(splits.val) == 20 and splits.test == []
    assert len(splits.patients["labeled"]) == patients
    for a, b in [("labeled", "unlabeled"), ("labeled", "val"), ("unlabeled", "val")]:
        assert not set(splits.patients[a]) & set(splits.patients[b])


def test_real_acdc_three_patients_are_the_first_68_slices(acdc, acdc_root):
    splits = make_splits(acdc, 3, "patients")
    assert splits.patients["labeled"] == ["patient038", "patient050", "patient099"]
    first_68 = (acdc_root / "train_slices.list").read_text().split()[:68]
    assert splits.labeled == first_68
    assert make_splits(acdc, 68, "slices").labeled == first_68


def test_real_acdc_slice_budget_must_fall_on_a_patient(acdc):
    with pytest.raises(DataError, match="would split patient patient100; nearest: 68 or 84"):
        make_splits(acdc, 70, "slices")


def test_real_busi_stratified(busi_root):
    reader = open_dataset(busi_root)
    splits = make_splits(reader, 10, "images", seed=0)
    category = lambda ids: Counter(i.split("_")[0] for i in ids)
    # 20% of 80 / 40 / 10 held out; 10 labeled from 64 / 32 / 8 in proportion: 6.2, 3.1, 0.8 -> 6, 3, 1.
    assert category(splits.val) == {"benign": 16, "malignant": 8, "normal": 2}
    assert category(splits.labeled) == {"benign": 6, "malignant": 3, "normal": 1}
    assert len(splits.unlabeled) == 130 - 26 - 10
    assert splits.val_fraction == 0.2
    assert make_splits(reader, 10, "images", seed=0) == splits
    assert make_splits(reader, 10, "images", seed=1).labeled != splits.labeled


def test_real_chaos_holdout(chaos_root):
    splits = make_splits(open_dataset(chaos_root, label_map="chaos-liver"), 2, "cases", seed=0)
    assert (len(splits.labeled), len(splits.unlabeled), len(splits.val)) == (2, 10, 3)
    assert not set(splits.labeled) & set(splits.val)


# ---- tiny data -------------------------------------------------------------------------------


def test_tiny_acdc_takes_every_slice_of_a_patient(tiny_acdc_h5):
    # patient002 owns list positions 0, 1 and 3; patient001 position 2; patient004 position 4.
    splits = make_splits(open_dataset(tiny_acdc_h5), 1, "patients")
    assert splits.labeled == [
        "patient002_frame01_slice_0",
        "patient002_frame01_slice_1",
        "patient002_frame02_slice_0",
    ]
    assert splits.unlabeled == ["patient001_frame01_slice_0", "patient004_frame01_slice_0"]
    assert splits.val == ["patient003_frame01"] and splits.val_fraction is None
    with pytest.raises(DataError, match="would split patient patient002"):
        make_splits(open_dataset(tiny_acdc_h5), 2, "slices")


def test_tiny_acdc_without_val_list_holds_out_patients(tiny_acdc_h5):
    (tiny_acdc_h5 / "val.list").unlink()
    splits = make_splits(open_dataset(tiny_acdc_h5), 1, "patients", val_fraction=0.34)
    # 3 train patients, round(0.34 * 3) = 1 held out; the remaining two: one labeled, one unlabeled.
    assert len(splits.patients["val"]) == 1 and len(splits.patients["labeled"]) == 1
    assert _patients_of(splits.val) == set(splits.patients["val"])
    assert not _patients_of(splits.val) & _patients_of(splits.labeled + splits.unlabeled)


def test_budget_too_large_and_bad_unit(tiny_chaos):
    reader = open_dataset(tiny_chaos)
    # 2 cases, round(0.2 * 2) = 0 held out: at most 2 to label.
    with pytest.raises(DataError, match="budget of 3 cases exceeds the 2 available"):
        make_splits(reader, 3, "cases")
    with pytest.raises(ValueError, match="unknown budget unit"):
        make_splits(reader, 1, "voxels")
    with pytest.raises(DataError, match="needs 2D cases"):
        make_splits(reader, 1, "slices")


def test_json_round_trip(tiny_acdc_h5, tmp_path):
    reader = open_dataset(tiny_acdc_h5)
    splits = make_splits(reader, 1, "patients", seed=3)
    path = save_splits(splits, tmp_path / "runs" / "splits.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["format"] == "acdc-h5" and data["budget"] == 1
    assert data["unit"] == "patients" and data["seed"] == 3
    assert load_splits(path) == splits
    assert load_splits(path, reader) == splits


def test_patient_in_two_splits_is_an_error(tiny_acdc_h5, tmp_path):
    reader = open_dataset(tiny_acdc_h5)
    splits = make_splits(reader, 1, "patients")
    # Move one of patient002's slices to unlabeled: the patient now straddles two splits.
    moved = Splits(
        **{
            **splits.__dict__,
            "labeled": splits.labeled[:2],
            "unlabeled": splits.unlabeled + splits.labeled[2:],
        }
    )
    moved.patients = {}  # as if written by hand: only the reader can tell whom a case belongs to
    path = save_splits(moved, tmp_path / "bad.json")
    with pytest.raises(DataError, match="patient patient002 is in both labeled and unlabeled") as err:
        load_splits(path, reader)
    assert err.value.path == str(path)


@pytest.mark.parametrize(
    "content, problem",
    [(None, "file not found"), ("{not json", "not a splits file"), ('{"version": 1}', "not a splits file")],
)
def test_bad_splits_file(tmp_path, content, problem):
    path = tmp_path / "splits.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=problem):
        load_splits(path)


def test_dataset_lists_sharing_a_patient(tiny_acdc_h5):
    # patient001 has a training slice; listing one of its volumes for validation leaks it.
    (tiny_acdc_h5 / "val.list").write_text("patient003_frame01\npatient001_frame02\n")
    with pytest.raises(DataError, match="patient patient001 is in both unlabeled and val"):
        make_splits(open_dataset(tiny_acdc_h5), 1, "patients")
