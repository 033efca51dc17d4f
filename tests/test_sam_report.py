"""`samatch sam-report` on a tiny phantom run."""

import json

from samatch.cli import main


def test_sam_report_scores_prompt_sources_per_class(tmp_path):
    # Prepare: a tiny supervised run on the cardiac phantom (class 2 = ring around class 3).
    run = tmp_path / "run"
    sets = ["data.size=64", "model.base_channels=4", "schedule.batch_size=2", "schedule.eval_every=1000"]
    args = ["train", "--method", "supervised", "--format", "phantom-cardiac", "--labeled", "2"]
    assert (
        main(
            [*args, "--out", str(run), "--iterations", "2", "--quiet", *sum((["--set", s] for s in sets), [])]
        )
        == 0
    )
    # Execute
    assert (
        main(["sam-report", "--run", str(run), "--max-slices", "3", "--enclosed", "2>3", "--device", "cpu"])
        == 0
    )
    # Assert: one stage (no adapters in a supervised run), five prompt sources, Dice in [0, 1].
    report = json.loads((run / "sam_report.json").read_text())
    assert set(report) == {"before", "meta"}
    before = report["before"]
    assert set(before) == {"gt_box", "gt_box_plain", "gt_box_points", "pred_box", "unet"}
    for source in ("gt_box", "gt_box_plain", "gt_box_points"):
        assert all(0.0 <= before[source][c] <= 1.0 for c in ("RV", "myocardium", "LV"))
    # Ground-truth boxes around the disk-like classes give near-perfect SAM masks (this checks the
    # box scaling and decoding end to end); the ring (myocardium) is what SAM gets wrong, with or
    # without the outer-minus-inner rule (measured 0.18 / 0.14 here; on ACDC see docs/results.md).
    print({k: round(before[k]["myocardium"], 3) for k in ("gt_box", "gt_box_plain", "gt_box_points")})
    assert before["gt_box"]["RV"] > 0.9 and before["gt_box"]["LV"] > 0.9
    assert before["gt_box"]["myocardium"] < 0.5
