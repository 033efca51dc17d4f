"""`samatch data check`: summaries of the real folders, and one line per bad file, never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samatch.cli import main

REPO = Path(__file__).resolve().parents[1]


def check(*argv: str) -> int:
    return main(["data", "check", *argv])


def _row(out: str, split: str, key: str) -> str:
    """Value of row ``key`` in the table of ``split``."""
    block = out.split(f"split {split}\n", 1)[1].split("\n\n", 1)[0]
    match = re.search(rf"^  {re.escape(key)}\s+(.*)$", block, flags=re.M)
    assert match, f"no row {key!r} in split {split}:\n{block}"
    return match.group(1).strip()


# ---- real data -------------------------------------------------------------------------------


def test_real_acdc(acdc_root, capsys):
    assert check(str(acdc_root)) == 0
    out = capsys.readouterr().out
    assert out.startswith("dataset acdc-h5")
    assert _row(out, "train", "cases") == "1312" and _row(out, "train", "patients") == "70"
    assert _row(out, "val", "cases") == "20" and _row(out, "val", "patients") == "10"
    assert _row(out, "train", "label values") == "0 1 2 3"
    assert _row(out, "val", "spacing") == "none: ACDC h5 files carry no voxel spacing"


def test_real_busi(busi_root, capsys):
    assert check(str(busi_root)) == 0
    out = capsys.readouterr().out
    assert _row(out, "(all cases)", "cases") == "130"
    assert _row(out, "(all cases)", "label values") == "0 1"
    assert _row(out, "(all cases)", "lesion").split()[0] == "1"  # class row: value column


def test_real_chaos(chaos_root, capsys):
    assert check(str(chaos_root), "--label-map", "chaos-liver") == 0
    out = capsys.readouterr().out
    assert _row(out, "(all cases)", "cases") == "15"
    assert _row(out, "(all cases)", "spacing") == "mm (z, y, x): 7.7 x 1.25 x 1.25 (15)"
    assert _row(out, "(all cases)", "label values") == "0 1"


def test_console_entry_in_a_subprocess(chaos_root, tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "samatch.cli", "data", "check", str(chaos_root), "--format", "nifti"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "label values 0 1 2 3 4" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "samatch.cli", "data", "check", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"samatch: error: {tmp_path / 'missing'}: folder not found"


# ---- tiny folders ----------------------------------------------------------------------------


def test_tiny_acdc_voxel_counts(tiny_acdc_h5, capsys):
    assert check(str(tiny_acdc_h5)) == 0
    out = capsys.readouterr().out
    # Each slice: 26 background, 1 RV, 1 myocardium, 2 LV voxels. Train: 5 slices; val: 2.
    expected = {"train": [130, 5, 5, 10], "val": [52, 2, 2, 4]}
    for split, counts in expected.items():
        for name, value, count in zip(
            ("background", "RV", "myocardium", "LV"), range(4), counts, strict=True
        ):
            assert _row(out, split, name).split()[:2] == [str(value), str(count)]
    assert _row(out, "train", "image sizes") == "6x5 (5)"
    assert _row(out, "train", "patients") == "3"
    assert _row(out, "val", "slices") == "2 (per case: 2)"


RAMP = np.linspace(0, 1, 30, dtype=np.float32).reshape(6, 5)
ZEROS = np.zeros((6, 5), np.uint8)


# Breakers: (synth, folder) -> the path the error line must name.
def _break_h5(synth, root, image, label):
    return synth.write_h5(root / "data" / "slices" / f"{synth.train_names[0]}.h5", image, label)


def _remove(path):
    path.unlink()
    return path


def _remove_slice(synth, root):
    return _remove(root / "data" / "slices" / f"{synth.train_names[3]}.h5")


def _corrupt_png(synth, root):
    # 64 x 64 so that half the file cuts into pixel data, not the header.
    path = synth.write_png(root / "malignant" / "malignant (1).png", synth.busi_image(5, (64, 64)))
    return synth.truncate(path)


def _frame_4d(synth, root):
    path = root / "patient001" / "patient001_frame12.nii.gz"
    return synth.write_nifti(path, np.stack([synth.xyz_volume()] * 2, axis=-1), (1, 1, 1, 1))


def _mask_removed(synth, root):
    _remove(root / "benign" / "benign (1)_mask.png")
    return root / "benign" / "benign (1).png"


def _lists_removed(synth, root):
    _remove(root / "train_slices.list")
    _remove(root / "val.list")
    return root


# kind -> (folder fixture, breaker, expected problem text, extra CLI args)
def _written(path):
    path.write_text("not a dataset")
    return path


BAD_INPUTS = {
    "missing file": ("tiny_acdc_h5", _remove_slice, "file not found", []),
    "truncated h5": (
        "tiny_acdc_h5",
        lambda s, r: s.truncate(r / "data" / "patient003_frame01.h5"),
        "cannot read HDF5",
        [],
    ),
    "corrupt nii.gz": ("tiny_chaos", lambda s, r: s.truncate(r / "label_2.nii.gz"), "cannot read NIfTI", []),
    "corrupt png": ("tiny_busi", _corrupt_png, "cannot read PNG", []),
    "shape mismatch": (
        "tiny_acdc_h5",
        lambda s, r: _break_h5(s, r, RAMP, np.zeros((6, 4), np.uint8)),
        "label shape (1, 6, 4) differs from image shape (1, 6, 5)",
        [],
    ),
    "label out of classes": (
        "tiny_acdc_h5",
        lambda s, r: _break_h5(s, r, RAMP, np.full((6, 5), 7, np.uint8)),
        "label values [7] outside the 4 declared classes",
        [],
    ),
    "NaN in image": ("tiny_acdc_h5", lambda s, r: _break_h5(s, r, RAMP * np.nan, ZEROS), "30 NaN or inf", []),
    "constant image": (
        "tiny_acdc_h5",
        lambda s, r: _break_h5(s, r, RAMP * 0, ZEROS),
        "image is constant",
        [],
    ),
    "4D NIfTI": ("tiny_acdc_nifti", _frame_4d, "4D image", []),
    "BUSI image without mask": ("tiny_busi", _mask_removed, "image has no mask", []),
    "missing folder": ("tmp_path", lambda s, r: r / "nowhere", "folder not found", []),
    "a file": ("tmp_path", lambda s, r: _written(r / "notes.txt"), "a file, not a dataset folder", []),
    "unknown layout": ("tmp_path", lambda s, r: r, "cannot detect the dataset format; give it (--format", []),
    "missing list files": ("tiny_acdc_h5", _lists_removed, "no split list found", ["--format", "acdc-h5"]),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_one_line(kind, request, synth, capsys):
    fixture, breaker, problem, args = BAD_INPUTS[kind]
    root = request.getfixturevalue(fixture)
    bad_path = breaker(synth, root)
    target = bad_path if kind in ("missing folder", "a file") else root
    rc = check(str(target), *args)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"samatch: error: {bad_path}: ")
    assert problem in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_keep_going_reports_each_bad_file_and_summarizes_the_rest(tiny_acdc_h5, synth, capsys):
    nan_path = _break_h5(synth, tiny_acdc_h5, RAMP * np.nan, ZEROS)
    gone = tiny_acdc_h5 / "data" / "slices" / f"{synth.train_names[3]}.h5"
    gone.unlink()
    rc = check(str(tiny_acdc_h5), "--keep-going")
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("samatch: error:")]
    assert rc == 2
    assert errors == [
        f"samatch: error: {nan_path}: image has 30 NaN or inf values",
        f"samatch: error: {gone}: file not found",
    ]
    assert _row(captured.out, "train", "cases") == "3 (+2 bad)"
    assert _row(captured.out, "train", "background").split()[:2] == ["0", str(3 * 26)]
    assert _row(captured.out, "val", "cases") == "1"
    assert "Traceback" not in captured.err


def test_bad_label_map_is_a_usage_error(tiny_chaos, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check(str(tiny_chaos), "--label-map", "liver")
    assert exit_info.value.code == 2
    assert "bad label map 'liver'" in capsys.readouterr().err
