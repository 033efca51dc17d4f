"""Hand-computed values for samatch.losses.

Logits are chosen so softmax / sigmoid give round numbers: logits (0, ln 3) -> softmax (0.25, 0.75);
sigmoid(ln 3) = 0.75; sigmoid(0) = 0.5.
"""

import math

import pytest
import torch

from samatch.losses import binary_ce_loss, binary_dice_loss, ce_loss, dice_loss

LN3 = math.log(3.0)


def _dense(pixels, target, weight=None):
    """pixels: list of per-pixel logit tuples on one row -> (1, C, 1, N) logits, (1, 1, N) target."""
    logits = torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 1, len(pixels))
    tgt = torch.tensor(target, dtype=torch.long).reshape(1, 1, -1)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float32).reshape(1, 1, -1)
    return logits, tgt, w


CE_CASES = [
    # (pixel logits, target, weight, expected)
    ([(0.0, 0.0), (0.0, 0.0)], [0, 1], None, math.log(2.0)),
    # -ln 0.75 = 0.287682, -ln 0.25 = 1.386294
    ([(0.0, LN3), (0.0, LN3)], [1, 0], None, (0.287682 + 1.386294) / 2),
    # UniMatch convention: masked pixels count as zeros in a mean over all pixels
    ([(0.0, LN3), (0.0, LN3)], [1, 0], [1.0, 0.0], 0.287682 / 2),
    ([(0.0, LN3), (0.0, LN3)], [1, 0], [0.0, 0.0], 0.0),
    # a confident wrong pixel: log-softmax of logits gives 200; log(softmax) would give inf
    ([(0.0, 200.0)], [0], None, 200.0),
]


@pytest.mark.parametrize("pixels,target,weight,expected", CE_CASES)
def test_ce_loss_values(pixels, target, weight, expected):
    logits, tgt, w = _dense(pixels, target, weight)
    assert ce_loss(logits, tgt, w).item() == pytest.approx(expected, abs=1e-5)


DICE_CASES = [
    # pixel A logits (0, ln3): p1 = 0.75, target 1; pixel B logits (0, 0): p1 = 0.5, target 0.
    # class 1: I = 0.75, sum p = 1.25, sum t = 1 -> dice 1.5 / 2.25 = 2/3
    ({}, 1.0 - 2.0 / 3.0),
    # class 0: p0 = (0.25, 0.5), t0 = (0, 1): I = 0.5, sums 0.75 + 1 -> 1/1.75 = 4/7; mean(4/7, 2/3)
    ({"include_background": True}, 1.0 - (4.0 / 7.0 + 2.0 / 3.0) / 2),
    # weight (1, 0) keeps pixel A only: class 1 I = 0.75, sum wp = 0.75, sum wt = 1 -> 1.5 / 1.75
    ({"weight": [1.0, 0.0]}, 1.0 - 1.5 / 1.75),
    # all weights zero: 0 / 0 becomes smooth / smooth = 1 -> loss 0
    ({"weight": [0.0, 0.0]}, 0.0),
]


@pytest.mark.parametrize("kwargs,expected", DICE_CASES)
def test_dice_loss_values(kwargs, expected):
    kwargs = dict(kwargs)
    logits, tgt, w = _dense([(0.0, LN3), (0.0, 0.0)], [1, 0], kwargs.pop("weight", None))
    assert dice_loss(logits, tgt, w, **kwargs).item() == pytest.approx(expected, abs=1e-5)


def test_dice_loss_is_batch_dice():
    # Image 1: class 1 predicted perfectly (p1 ~ 1 on its one pixel). Image 2: no class 1 in the
    # target, p1 = 0.5 on one pixel. Sums over the batch: I = 1, sum p = 1.5, sum t = 1 -> dice 0.8,
    # loss 0.2. A mean of per-image Dice would give (0 + 1) / 2 = 0.5 (image 2 scores ~0).
    img1 = torch.tensor([[-20.0, 20.0], [20.0, -20.0]]).reshape(1, 2, 1, 2)  # channels (c0, c1)
    img2 = torch.tensor([[0.0, 20.0], [0.0, -20.0]]).reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]], [[0, 0]]])
    assert dice_loss(torch.cat([img1, img2]), target).item() == pytest.approx(0.2, abs=1e-5)


