"""The SAM cascade at inference: Match prediction -> boxes -> SAM -> fused label."""

import json

import numpy as np
import pytest
import torch

from samatch.config import TrainConfig, apply_overrides
from samatch.methods.sam_guided import SamGuidance
from samatch.phantoms import PhantomReader


def test_cascade_refines_confident_classes_and_keeps_match_elsewhere():
    # Prepare: one lesion phantom slice; a "Match" prediction that is the true lesion grown by a
    # 4-pixel frame, so the cascade has a confident but too large region to refine.
    case = PhantomReader("lesion", site=0, size=64).cases("train")[0].load()
    label = torch.from_numpy(case.label).long()  # (1, 64, 64)
    grown = torch.nn.functional.max_pool2d(label[:, None].float(), 9, stride=1, padding=4)[:, 0].long()
    logits = torch.nn.functional.one_hot(grown, 2).permute(0, 3, 1, 2).float() * 8  # confident
    image = torch.from_numpy(case.image)[:, None]
    cfg = apply_overrides(TrainConfig(), {"sam.largest_component": True})
    guide = SamGuidance(cfg, num_classes=2).eval()
    # Execute
    refined = guide.cascade(image, logits, threshold=0.5)
    unsure = guide.cascade(image, logits * 0, threshold=0.5)  # uniform probabilities: no box
    # Assert: one-hot output; SAM changed the confident lesion; with no prompt Match's label stays.
    assert refined.shape == (1, 2, 64, 64) and torch.equal(refined.sum(1), torch.ones(1, 64, 64))
    assert not torch.equal(refined.argmax(1), grown)
    assert torch.equal(unsure.argmax(1), (logits * 0).argmax(1))
    print(
        "lesion pixels: truth",
        int(label.sum()),
        "match",
        int(grown.sum()),
        "cascade",
        int(refined.argmax(1).sum()),
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:sam.amp=bf16 on a CPU whose bf16:UserWarning")  # a CPU's speed
def test_predict_and_evaluate_with_sam_cascade_use_the_runs_adapters(tmp_path):
    # Prepare: a 2-iteration SAM-Match run on the lesion phantom (embeddings on the fly: no cache),
    # and one phantom slice as a PNG.
    from PIL import Image

    from samatch.cli import main
    from samatch.engine import load_run_cascade, load_run_guide, load_run_model
    from samatch.evaluate import predict_label

    run = tmp_path / "run"
    sets = [
        "data.size=32", "data.max_unlabeled=1", "data.max_val_cases=1", "model.base_channels=4",
        "schedule.batch_size=1", "sam.cache_embeddings=false", "sam.lora_rank=2", "device=cpu",
        "sam.amp=bf16",  # trained with a bf16 decoder; evaluated in fp32 (below)
    ]  # fmt: skip
    argv = [
        "train",
        "--method",
        "samatch",
        "--format",
        "phantom-lesion",
        "--labeled",
        "1",
        "--iterations",
        "2",
    ]
    assert main([*argv, "--out", str(run), "--quiet", *sum((["--set", s] for s in sets), [])]) == 0
    reader = PhantomReader("lesion", size=32)
    image = reader.cases("val")[0].load().image[3]  # (32, 32) float in [0, 1]
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "slice.png")

    # Execute
    code_p = main(["predict", "--run", str(run), str(tmp_path / "slice.png"), str(tmp_path / "p.png"),
                   "--sam-cascade", "--device", "cpu"])  # fmt: skip
    code_e = main(["evaluate", "--run", str(run), "--sam-cascade", "--device", "cpu"])

    # Assert: predict's file is the cascade's label of that image (the run's adapters, threshold
    # 0.5), and evaluate wrote its cascade summary beside the plain one's folder name.
    assert code_p == 0 and code_e == 0
    cfg, model, _ = load_run_model(run, "best", "cpu")
    cascade = load_run_cascade(run, cfg, "best", "cpu", 0.5)
    from samatch.io.busi import read_gray

    expected = predict_label(model, read_gray(tmp_path / "slice.png")[None], cfg.data.size, "cpu", cascade)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png")), expected[0])
    summary = json.loads((run / "eval_val_cascade" / "summary.json").read_text())
    assert set(summary["classes"]) == {"1"}
    # The run's sam.amp (bf16) is training's: its guide decodes in the evaluation's precision
    guide, adapted = load_run_guide(run, cfg, "best", "cpu")
    assert cfg.sam.amp == "bf16" and guide.cfg.amp == "step" and adapted
