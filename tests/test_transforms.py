"""samatch.transforms: weak / strong views, CutMix boxes, exact 90-degree turns, seeding."""

import numpy as np
import pytest
import torch

from samatch.transforms import (
    apply_affine,
    cutmix_box,
    gaussian_blur,
    intensity_jitter,
    random_affine,
    strong_view,
    weak_view,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def asymmetric_label(n: int = 8) -> torch.Tensor:
    """(1, n, n) long label with no rotational or mirror symmetry: an L of 1s, one 2, one 3."""
    lab = torch.zeros(1, n, n, dtype=torch.long)
    lab[0, 1:6, 1] = 1  # vertical bar of the L
    lab[0, 5, 2:4] = 1  # its foot, to the right
    lab[0, 0, 6] = 2  # top-right corner pixel
    lab[0, 6, 7] = 3  # right edge, near the bottom
    return lab


# 2x3 matrices mapping output to input normalised coordinates: (x_in, y_in) = theta @ (x, y, 1).
TURN_90 = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]  # x_in = -y, y_in = x
TURN_180 = [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]
TURN_270 = [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]
FLIP_X = [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


@pytest.mark.parametrize(
    "theta,expected",
    [
        # out[r, c] = in[c, n-1-r]: numpy's counter-clockwise rot90
        (TURN_90, lambda a: np.rot90(a, 1)),
        (TURN_180, lambda a: np.rot90(a, 2)),
        (TURN_270, lambda a: np.rot90(a, 3)),
        (FLIP_X, lambda a: a[:, ::-1]),
    ],
)
def test_right_angle_affine_maps_a_label_exactly(theta, expected):
    # Prepare
    label = asymmetric_label()
    image = label[:, None].float() / 3  # the same picture as an image
    th = torch.tensor([theta])

    # Execute
    img, lab = apply_affine(image, label, th)

    # Assert: pixel centres land exactly on pixel centres, so nothing is interpolated or lost
    want = torch.from_numpy(np.ascontiguousarray(expected(label[0].numpy())))
    assert torch.equal(lab[0], want)
    assert lab.dtype == torch.long
    torch.testing.assert_close(img[0, 0], want.float() / 3, rtol=0, atol=1e-6)


def test_identity_affine_keeps_image_and_label():
    label = asymmetric_label()
    image = torch.rand(1, 1, 8, 8, generator=gen())
    img, lab = apply_affine(image, label, torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]))
    assert torch.equal(lab, label)
    torch.testing.assert_close(img, image, rtol=0, atol=1e-6)


def test_random_affine_is_a_rotation_or_a_reflection():
    theta = random_affine(256, gen(), "cpu")
    a = theta[:, :, :2]
    # Orthogonal 2x2 with |det| = 1, no translation; rotation angle within 20 degrees of a right angle
    torch.testing.assert_close(a @ a.transpose(1, 2), torch.eye(2).expand(256, 2, 2), rtol=0, atol=1e-6)
    assert torch.equal(theta[:, :, 2], torch.zeros(256, 2))
    det = torch.linalg.det(a)
    assert set(det.round().tolist()) == {-1.0, 1.0}  # both flipped and unflipped occur
    angle = torch.rad2deg(torch.atan2(-a[:, 0, 1], a[:, 1, 1]))  # sin is -theta01, cos is theta11
    off = (angle + 45) % 90 - 45  # distance to the nearest multiple of 90
    assert off.abs().max() <= 20.0 + 1e-4


def test_weak_view_keeps_shapes_and_label_values():
    # Prepare
    # Sparse values: a bilinear blend of 0, 2 and 7 would also give 1, 3, 4, 5 or 6
    values = torch.tensor([0, 2, 7])
    label = values[torch.randint(0, 3, (6, 32, 32), generator=gen(1))]
    image = torch.rand(6, 1, 32, 32, generator=gen(2))

    # Execute
    img, lab = weak_view(image, label, gen(3))

    # Assert: nearest-neighbour resampling, never a blended label
    assert img.shape == image.shape and lab.shape == label.shape
    assert lab.dtype == torch.long
    assert set(lab.unique().tolist()) == {0, 2, 7}  # zero padding outside the view adds only 0
    assert img.min() >= 0 and img.max() <= 1