def test_dice_loss_gradient_flows():
    logits, tgt, _ = _dense([(0.0, LN3), (0.0, 0.0)], [1, 0])
    logits.requires_grad_(True)
    dice_loss(logits, tgt).backward()
    # raising p1 at the foreground pixel lowers the loss
    assert logits.grad[0, 1, 0, 0] < 0


def _binary():
    # prompt 0: logits (0, 0) -> p (0.5, 0.5), target (1, 0): dice 2*0.5/(1+1) = 0.5, BCE ln 2
    # prompt 1: logits (ln3, ln3) -> p 0.75, target (1, 1): dice 3/3.5 = 6/7, BCE -ln 0.75
    logits = torch.tensor([[[[0.0, 0.0]], [[LN3, LN3]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])
    return logits, target


BINARY_DICE_CASES = [
    ([True, True], (0.5 + 1.0 / 7.0) / 2),
    ([True, False], 0.5),
    ([False, True], 1.0 / 7.0),
    ([False, False], 0.0),
]


@pytest.mark.parametrize("valid,expected", BINARY_DICE_CASES)
def test_binary_dice_loss_values(valid, expected):
    logits, target = _binary()
    loss = binary_dice_loss(logits, target, torch.tensor([valid]))
    assert loss.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    "valid,expected",
    [([True, True], (math.log(2.0) + 0.287682) / 2), ([False, True], 0.287682), ([False, False], 0.0)],
)
def test_binary_ce_loss_values(valid, expected):
    logits, target = _binary()
    assert binary_ce_loss(logits, target, torch.tensor([valid])).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("fn", [binary_dice_loss, binary_ce_loss])
def test_binary_losses_without_valid_prompt_are_zero_with_grad(fn):
    logits, target = _binary()
    logits.requires_grad_(True)
    loss = fn(logits, target, torch.zeros(1, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_losses_never_synchronise_with_host():
    # Meta tensors have no data: any .item(), bool(tensor) or nonzero() raises.
    meta = {"device": "meta"}
    logits = torch.empty(2, 3, 8, 8, **meta)
    target = torch.empty(2, 8, 8, dtype=torch.long, **meta)
    weight = torch.empty(2, 8, 8, **meta)
    valid = torch.empty(2, 3, dtype=torch.bool, **meta)
    assert ce_loss(logits, target, weight).shape == ()
    assert dice_loss(logits, target, weight).shape == ()
    assert binary_dice_loss(logits, torch.empty(2, 3, 8, 8, **meta), valid).shape == ()
    assert binary_ce_loss(logits, torch.empty(2, 3, 8, 8, **meta), valid).shape == ()


BAD_OPTIONS = [
    (dice_loss, {"smooth": -1.0}, "smooth"),
    (dice_loss, {"include_background": False, "one_class": True}, "no class left"),
    (ce_loss, {"target_shape": (1, 1, 3)}, "target must be"),
    (ce_loss, {"target_float": True}, "long"),
    (dice_loss, {"weight_shape": (1, 2, 2)}, "weight_mask"),
]


@pytest.mark.parametrize("fn,opts,match", BAD_OPTIONS)
def test_bad_options_raise(fn, opts, match):
    opts = dict(opts)
    c = 1 if opts.pop("one_class", False) else 2
    logits = torch.zeros(1, c, 1, 2)
    target = torch.zeros(opts.pop("target_shape", (1, 1, 2)), dtype=torch.long)
    if opts.pop("target_float", False):
        target = target.float()
    weight_shape = opts.pop("weight_shape", None)
    weight = None if weight_shape is None else torch.ones(weight_shape)
    with pytest.raises(ValueError, match=match):
        fn(logits, target, weight, **opts)


def test_binary_bad_valid_raises():
    logits, target = _binary()
    with pytest.raises(ValueError, match="valid"):
        binary_dice_loss(logits, target, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid"):
        binary_dice_loss(logits, target, torch.ones(1, 2))  # not bool
