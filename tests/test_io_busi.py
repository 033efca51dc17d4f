"""BUSI reader: real folder counts and mask merging, tiny files for grayscale and errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samatch.io import DataError, detect_format, open_dataset
from samatch.io.busi import BusiReader, read_gray

# ---- real data -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busi(busi_root):
    return open_dataset(busi_root)


@pytest.fixture(scope="module")
def busi_cases(busi):
    return {ref.case_id: (ref, ref.load()) for ref in busi.cases()}


def test_real_busi_counts(busi, busi_cases):
    assert busi.name == "busi" and busi.available_splits() == []
    assert len(busi_cases) == 130
    assert Counter(ref.category for ref, _ in busi_cases.values()) == {
        "benign": 80,
        "malignant": 40,
        "normal": 10,
    }
    # No patient ids in BUSI: each image is its own patient.
    assert all(ref.patient_id == ref.case_id for ref, _ in busi_cases.values())
    assert all(case.meta.extra["category"] == ref.category for ref, case in busi_cases.values())


def test_real_busi_extra_masks_are_or_merged(busi_cases):
    with_extra = sorted(cid for cid, (ref, _) in busi_cases.items() if len(ref.paths) > 2)
    assert with_extra == ["benign_004", "benign_025", "benign_054", "benign_058"]
    for cid in with_extra:
        ref, case = busi_cases[cid]
        # Independent union: every mask file through Pillow's own grayscale conversion, > 0.
        union = np.zeros(case.label.shape[1:], dtype=bool)
        for path in ref.paths[1:]:
            union |= np.asarray(Image.open(path).convert("L")) > 0
        np.testing.assert_array_equal(case.label[0], union.astype(np.uint8))
        assert int(case.label.sum()) == MERGED_PIXELS[cid]


# Measured: _mask + _mask_1 pixels. 004, 025, 054: disjoint masks, so the sum of both;
# 058: _mask_1 lies inside _mask, so just _mask.
MERGED_PIXELS = {
    "benign_004": 1984 + 624,
    "benign_025": 3256 + 2568,
    "benign_054": 19141 + 1609,
    "benign_058": 14751,
}


def test_real_busi_masks_empty_exactly_for_normal(busi_cases):
    for ref, case in busi_cases.values():
        assert case.image.shape == case.label.shape and case.image.shape[0] == 1
        assert set(np.unique(case.label).tolist()) <= {0, 1}
        assert (case.label.sum() == 0) == (ref.category == "normal"), ref.case_id


# ---- tiny files ------------------------------------------------------------------------------


def test_luma_of_one_rgb_pixel(tmp_path, synth):
    # BT.601: 0.299 * 100 + 0.587 * 50 + 0.114 * 200 = 29.9 + 29.35 + 22.8 = 82.05
    pixel = np.array([[[100, 50, 200], [0, 0, 0]]], dtype=np.uint8)
    gray = read_gray(synth.write_png(tmp_path / "p.png", pixel))
    assert gray.dtype == np.float32 and gray.shape == (1, 2)
    assert gray[0, 0] == pytest.approx(82.05, abs=1e-4) and gray[0, 1] == 0.0


def test_tiny_busi_cases_and_masks(tiny_busi):
    assert detect_format(tiny_busi) == "busi"
    refs = BusiReader(tiny_busi).cases()
    assert [r.case_id for r in refs] == ["benign_001", "benign_002", "malignant_001", "normal_001"]
    sums = [int(r.load().label.sum()) for r in refs]
    assert sums == [4, 9, 6, 0]  # see the tiny_busi docstring


def test_image_without_mask(tiny_busi):
    (tiny_busi / "malignant" / "malignant (1)_mask.png").unlink()
    ref = BusiReader(tiny_busi).cases()[2]
    with pytest.raises(DataError, match=r"image has no mask \(expected 'malignant \(1\)_mask.png'\)") as err:
        ref.load()
    assert err.value.path == str(tiny_busi / "malignant" / "malignant (1).png")


def test_mask_without_image(tiny_busi):
    (tiny_busi / "normal" / "normal (1).png").unlink()
    with pytest.raises(DataError, match="file not found") as err:
        BusiReader(tiny_busi).cases()[3].load()
    assert err.value.path == str(tiny_busi / "normal" / "normal (1).png")


def test_truncated_png(tiny_busi, synth):
    # A bigger image, so that half the file cuts into the pixel data rather than the header.
    path = synth.write_png(tiny_busi / "benign" / "benign (1).png", synth.busi_image(7, shape=(64, 64)))
    synth.truncate(path)
    with pytest.raises(DataError, match="cannot read PNG") as err:
        BusiReader(tiny_busi).cases()[0].load()
    assert err.value.path == str(path)


def test_mask_of_other_size(tiny_busi, synth):
    path = synth.write_png(tiny_busi / "benign" / "benign (2)_mask_1.png", np.zeros((5, 6), np.uint8))
    with pytest.raises(DataError, match=r"mask shape \(5, 6\) differs from image shape \(4, 6\)") as err:
        BusiReader(tiny_busi).cases()[1].load()
    assert err.value.path == str(path)


def test_constant_image(tiny_busi, synth):
    synth.write_png(tiny_busi / "normal" / "normal (1).png", np.full((4, 6, 3), 9, np.uint8))
    with pytest.raises(DataError, match="image is constant"):
        BusiReader(tiny_busi).cases()[3].load()


def test_missing_categories(tmp_path: Path):
    with pytest.raises(DataError, match="no category folder"):
        BusiReader(tmp_path)
