"""ACDC readers: the SSL4MIS h5 layout on the real data and on tiny files, and raw ACDC NIfTI."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

from samatch.io import DataError, detect_format, open_dataset
from samatch.io.acdc import AcdcH5Reader, AcdcNiftiReader
from samatch.preprocess import inverse_resize_label, resize_label

# ---- real data -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acdc(acdc_root):
    return open_dataset(acdc_root)


def test_real_acdc_index(acdc):
    # Prepare / Execute
    start = time.perf_counter()
    train = acdc.cases("train")
    elapsed = time.perf_counter() - start
    val = acdc.cases("val")
    # Assert
    assert acdc.name == "acdc-h5"
    assert acdc.available_splits() == ["train", "val"]  # no test.list here
    assert elapsed < 5.0  # indexing reads no pixels; measured ~10 ms
    assert len(train) == 1312 and len({r.patient_id for r in train}) == 70
    assert len(val) == 20 and len({r.patient_id for r in val}) == 10
    assert train[0].case_id == "patient099_frame01_slice_15" and train[0].patient_id == "patient099"
    # The literature's 1-patient budget is 32 slices of patient099.
    assert sum(r.patient_id == "patient099" for r in train) == 32
    assert not {r.patient_id for r in train} & {r.patient_id for r in val}
    assert acdc.class_names == ("background", "RV", "myocardium", "LV")


def test_real_acdc_all_train_slices_load_with_labels_0_to_3(acdc):
    values: set[int] = set()
    for ref in acdc.cases("train"):
        case = ref.load()
        assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
        assert case.image.shape[0] == 1 and case.image.shape == case.label.shape
        values |= set(np.unique(case.label).tolist())
    assert values == {0, 1, 2, 3}


def test_real_acdc_val_volume_meta(acdc):
    ref = next(r for r in acdc.cases("val") if r.case_id == "patient028_frame01")
    case = ref.load()
    assert case.image.shape == (10, 256, 224)  # (Z, H, W) as stored in the h5 file
    assert case.meta.spacing is None
    assert "no voxel spacing" in case.meta.extra["spacing_note"]
    assert case.meta.axes == "zyx" and case.meta.patient_id == "patient028"
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0


def test_real_label_resize_round_trip(acdc):
    """patient028_frame01 label, native 256 x 224: exact back at 256 x 224, Dice >= 0.98 via 224 x 224."""
    label = next(r for r in acdc.cases("val") if r.case_id == "patient028_frame01").load().label
    native = label.shape[1:]
    # Network size == native size: the round trip must be the identity.
    assert np.array_equal(inverse_resize_label(resize_label(label, native), native), label)
    # 224 x 224 squeezes rows 256 -> 224 and loses detail; measured Dice 0.992..0.996 per class.
    back = inverse_resize_label(resize_label(label, 224), native)
    assert back.shape == label.shape
    for k in (1, 2, 3):
        a, b = label == k, back == k
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98


# ---- tiny h5 folders -------------------------------------------------------------------------


def test_tiny_h5_cases_follow_list_order(tiny_acdc_h5, synth):
    reader = AcdcH5Reader(tiny_acdc_h5)
    train = reader.cases("train")
    assert [r.case_id for r in train] == synth.train_names
    assert [r.patient_id for r in train] == [
        "patient002",
        "patient002",
        "patient001",
        "patient002",
        "patient004",
    ]
    assert all(r.num_slices == 1 and r.split == "train" for r in train)
    assert [r.case_id for r in reader.cases(None)] == synth.train_names + ["patient003_frame01"]


def test_tiny_h5_load_slice_and_volume(tiny_acdc_h5, synth):
    reader = AcdcH5Reader(tiny_acdc_h5)
    case = reader.cases("train")[2].load()
    image, label = synth.tiny_slice(2)  # the third listed slice was written with seed 2
    assert case.image.shape == (1, 6, 5) and case.image.dtype == np.float32
    np.testing.assert_array_equal(case.image[0], image)
    np.testing.assert_array_equal(case.label[0], label)
    vol = reader.cases("val")[0].load()
    assert vol.image.shape == (2, 6, 5) and vol.label.shape == (2, 6, 5)


def test_absent_list_means_absent_split(tiny_acdc_h5):
    (tiny_acdc_h5 / "val.list").unlink()
    reader = AcdcH5Reader(tiny_acdc_h5)
    assert reader.available_splits() == ["train"]
    with pytest.raises(DataError, match="val.list: split 'val' not available"):
        reader.cases("val")


def test_no_list_at_all_is_an_error(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="no split list"):
        AcdcH5Reader(tmp_path)


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        AcdcH5Reader(tmp_path / "nope")


def test_bad_list_line_names_the_line(tiny_acdc_h5):
    (tiny_acdc_h5 / "val.list").write_text("patient003_frame01\nnot_a_case\n")
    with pytest.raises(DataError, match=r"val.list: line 2: 'not_a_case'"):
        AcdcH5Reader(tiny_acdc_h5).cases("val")


@pytest.mark.parametrize(
    "image, label, problem",
    [
        (np.ones((6, 5), np.float32), np.zeros((6, 5), np.uint8), "image is constant"),
        (
            np.where(np.eye(6, 5) > 0, np.nan, 0.5).astype(np.float32),
            np.zeros((6, 5), np.uint8),
            "5 NaN or inf",
        ),
        (np.linspace(0, 1, 30, dtype=np.float32).reshape(6, 5), np.zeros((6, 4), np.uint8), "label shape"),
        (
            np.linspace(0, 1, 30, dtype=np.float32).reshape(6, 5),
            np.full((6, 5), 4, np.uint8),
            r"values \[4\]",
        ),
    ],
)
def test_bad_h5_content(tiny_acdc_h5, synth, image, label, problem):
    path = tiny_acdc_h5 / "data" / "slices" / f"{synth.train_names[0]}.h5"
    synth.write_h5(path, image, label)
    with pytest.raises(DataError, match=problem) as err:
        AcdcH5Reader(tiny_acdc_h5).cases("train")[0].load()
    assert err.value.path == str(path)


def test_truncated_h5(tiny_acdc_h5, synth):
    path = synth.truncate(tiny_acdc_h5 / "data" / "slices" / f"{synth.train_names[1]}.h5")
    with pytest.raises(DataError, match="cannot read HDF5") as err:
        AcdcH5Reader(tiny_acdc_h5).cases("train")[1].load()
    assert err.value.path == str(path) and "\n" not in str(err.value)


def test_h5_without_label_dataset(tiny_acdc_h5, synth):
    path = tiny_acdc_h5 / "data" / "slices" / f"{synth.train_names[0]}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.eye(3, dtype=np.float32))
    with pytest.raises(DataError, match="no dataset 'label'"):
        AcdcH5Reader(tiny_acdc_h5).cases("train")[0].load()


def test_listed_but_missing_file(tiny_acdc_h5, synth):
    path = tiny_acdc_h5 / "data" / "slices" / f"{synth.train_names[3]}.h5"
    path.unlink()
    refs = AcdcH5Reader(tiny_acdc_h5).cases("train")  # indexing does not touch the files
    with pytest.raises(DataError, match="file not found") as err:
        refs[3].load()
    assert err.value.path == str(path)


def test_label_map_applies_to_acdc(tiny_acdc_h5):
    reader = AcdcH5Reader(tiny_acdc_h5, label_map="3=1")  # LV only
    label = reader.cases("train")[0].load().label
    assert reader.num_classes == 2
    assert sorted(np.unique(label).tolist()) == [0, 1] and int(label.sum()) == 2  # the 2 LV voxels


# ---- raw ACDC NIfTI --------------------------------------------------------------------------


def test_acdc_nifti_discovery_ignores_4d_and_cfg(tiny_acdc_nifti, synth):
    assert detect_format(tiny_acdc_nifti) == "acdc-nifti"
    reader = AcdcNiftiReader(tiny_acdc_nifti)
    refs = reader.cases()
    assert reader.available_splits() == []
    assert [r.case_id for r in refs] == ["patient001_frame01", "patient001_frame12"]
    case = refs[1].load()
    # (x, y, z) = (5, 4, 3) on disk -> (z, y, x); value 100 x + 10 y + z, so image[z, y, x] checks the axes.
    assert case.image.shape == (3, 4, 5)
    assert case.image[2, 1, 4] == 100 * 4 + 10 * 1 + 2
    assert case.meta.spacing == pytest.approx((10.0, 1.4, 1.4))
    assert case.meta.axes == "xyz->zyx" and case.meta.affine.shape == (4, 4)
    assert case.label.max() == 3 and case.label.dtype == np.uint8


def test_acdc_nifti_4d_frame_is_an_error(tiny_acdc_nifti, synth):
    frame = tiny_acdc_nifti / "patient002" / "patient002_frame01.nii.gz"
    synth.write_nifti(frame, np.stack([synth.xyz_volume()] * 2, axis=-1), zooms=(1, 1, 1, 1))
    synth.write_nifti(frame.with_name("patient002_frame01_gt.nii.gz"), synth.xyz_label() % 4)
    ref = next(r for r in AcdcNiftiReader(tiny_acdc_nifti).cases() if r.patient_id == "patient002")
    with pytest.raises(DataError, match="4D image of shape") as err:
        ref.load()
    assert err.value.path == str(frame)


def test_acdc_nifti_lists_define_splits(tiny_acdc_nifti):
    (tiny_acdc_nifti / "val.list").write_text("patient001_frame12\n")
    reader = AcdcNiftiReader(tiny_acdc_nifti)
    assert reader.available_splits() == ["val"]
    assert [r.case_id for r in reader.cases("val")] == ["patient001_frame12"]
