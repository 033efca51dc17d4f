"""The SAM cascade at inference: Match prediction -> boxes -> SAM -> fused label."""

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
