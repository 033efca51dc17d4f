"""Hand-computed pseudo-labels for samatch.fusion.fuse on 1 x 3 x 1 x 2 tensors."""

import math

import pytest
import torch

from samatch.fusion import fuse

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75


def _match(*pixels):
    """Per-pixel class probabilities -> (1, C, 1, N)."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 1, len(pixels))


def _sam(*channels):
    """Per-class rows of pixel logits -> (1, C-1, 1, N)."""
    return torch.tensor(channels, dtype=torch.float32).reshape(1, len(channels), 1, len(channels[0]))


MATCH = _match((0.2, 0.5, 0.3), (0.6, 0.1, 0.3))

CASES = [
    # (sam logits, valid, expected pseudo, expected conf)
    # Class 1 from SAM: p1 = (0.5, 0.75); class 2 invalid -> Match's (0.3, 0.3).
    # pixel 0: bg = 0.5 * 0.7 = 0.35, sum 1.15 -> (0.3043, 0.4348, 0.2609): class 1, conf 0.5 / 1.15
    # pixel 1: bg = 0.25 * 0.7 = 0.175, sum 1.225 -> class 1, conf 0.75 / 1.225
    (_sam((0.0, LN3), (9.0, 9.0)), [True, False], [1, 1], [0.5 / 1.15, 0.75 / 1.225]),
    # Both from SAM: class 1 p = (0.5, 0.5), class 2 p = (0.75, 0.25).
    # pixel 0: bg 0.5 * 0.25 = 0.125, sum 1.375 -> class 2, conf 0.75 / 1.375
    # pixel 1: bg 0.5 * 0.75 = 0.375, sum 1.125 -> class 1, conf 0.5 / 1.125
    (_sam((0.0, 0.0), (LN3, -LN3)), [True, True], [2, 1], [0.75 / 1.375, 0.5 / 1.125]),
    # Logit -2 means p = 0.1192, not "-2": SAM says class 1 is absent at both pixels.
    # pixel 0: p = (0.1192, 0.3), bg = 0.8808 * 0.7 = 0.6165, sum 1.0357 -> background, conf 0.5953
    (_sam((-2.0, -2.0), (0.0, 0.0)), [True, False], [0, 0], [0.61656 / 1.03576, 0.61656 / 1.03576]),
    # no valid prompt at all: Match's own argmax and max, unchanged
    (_sam((9.0, 9.0), (9.0, 9.0)), [False, False], [1, 0], [0.5, 0.6]),
]


@pytest.mark.parametrize("sam,valid,pseudo,conf", CASES)
def test_fuse_values(sam, valid, pseudo, conf):
    out_pseudo, out_conf = fuse(MATCH, sam, torch.tensor([valid]))
    assert out_pseudo.shape == (1, 1, 2) and out_pseudo.dtype == torch.long
    assert out_pseudo[0, 0].tolist() == pseudo
    assert out_conf[0, 0].tolist() == pytest.approx(conf, abs=1e-4)


def test_fuse_uses_sigmoid_not_raw_logits():
    # Read raw, logits (0, 3) would give bg = (1 - 0) * (1 - 3) = -2 and conf 3 / 1 = 3.
    # Through the sigmoid: p1 = 0.5, p2 = 0.952574, bg = 0.023713 -> conf = 0.952574 / 1.476287.
    match = _match((0.9, 0.05, 0.05))
    sam = _sam((0.0,), (3.0,))
    pseudo, conf = fuse(match, sam, torch.tensor([[True, True]]))
    assert pseudo.item() == 2
    assert conf.item() == pytest.approx(0.645250, abs=1e-5)


def test_fuse_is_per_image():
    # image 0 has a valid prompt, image 1 has none: only image 1 falls back entirely to Match
    match = torch.cat([MATCH, MATCH])
    sam = torch.cat([_sam((0.0, LN3), (9.0, 9.0)), _sam((0.0, LN3), (9.0, 9.0))])
    valid = torch.tensor([[True, False], [False, False]])
    pseudo, conf = fuse(match, sam, valid)
    assert pseudo.tolist() == [[[1, 1]], [[1, 0]]]
    assert conf[1, 0].tolist() == pytest.approx([0.5, 0.6])


def test_fuse_outputs_no_grad():
    sam = _sam((0.0, LN3), (9.0, 9.0)).requires_grad_(True)
    _, conf = fuse(MATCH, sam, torch.tensor([[True, True]]))
    assert not conf.requires_grad


def test_fuse_never_synchronises_with_host():
    meta = {"device": "meta"}
    pseudo, conf = fuse(
        torch.empty(2, 4, 8, 8, **meta),
        torch.empty(2, 3, 8, 8, **meta),
        torch.empty(2, 3, dtype=torch.bool, **meta),
    )
    assert pseudo.shape == (2, 8, 8) and conf.shape == (2, 8, 8)


BAD_OPTIONS = [
    (torch.zeros(1, 1, 1, 2), torch.zeros(1, 0, 1, 2), torch.zeros(1, 0, dtype=torch.bool), "match_probs"),
    (MATCH, torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, dtype=torch.bool), "sam_logits"),
    (MATCH, torch.zeros(1, 2, 1, 2), torch.zeros(1, 3, dtype=torch.bool), "valid"),
    (MATCH, torch.zeros(1, 2, 1, 2), torch.zeros(1, 2), "valid"),  # not bool
]


@pytest.mark.parametrize("match,sam,valid,msg", BAD_OPTIONS)
def test_bad_options_raise(match, sam, valid, msg):
    with pytest.raises(ValueError, match=msg):
        fuse(match, sam, valid)
