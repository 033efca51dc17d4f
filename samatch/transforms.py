"""Weak and strong views for the Match methods, batched on the training device.

Array functions on tensors ``(B, 1, H, W)`` with intensities in [0, 1]; labels ``(B, H, W)`` long.
Weak view (labeled and unlabeled): random rotation in [-20, 20] degrees, random 90-degree turns and
flips, one affine resample per batch (UniMatch's ACDC recipe, done with ``grid_sample`` instead of a
per-image loop). Strong view (unlabeled): brightness / contrast / gamma jitter, Gaussian blur and a
CutMix box, the intensity part of UniMatch's colour jitter for grayscale images.

Random numbers are drawn on the generator's device: a CPU generator's draws reach a GPU through
:func:`samatch.transfer.to_device` (the same values on every device); a generator on the GPU keeps
the whole step on the device, which a CUDA graph needs (``schedule.cuda_graph``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from samatch.transfer import to_device


def random_affine(batch: int, generator: torch.Generator, device, max_deg: float = 20.0) -> torch.Tensor:
    """Per-sample 2x3 matrices: rotation in [-max_deg, max_deg] + k*90 degrees, optional flip."""
    g, at = generator, {"device": generator.device}
    angle = (torch.rand(batch, generator=g, **at) * 2 - 1) * math.radians(max_deg)
    angle = angle + torch.randint(0, 4, (batch,), generator=g, **at) * (math.pi / 2)
    flip = torch.where(torch.rand(batch, generator=g, **at) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(batch, 2, 3, **at)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    return to_device(theta, device)


def apply_affine(
    image: torch.Tensor, label: torch.Tensor | None, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample ``image`` (B,1,H,W) bilinearly and ``label`` (B,H,W) by nearest neighbour."""
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    img = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if label is None:
        return img, None
    lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", align_corners=False)
    return img, lab[:, 0].long()


def weak_view(image, label, generator: torch.Generator):
    """(B,1,H,W), (B,H,W)|None -> the same shapes, geometrically augmented."""
    return apply_affine(image, label, random_affine(image.shape[0], generator, image.device))


def intensity_jitter(image: torch.Tensor, generator: torch.Generator, strength: float = 0.5) -> torch.Tensor:
    """Random brightness, contrast and gamma per sample (each applied with probability 0.8)."""
    b = image.shape[0]
    g = generator

    def factor():
        on = (torch.rand(b, generator=g, device=g.device) < 0.8).float()
        f = 1 + (torch.rand(b, generator=g, device=g.device) * 2 - 1) * strength * on
        return to_device(f.view(b, 1, 1, 1), image.device)

    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    out = (image * factor()).clamp(0, 1)
    out = ((out - mean) * factor() + mean).clamp(0, 1)
    return out.clamp_min(1e-6) ** factor()


def gaussian_blur(image: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Blur each sample with probability p, sigma in [0.1, 2.0] (kernel 7), one grouped conv."""
    b = image.shape[0]
    g = generator
    sigma = to_device(0.1 + 1.9 * torch.rand(b, generator=g, device=g.device), image.device)
    on = to_device(torch.rand(b, generator=g, device=g.device) < p, image.device)
    x = torch.arange(-3, 4, device=image.device, dtype=image.dtype)
    k1 = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)  # (B, 7)
    k2 = (k1[:, :, None] * k1[:, None, :])[:, None]  # (B, 1, 7, 7)
    blurred = F.conv2d(image.transpose(0, 1), k2, padding=3, groups=b).transpose(0, 1)
    return torch.where(on.view(b, 1, 1, 1), blurred, image)


def cutmix_box(
    batch: int, size: tuple[int, int], generator: torch.Generator, device, p: float = 0.5
) -> torch.Tensor:
    """(B, H, W) bool masks: a random box covering 2-40% of the area with probability p, else empty."""
    h, w = size
    g, at = generator, {"device": generator.device}
    area = (0.02 + 0.38 * torch.rand(batch, generator=g, **at)) * h * w
    ratio = torch.exp(torch.empty(batch, **at).uniform_(math.log(0.3), math.log(1 / 0.3), generator=g))
    bh = (area * ratio).sqrt().clamp(max=h)
    bw = (area / ratio).sqrt().clamp(max=w)
    y0 = torch.rand(batch, generator=g, **at) * (h - bh)
    x0 = torch.rand(batch, generator=g, **at) * (w - bw)
    on = torch.rand(batch, generator=g, **at) < p
    ys = torch.arange(h, **at).view(1, h, 1)
    xs = torch.arange(w, **at).view(1, 1, w)
    box = (
        (ys >= y0.view(-1, 1, 1))
        & (ys < (y0 + bh).view(-1, 1, 1))
        & (xs >= x0.view(-1, 1, 1))
        & (xs < (x0 + bw).view(-1, 1, 1))
    )
    return to_device(box & on.view(-1, 1, 1), device)


def strong_view(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B,1,H,W) -> intensity-jittered and blurred (B,1,H,W); CutMix is applied by the method."""
    return gaussian_blur(intensity_jitter(image, generator), generator)
