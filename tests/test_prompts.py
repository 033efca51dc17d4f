"""Hand-computed boxes and points for samatch.prompts (boxes are xyxy, inclusive pixel extents)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from samatch.prompts import (
    boxes_from_label,
    boxes_from_masks,
    boxes_from_probs,
    component_labels,
    jitter_boxes,
    largest_component,
    points_from_masks,
)


def _mask(shape, pixels):
    m = torch.zeros(shape, dtype=torch.bool)
    for y, x in pixels:
        m[y, x] = True
    return m


def _block(shape, y0, y1, x0, x1):
    """Inclusive rows y0..y1, cols x0..x1."""
    return _mask(shape, [(y, x) for y in range(y0, y1 + 1) for x in range(x0, x1 + 1)])


SHAPE = (6, 8)  # H, W
BOX_CASES = [
    # (mask, margin, expected box, expected valid)
    (_mask(SHAPE, []), 0, [0, 0, 0, 0], False),
    (_mask(SHAPE, [(0, 0)]), 0, [0, 0, 0, 0], True),
    (_mask(SHAPE, [(5, 7)]), 0, [7, 5, 7, 5], True),
    (_block(SHAPE, 1, 2, 3, 6), 0, [3, 1, 6, 2], True),
    (_block(SHAPE, 1, 2, 3, 6), 1, [2, 0, 7, 3], True),
    # margin clamped at every border: x0 0, y0 0, x1 W-1 = 7, y1 H-1 = 5
    (_block(SHAPE, 1, 4, 1, 6), 3, [0, 0, 7, 5], True),
    # two pieces: the box spans both
    (_mask(SHAPE, [(0, 1), (4, 6)]), 0, [1, 0, 6, 4], True),
    # empty stays zero even with a margin
    (_mask(SHAPE, []), 2, [0, 0, 0, 0], False),
]


@pytest.mark.parametrize("mask,margin,box,valid", BOX_CASES)
def test_boxes_from_masks(mask, margin, box, valid):
    boxes, ok = boxes_from_masks(mask[None, None], margin)
    assert boxes.shape == (1, 1, 4) and boxes.dtype == torch.float32
    assert boxes[0, 0].tolist() == box
    assert ok[0, 0].item() is valid


def test_boxes_from_masks_batched_matches_one_by_one():
    masks = torch.stack(
        [torch.stack([m for m, *_ in BOX_CASES[:4]]), torch.stack([m for m, *_ in BOX_CASES[4:]])]
    )
    boxes, valid = boxes_from_masks(masks, margin=1)  # (2, 4, 4), (2, 4)
    for b in range(2):
        for k in range(4):
            one_box, one_valid = boxes_from_masks(masks[b : b + 1, k : k + 1], margin=1)
            assert torch.equal(boxes[b, k], one_box[0, 0]) and valid[b, k] == one_valid[0, 0]


def test_boxes_from_label():
    label = torch.zeros(1, 4, 5, dtype=torch.long)
    label[0, 1, 1:3] = 1  # row 1, cols 1..2
    label[0, 3, 4] = 3  # class 3 at (3, 4); class 2 absent
    boxes, valid = boxes_from_label(label, num_classes=4)
    assert boxes[0].tolist() == [[1, 1, 2, 1], [0, 0, 0, 0], [4, 3, 4, 3]]
    assert valid[0].tolist() == [True, False, True]


def _probs(fg_prob):
    """(H, W) probability of class 1 -> (1, 2, H, W) softmax-like probabilities."""
    p1 = torch.as_tensor(fg_prob, dtype=torch.float32)
    return torch.stack([1 - p1, p1])[None]


def test_boxes_from_probs_threshold_excludes_low_confidence():
    p1 = torch.zeros(4, 6)
    p1[1, 1] = 0.99  # confident
    p1[2, 4] = 0.97  # confident
    p1[3, 5] = 0.9  # argmax is class 1 but below 0.95: excluded
    boxes, valid = boxes_from_probs(_probs(p1), threshold=0.95)
    assert boxes[0, 0].tolist() == [1, 1, 4, 2] and valid[0, 0]
    boxes, _ = boxes_from_probs(_probs(p1), threshold=0.5)
    assert boxes[0, 0].tolist() == [1, 1, 5, 3]
    # threshold is inclusive: 0.97 >= 0.97 counts, 0.99 too
    boxes, _ = boxes_from_probs(_probs(p1), threshold=0.97)
    assert boxes[0, 0].tolist() == [1, 1, 4, 2]


def test_boxes_from_probs_nothing_confident_is_invalid():
    boxes, valid = boxes_from_probs(_probs(torch.full((3, 3), 0.6)), threshold=0.95)
    assert not valid[0, 0] and boxes[0, 0].tolist() == [0, 0, 0, 0]


def test_boxes_from_probs_argmax_per_class():
    # 3 classes; pixel (0, 0) is class 2, (1, 2) is class 1, the rest background
    probs = torch.zeros(1, 3, 2, 3)
    probs[0, 0] = 1.0
    probs[0, :, 0, 0] = torch.tensor([0.0, 0.02, 0.98])
    probs[0, :, 1, 2] = torch.tensor([0.01, 0.96, 0.03])
    boxes, valid = boxes_from_probs(probs)
    assert boxes[0].tolist() == [[2, 1, 2, 1], [0, 0, 0, 0]]
    assert valid[0].tolist() == [True, True]


def _two_components():
    # a 2x3 block (6 px) at rows 0-1, cols 0-2 and a 1x2 bar (2 px) at row 4, cols 5-6
    return _block((6, 8), 0, 1, 0, 2) | _block((6, 8), 4, 4, 5, 6)


def test_largest_component_picks_bigger_one():
    probs = _probs(_two_components().float())
    boxes, _ = boxes_from_probs(probs, threshold=0.95)
    assert boxes[0, 0].tolist() == [0, 0, 6, 4]  # spans both without the option
    boxes, _ = boxes_from_probs(probs, threshold=0.95, largest_component=True)
    assert boxes[0, 0].tolist() == [0, 0, 2, 1]
    # the bar grows to 8 px (row 4, cols 0..7, touching nothing): now it wins
    bigger = _two_components() | _block((6, 8), 4, 4, 0, 7)
    boxes, _ = boxes_from_probs(_probs(bigger.float()), largest_component=True)
    assert boxes[0, 0].tolist() == [0, 4, 7, 4]


CONNECTIVITY_CASES = [
    # diagonal chain of 3 px vs a 2 px bar: one component with 8-connectivity, three with 4
    (8, [(0, 0), (1, 1), (2, 2)]),
    (4, [(4, 5), (4, 6)]),
]


@pytest.mark.parametrize("connectivity,kept", CONNECTIVITY_CASES)
def test_largest_component_connectivity(connectivity, kept):
    mask = _mask((6, 8), [(0, 0), (1, 1), (2, 2), (4, 5), (4, 6)])
    out = largest_component(mask[None, None], connectivity=connectivity)
    assert torch.equal(out[0, 0], _mask((6, 8), kept))


def test_largest_component_empty_stays_empty():
    out = largest_component(torch.zeros(2, 3, 5, 5, dtype=torch.bool))
    assert not out.any()


@pytest.mark.parametrize("connectivity", [8, 4])
def test_largest_component_matches_scipy_on_random_masks(connectivity):
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 2, 24, 20, generator=g) > 0.55  # many components of random sizes
    out = largest_component(masks, connectivity=connectivity)
    structure = np.ones((3, 3)) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    for b in range(3):
        for k in range(2):
            lab, _ = ndimage.label(masks[b, k].numpy(), structure=structure)
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            assert out[b, k].sum().item() == sizes.max()
            # the kept pixels form exactly one scipy component
            assert len(np.unique(lab[out[b, k].numpy()])) == 1


def test_largest_component_few_iterations_stay_inside_mask():
    # A 1x12 bar: with no iteration each pixel is its own component and one pixel
    # (a subset of the bar) is kept, never anything outside.
    mask = _block((3, 12), 1, 1, 0, 11)[None, None]
    assert largest_component(mask, max_iters=0).sum().item() == 1
    assert torch.equal(largest_component(mask), mask)


def test_jitter_boxes_bounds_and_reproducibility():
    boxes = torch.tensor([[[2.0, 3.0, 10.0, 12.0], [0.0, 0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, False]])
    out1 = jitter_boxes(boxes, valid, (16, 16), max_shift=3, generator=torch.Generator().manual_seed(1))
    out2 = jitter_boxes(boxes, valid, (16, 16), max_shift=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out1, out2)
    assert (out1[0, 0] - boxes[0, 0]).abs().max() <= 3
    assert out1[0, 1].tolist() == [0, 0, 0, 0]  # invalid stays zero
    assert torch.equal(jitter_boxes(boxes, valid, (16, 16), max_shift=0), boxes)


def test_jitter_boxes_expand_only_and_clamp():
    boxes = torch.tensor([[[1.0, 1.0, 14.0, 14.0]]])
    valid = torch.tensor([[True]])
    for seed in range(20):
        out = jitter_boxes(
            boxes,
            valid,
            (16, 16),
            max_shift=5,
            expand_only=True,
            generator=torch.Generator().manual_seed(seed),
        )[0, 0]
        assert out[0] <= 1 and out[1] <= 1 and out[2] >= 14 and out[3] >= 14
        assert out.min() >= 0 and out.max() <= 15


def test_jitter_boxes_keeps_corners_ordered():
    # a 1-pixel box shifted by up to 4 in both directions must still have x0 <= x1, y0 <= y1
    boxes = torch.full((1, 50, 4), 8.0)
    out = jitter_boxes(
        boxes, torch.ones(1, 50, dtype=torch.bool), (16, 16), 4, generator=torch.Generator().manual_seed(0)
    )
    assert (out[..., 0] <= out[..., 2]).all() and (out[..., 1] <= out[..., 3]).all()


def test_points_from_masks_block_and_ring():
    # block rows 1-2, cols 1-3: centroid (y 1.5, x 2); nearest pixels (1, 2) and (2, 2); row-major
    # tie-break picks (y 1, x 2). Ring: 3x3 square border around (y 4, x 6) in a 7x9 image.
    block = _block((7, 9), 1, 2, 1, 3)
    ring = _block((7, 9), 3, 5, 5, 7) & ~_mask((7, 9), [(4, 6)])
    masks = torch.stack([block, ring, torch.zeros(7, 9, dtype=torch.bool)])[None]  # (1, 3, 7, 9)
    coords, labels, valid = points_from_masks(masks, negative_in_hole=True)
    assert coords.shape == (1, 3, 2, 2) and labels.shape == (1, 3, 2)
    assert coords[0, 0].tolist() == [[2, 1], [0, 0]] and labels[0, 0].tolist() == [1, -1]
    # ring centroid (4, 6) is the hole: positive on the ring at distance 1 (first in row-major: (3, 6)),
    # negative at the centre
    assert coords[0, 1].tolist() == [[6, 3], [6, 4]] and labels[0, 1].tolist() == [1, 0]
    assert coords[0, 2].tolist() == [[0, 0], [0, 0]] and labels[0, 2].tolist() == [-1, -1]
    assert valid[0].tolist() == [True, True, False]
    coords, labels, _ = points_from_masks(masks)
    assert coords.shape == (1, 3, 1, 2) and labels[0, :, 0].tolist() == [1, 1, -1]


def test_prompts_never_synchronise_with_host():
    meta = {"device": "meta"}
    probs = torch.empty(2, 3, 8, 8, **meta)
    boxes, valid = boxes_from_probs(probs, largest_component=True, max_iters=3)
    assert boxes.shape == (2, 2, 4) and valid.shape == (2, 2)
    assert boxes_from_label(torch.empty(2, 8, 8, dtype=torch.long, **meta), 3)[0].shape == (2, 2, 4)
    assert jitter_boxes(boxes, valid, (8, 8)).shape == (2, 2, 4)
    assert points_from_masks(torch.empty(2, 2, 8, 8, dtype=torch.bool, **meta), True)[0].shape == (2, 2, 2, 2)


BAD_OPTIONS = [
    (lambda: boxes_from_masks(torch.zeros(4, 4, dtype=torch.bool)), "masks must be"),
    (lambda: boxes_from_masks(torch.zeros(1, 1, 4, 4, dtype=torch.bool), margin=-1), "margin"),
    (lambda: boxes_from_label(torch.zeros(1, 4, 4, dtype=torch.long), num_classes=1), "num_classes"),
    (lambda: boxes_from_probs(torch.zeros(1, 1, 4, 4)), "probs must be"),
    (lambda: largest_component(torch.zeros(1, 1, 4, 4, dtype=torch.bool), connectivity=6), "connectivity"),
    (lambda: largest_component(torch.zeros(1, 1, 4, 4, dtype=torch.bool), max_iters=-1), "max_iters"),
    (lambda: jitter_boxes(torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), (4, 4), -1), "max_shift"),
    (lambda: jitter_boxes(torch.zeros(1, 2, 4), torch.ones(1, 3, dtype=torch.bool), (4, 4)), "valid"),
]


@pytest.mark.parametrize("call,match", BAD_OPTIONS)
def test_bad_options_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_convex_component_converges_in_one_iteration_whatever_its_size():
    # A 200 x 180 block in a 256 x 256 mask: 3x3 propagation alone would need ~380 iterations. Row
    # runs give every pixel its row's maximum, column runs then the block's: the label of its last
    # pixel (row 219, column 199), flat index 219 * 256 + 199, plus 1.
    mask = _block((256, 256), 20, 219, 20, 199)[None, None]
    labels = component_labels(mask)
    first, after_one = next(labels), next(labels)
    assert first[0, 0, 20, 20] == 20 * 256 + 20 + 1
    expected = (219 * 256 + 199 + 1) * mask[0, 0].float()
    assert torch.equal(after_one[0, 0], expected)
    assert torch.equal(largest_component(mask, max_iters=1), mask)