def test_weak_view_without_label():
    img, lab = weak_view(torch.rand(2, 1, 16, 16), None, gen())
    assert lab is None and img.shape == (2, 1, 16, 16)


def test_cutmix_box_with_p0_is_empty():
    box = cutmix_box(64, (32, 32), gen(), "cpu", p=0.0)
    assert box.shape == (64, 32, 32) and box.dtype == torch.bool
    assert not box.any()


def test_cutmix_box_with_p1_covers_2_to_40_percent():
    # Prepare: boxes are continuous (area 2-40% of H*W) then rasterised; rasterising a box of
    # bh x bw adds or removes at most bh + bw + 1 <= H + W + 1 pixels
    h = w = 256
    slack = (h + w + 1) / (h * w)

    # Execute
    box = cutmix_box(2000, (h, w), gen(), "cpu", p=1.0)
    frac = box.float().mean(dim=(1, 2))

    # Assert
    assert frac.min() >= 0.02 - slack
    assert frac.max() <= 0.40 + slack
    assert 0.19 < frac.mean() < 0.23  # area drawn uniformly in [2%, 40%]: mean 21%


def test_cutmix_box_is_one_rectangle():
    box = cutmix_box(32, (64, 64), gen(5), "cpu", p=1.0)
    for b in box:
        rows, cols = b.any(1).nonzero()[:, 0], b.any(0).nonzero()[:, 0]
        # every pixel in the bounding rectangle is set, and the rows / columns are contiguous
        assert b[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert b.sum() == len(rows) * len(cols)


def test_strong_view_stays_in_unit_range_with_the_same_shape():
    # Prepare: extremes included (0 and 1 pixels, a constant image)
    image = torch.rand(16, 1, 32, 32, generator=gen())
    image[0] = 0.0
    image[1] = 1.0
    image[2, 0, :4] = 0.0
    image[2, 0, -4:] = 1.0

    # Execute
    out = strong_view(image, gen(7))

    # Assert
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out, image)


def test_gaussian_blur_p0_is_identity_and_p1_preserves_a_constant_interior():
    image = torch.rand(4, 1, 16, 16, generator=gen())
    assert torch.equal(gaussian_blur(image, gen(), p=0.0), image)
    flat = torch.full((3, 1, 16, 16), 0.5)
    blurred = gaussian_blur(flat, gen(), p=1.0)
    # normalised kernel: a constant stays constant away from the zero-padded border (3 pixels)
    torch.testing.assert_close(blurred[..., 3:-3, 3:-3], flat[..., 3:-3, 3:-3], rtol=0, atol=1e-6)


def test_intensity_jitter_strength_0_is_identity():
    image = torch.rand(4, 1, 8, 8, generator=gen()).clamp_min(1e-6)
    torch.testing.assert_close(intensity_jitter(image, gen(), strength=0.0), image, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [
        lambda g: weak_view(torch.linspace(0, 1, 2 * 32 * 32).view(2, 1, 32, 32), None, g)[0],
        lambda g: strong_view(torch.linspace(0, 1, 2 * 32 * 32).view(2, 1, 32, 32), g),
        lambda g: cutmix_box(4, (32, 32), g, "cpu", p=0.5),
        lambda g: random_affine(4, g, "cpu"),
    ],
    ids=["weak_view", "strong_view", "cutmix_box", "random_affine"],
)
def test_determinism_by_generator_seed(fn):
    same_a, same_b, other = fn(gen(11)), fn(gen(11)), fn(gen(12))
    assert torch.equal(same_a, same_b)
    assert not torch.equal(same_a, other)
