"""Hand-computed Dice / HD95 / ASD on tiny volumes, empty-mask conventions, summaries and files.

Bars of single voxels are all surface (one erosion removes them), so surface distances are plain
voxel-to-nearest-voxel distances.
"""

import csv
import json
import math

import numpy as np
import pytest

from samatch.metrics import case_metrics, case_rows, summarize, write_case_csv, write_summary_json

SHAPE = (1, 4, 10)  # (Z, H, W)


def _vol(*runs, shape=SHAPE):
    """runs: (label, z, y, x0, x1) with inclusive x0..x1 -> label volume."""
    v = np.zeros(shape, dtype=np.int64)
    for label, z, y, x0, x1 in runs:
        v[z, y, x0 : x1 + 1] = label
    return v


# gt bar x = 1..4, pred bar x = 3..6 (same row): overlap 2 of 4 + 4 -> Dice 0.5.
# pred -> gt distances (x = 3, 4, 5, 6): 0, 0, 1, 2; gt -> pred (x = 1, 2, 3, 4): 2, 1, 0, 0.
# 95th percentile with linear interpolation of [0, 0, 1, 2]: position 2.85 -> 1 + 0.85 = 1.85.
# ASD (symmetric): mean of all eight distances = 6 / 8 = 0.75.
BAR_GT, BAR_PRED = _vol((1, 0, 1, 1, 4)), _vol((1, 0, 1, 3, 6))
DIAG = math.sqrt(3**2 + 9**2)  # (Z-1, H-1, W-1) = (0, 3, 9) voxels

CASES = [
    # (pred, gt, spacing, dice, hd95, asd, units, empty)
    (BAR_PRED, BAR_GT, None, 0.5, 1.85, 0.75, "voxels", "none"),
    # x spacing 2 mm doubles every distance; y and z spacing do not enter (no offset along them)
    (BAR_PRED, BAR_GT, (4.0, 3.0, 2.0), 0.5, 3.7, 1.5, "mm", "none"),
    # single voxels 2 apart: Dice 0, every distance 2
    (_vol((1, 0, 1, 4, 4)), _vol((1, 0, 1, 2, 2)), None, 0.0, 2.0, 2.0, "voxels", "none"),
    # asymmetric: pred is the single voxel x = 4 of the gt bar x = 1..4. Dice 2 / 5.
    # pred -> gt: [0]; gt -> pred: [3, 2, 1, 0], 95th percentile 2.85. ASD over all five: 6 / 5.
    (_vol((1, 0, 1, 4, 4)), BAR_GT, None, 0.4, 2.85, 1.2, "voxels", "none"),
    (BAR_GT, BAR_GT, (1.0, 1.0, 1.0), 1.0, 0.0, 0.0, "mm", "none"),
    # empties: both -> perfect; one -> Dice 0 and the volume diagonal
    (np.zeros(SHAPE, int), np.zeros(SHAPE, int), None, 1.0, 0.0, 0.0, "voxels", "both"),
    (np.zeros(SHAPE, int), BAR_GT, None, 0.0, DIAG, DIAG, "voxels", "pred"),
    (BAR_PRED, np.zeros(SHAPE, int), None, 0.0, DIAG, DIAG, "voxels", "gt"),
    # diagonal in mm: sqrt((0 * 2)^2 + (3 * 3)^2 + (9 * 0.5)^2) = sqrt(101.25)
    (BAR_PRED, np.zeros(SHAPE, int), (2.0, 3.0, 0.5), 0.0, math.sqrt(101.25), math.sqrt(101.25), "mm", "gt"),
]


@pytest.mark.parametrize("pred,gt,spacing,dice,hd95,asd,units,empty", CASES)
def test_case_metrics_values(pred, gt, spacing, dice, hd95, asd, units, empty):
    m = case_metrics(pred, gt, num_classes=2, spacing=spacing)
    assert list(m) == [1]
    assert m[1]["dice"] == pytest.approx(dice, abs=1e-6)
    assert m[1]["hd95"] == pytest.approx(hd95, abs=1e-5)
    assert m[1]["asd"] == pytest.approx(asd, abs=1e-5)
    assert m[1]["units"] == units and m[1]["empty"] == empty
    assert all(math.isfinite(m[1][k]) for k in ("dice", "hd95", "asd"))


def test_anisotropic_spacing_along_z():
    # voxels at z = 0 and z = 2: 2 voxels apart; with 2.5 mm slices that is 5 mm
    gt = np.zeros((3, 3, 3), int)
    pred = np.zeros((3, 3, 3), int)
    gt[0, 1, 1] = 1
    pred[2, 1, 1] = 1
    assert case_metrics(pred, gt, 2)[1]["hd95"] == pytest.approx(2.0)
    m = case_metrics(pred, gt, 2, spacing=(2.5, 1.0, 1.0))[1]
    assert m["hd95"] == pytest.approx(5.0) and m["asd"] == pytest.approx(5.0)


def test_classes_are_scored_separately():
    # class 1: the shifted bars; class 2: absent from both -> perfect
    m = case_metrics(BAR_PRED, BAR_GT, num_classes=3)
    assert list(m) == [1, 2]
    assert m[1]["dice"] == pytest.approx(0.5)
    assert (m[2]["dice"], m[2]["hd95"], m[2]["asd"], m[2]["empty"]) == (1.0, 0.0, 0.0, "both")
    # class 2 present only in pred (row 3): one-empty convention, class 1 unchanged
    m = case_metrics(BAR_PRED + _vol((2, 0, 3, 0, 0)), BAR_GT, num_classes=3)
    assert m[1]["hd95"] == pytest.approx(1.85)
    assert m[2]["dice"] == 0.0 and m[2]["hd95"] == pytest.approx(DIAG) and m[2]["empty"] == "gt"


