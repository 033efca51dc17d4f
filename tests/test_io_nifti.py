"""Generic NIfTI reader (CHAOS pairs, nnU-Net folders) and label maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from samatch.io import DataError, detect_format, open_dataset
from samatch.io.labelmap import PRESETS, parse_label_map
from samatch.io.nifti import NiftiReader

# ---- real data -------------------------------------------------------------------------------


def test_real_chaos_liver(chaos_root):
    reader = open_dataset(chaos_root, label_map="chaos-liver")
    refs = reader.cases()
    assert reader.name == "nifti" and reader.layout == "chaos"
    assert len(refs) == 15 and len({r.patient_id for r in refs}) == 15
    assert reader.class_names == ("background", "liver")
    for ref in refs:
        case = ref.load()
        # Header zooms are (x, y, z) = 1.25, 1.25, 7.7 mm; the contract orders them (z, y, x).
        assert case.meta.spacing == pytest.approx((7.7, 1.25, 1.25), abs=1e-4)
        assert case.image.shape[1:] == (256, 256) and case.meta.axes == "xyz->zyx"
        assert set(np.unique(case.label).tolist()) == {0, 1}, f"{ref.case_id}: liver missing"


def test_real_chaos_without_map_finds_five_classes(chaos_root):
    reader = NiftiReader(chaos_root)
    assert reader.declared_classes() is None
    assert reader.num_classes == 5  # background, liver, right kidney, left kidney, spleen


# ---- tiny CHAOS-style folders ----------------------------------------------------------------


def test_tiny_chaos_axes_spacing_and_values(tiny_chaos, synth):
    assert detect_format(tiny_chaos) == "nifti"
    refs = NiftiReader(tiny_chaos).cases()
    assert [r.case_id for r in refs] == ["case_1", "case_2"]
    case = refs[1].load()
    assert case.image.shape == (3, 4, 5) and case.image.dtype == np.float32
    # image_2 holds 100 x + 10 y + z + 2 at (x, y, z): voxel (x=3, y=2, z=1) -> 300 + 20 + 1 + 2.
    assert case.image[1, 2, 3] == 323.0
    assert case.meta.spacing == pytest.approx((3.0, 2.0, 1.5))  # zooms (1.5, 2, 3) reversed
    np.testing.assert_array_equal(case.meta.affine, np.diag([1.5, 2.0, 3.0, 1.0]))
    # label = x % 5 with x = 0..4: each value appears on 4 y x 3 z = 12 voxels.
    assert np.bincount(case.label.ravel()).tolist() == [12, 12, 12, 12, 12]


@pytest.mark.parametrize(
    "spec, expected_counts, num_classes",
    [
        ("chaos-liver", [48, 12], 2),  # only label 1 kept
        ("1=1,2=2", [36, 12, 12], 3),
        ("2=1,3=1", [36, 24], 2),  # kidneys merged
        ("4=2", [48, 0, 12], 3),  # class 1 exists but is empty
    ],
)
def test_label_map_on_load(tiny_chaos, spec, expected_counts, num_classes):
    reader = NiftiReader(tiny_chaos, label_map=spec)
    label = reader.cases()[0].load().label
    assert reader.num_classes == num_classes
    assert np.bincount(label.ravel(), minlength=num_classes).tolist() == expected_counts


@pytest.mark.parametrize("bad", ["liver", "1=", "1:1", "a=1", "1=1,1=2", "300=1"])
def test_bad_label_map_spec(bad):
    with pytest.raises(ValueError):
        parse_label_map(bad)


def test_label_map_names():
    assert PRESETS["chaos-liver"].class_names == ("background", "liver")
    assert parse_label_map("1=2").class_names == ("background", "class1", "class2")
    assert parse_label_map({3: 1}).spec() == "3=1"


def test_corrupt_nifti(tiny_chaos, synth):
    path = synth.truncate(tiny_chaos / "image_2.nii.gz")
    with pytest.raises(DataError, match="cannot read NIfTI") as err:
        NiftiReader(tiny_chaos).cases()[1].load()
    assert err.value.path == str(path) and "\n" not in str(err.value)


def test_4d_nifti(tiny_chaos, synth):
    synth.write_nifti(
        tiny_chaos / "image_1.nii.gz", np.stack([synth.xyz_volume()] * 2, axis=-1), (1, 1, 1, 1)
    )
    with pytest.raises(DataError, match=r"4D image of shape \(5, 4, 3, 2\)"):
        NiftiReader(tiny_chaos).cases()[0].load()


def test_missing_label_file(tiny_chaos):
    (tiny_chaos / "label_2.nii.gz").unlink()
    with pytest.raises(DataError, match="file not found") as err:
        NiftiReader(tiny_chaos).cases()[1].load()
    assert err.value.path == str(tiny_chaos / "label_2.nii.gz")


def test_non_integer_label(tiny_chaos, synth):
    synth.write_nifti(tiny_chaos / "label_1.nii.gz", synth.xyz_label() + np.float32(0.5))
    with pytest.raises(DataError, match="non-integer"):
        NiftiReader(tiny_chaos).cases()[0].load()


def test_inf_in_image(tiny_chaos, synth):
    vol = synth.xyz_volume()
    vol[0, 0, 0] = np.inf
    synth.write_nifti(tiny_chaos / "image_1.nii.gz", vol)
    with pytest.raises(DataError, match="1 NaN or inf"):
        NiftiReader(tiny_chaos).cases()[0].load()


# ---- nnU-Net layout --------------------------------------------------------------------------


@pytest.fixture
def tiny_nnunet(tmp_path, synth):
    root = tmp_path / "Dataset001_Liver"
    for case in ("liver_001", "liver_002"):
        synth.write_nifti(root / "imagesTr" / f"{case}_0000.nii.gz", synth.xyz_volume())
        synth.write_nifti(root / "labelsTr" / f"{case}.nii.gz", synth.xyz_label() % 3)
    labels = {"background": 0, "liver": 1, "tumour": 2}
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    return root


def test_nnunet_layout(tiny_nnunet):
    reader = open_dataset(tiny_nnunet)
    assert reader.name == "nifti" and reader.layout == "nnunet"
    assert reader.class_names == ("background", "liver", "tumour")
    refs = reader.cases()
    assert [r.case_id for r in refs] == ["liver_001", "liver_002"]
    assert refs[0].paths[1].endswith("labelsTr/liver_001.nii.gz")
    # x % 5 % 3 over x = 0..4 -> 0, 1, 2, 0, 1: counts 2, 2, 1 columns of 12 voxels.
    assert np.bincount(refs[0].load().label.ravel()).tolist() == [24, 24, 12]


def test_nnunet_v1_labels(tiny_nnunet):
    (tiny_nnunet / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    reader = NiftiReader(tiny_nnunet)
    assert reader.class_names == ("background", "liver")
    # The tiny labels hold value 2, which this dataset.json does not declare.
    with pytest.raises(DataError, match=r"label values \[2\] outside the 2 declared classes"):
        reader.cases()[0].load()


def test_nnunet_multichannel_refused(tiny_nnunet, synth):
    synth.write_nifti(tiny_nnunet / "imagesTr" / "liver_001_0001.nii.gz", synth.xyz_volume())
    with pytest.raises(DataError, match="multi-channel"):
        NiftiReader(tiny_nnunet).cases()


def test_nnunet_missing_dataset_json(tiny_nnunet):
    (tiny_nnunet / "dataset.json").unlink()
    with pytest.raises(DataError, match="dataset.json: file not found"):
        NiftiReader(tiny_nnunet)