def test_2d_images_are_accepted():
    m = case_metrics(BAR_PRED[0], BAR_GT[0], 2, spacing=(1.0, 2.0))
    assert m[1]["hd95"] == pytest.approx(3.7) and m[1]["asd"] == pytest.approx(1.5)


def _rows():
    return [
        {"case": "a", "class": 1, "dice": 0.5, "hd95": 2.0, "asd": 1.0, "units": "mm", "empty": "none"},
        {"case": "b", "class": 1, "dice": 0.7, "hd95": 4.0, "asd": 3.0, "units": "mm", "empty": "none"},
        {"case": "a", "class": 2, "dice": 1.0, "hd95": 0.0, "asd": 0.0, "units": "mm", "empty": "both"},
        {"case": "b", "class": 2, "dice": 0.0, "hd95": 10.0, "asd": 10.0, "units": "mm", "empty": "pred"},
    ]


def test_summarize():
    s = summarize(_rows())
    assert s["units"] == "mm"
    c1, c2 = s["classes"][1], s["classes"][2]
    assert (c1["n"], c1["n_one_empty"], c2["n"], c2["n_one_empty"]) == (2, 0, 2, 1)
    # population std: class 1 dice (0.5, 0.7) -> 0.6 +/- 0.1; class 2 dice (1, 0) -> 0.5 +/- 0.5
    assert c1["dice"] == pytest.approx({"mean": 0.6, "std": 0.1})
    assert c2["dice"] == pytest.approx({"mean": 0.5, "std": 0.5})
    assert c1["hd95"] == pytest.approx({"mean": 3.0, "std": 1.0})
    assert c2["asd"] == pytest.approx({"mean": 5.0, "std": 5.0})
    # mean over classes of the class means
    assert s["mean"] == pytest.approx({"dice": 0.55, "hd95": 4.0, "asd": 3.5})


def test_case_rows_and_files_round_trip(tmp_path):
    rows = case_rows("p001_ED", case_metrics(BAR_PRED, BAR_GT, 3, spacing=(1.0, 1.0, 2.0)), "p001")
    assert [(r["case"], r["patient"], r["class"]) for r in rows] == [
        ("p001_ED", "p001", 1),
        ("p001_ED", "p001", 2),
    ]
    assert case_rows("p002", {1: {}})[0]["patient"] == "p002"  # no patient given: the case is one
    write_case_csv(tmp_path / "cases.csv", rows)
    with open(tmp_path / "cases.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["case", "patient", "class", "dice", "hd95", "asd", "units", "empty"]
    assert float(read[0]["hd95"]) == pytest.approx(3.7) and read[1]["empty"] == "both"
    summary = summarize(rows)
    write_summary_json(tmp_path / "summary.json", summary)
    loaded = json.loads((tmp_path / "summary.json").read_text())
    assert loaded["classes"]["1"]["dice"]["mean"] == pytest.approx(0.5)
    assert loaded["units"] == "mm"


BAD_OPTIONS = [
    (lambda: case_metrics(BAR_PRED, BAR_GT[:, :2], 2), "same shape"),
    (lambda: case_metrics(BAR_PRED[None], BAR_GT[None], 2), "volume"),
    (lambda: case_metrics(BAR_PRED, BAR_GT, 1), "num_classes"),
    (lambda: case_metrics(BAR_PRED * 3, BAR_GT, 2), "labels outside"),
    (lambda: case_metrics(BAR_PRED, BAR_GT, 2, spacing=(1.0, 1.0)), "spacing"),
    (lambda: case_metrics(BAR_PRED, BAR_GT, 2, spacing=(1.0, 0.0, 1.0)), "spacing"),
    (lambda: summarize([]), "no rows"),
    (lambda: summarize([*_rows(), {**_rows()[0], "units": "voxels"}]), "mix units"),
]


@pytest.mark.parametrize("call,match", BAD_OPTIONS)
def test_bad_options_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# A fresh process (as a deployed site's ClientApp is, for every message): the app, then a Dice-only
# evaluation of a model that predicts class 1 everywhere, on an 8 x 8 slice whose left half is class 1.
DICE_ONLY = """
import json, sys
import numpy as np, torch
import clients.client_app
from samatch.evaluate import evaluate_cases
from samatch.io.base import Case, CaseMeta

class Ones(torch.nn.Module):
    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3, *x.shape[2:])
        logits[:, 1] = 1.0
        return logits

label = np.zeros((1, 8, 8), dtype=np.uint8)
label[:, :, :4] = 1
case = Case(np.random.rand(1, 8, 8).astype(np.float32), label, CaseMeta("c", "p", "test"))
rows = evaluate_cases(Ones(), [case], 3, 8, "cpu", distances=False)
print(json.dumps({"monai": "monai" in sys.modules, "rows": rows}))
"""


def test_dice_only_evaluation_does_not_import_monai():
    # Execute
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", DICE_ONLY], capture_output=True, text=True, timeout=120, cwd=repo
    )

    # Assert: class 1: 2 * 32 / (64 + 32) = 2/3; class 2 absent in both: 1.0 (the convention); and
    # MONAI (3-4 s to import) was not loaded
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rows"] == [{"case": "c", "dice_1": pytest.approx(2 / 3), "dice_2": 1.0}]
    assert out["monai"] is False
