"""The Match network: the 2D U-Net of the SSL4MIS / UniMatch medical benchmarks.

Five encoder levels of widths ``base * (1, 2, 4, 8, 16)`` (16-32-64-128-256, about 1.8 M parameters),
each two 3x3 conv + BatchNorm + LeakyReLU with dropout between them; a decoder of 1x1-reduce,
bilinear upsampling and concatenation. ``forward(x, feature_perturb=True)`` is UniMatch's
feature-perturbation pass: the encoder runs once, Dropout2d(p) perturbs every skip feature, and the
clean and perturbed features go through the decoder together in one batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UpBlock(nn.Module):
    """Reduce the deeper feature with a 1x1 conv, upsample x2, concatenate the skip, convolve."""

    def __init__(self, c_deep: int, c_skip: int, c_out: int):
        super().__init__()
        self.reduce = nn.Conv2d(c_deep, c_skip, 1)
        self.conv = ConvBlock(2 * c_skip, c_out, 0.0)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce(deep), scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, up], dim=1))


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        base_channels: int = 16,
        dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5),
        feature_dropout: float = 0.5,
    ):
        super().__init__()
        ch = [base_channels * m for m in (1, 2, 4, 8, 16)]
        self.inc = ConvBlock(in_channels, ch[0], dropout[0])
        self.down = nn.ModuleList(ConvBlock(ch[i], ch[i + 1], dropout[i + 1]) for i in range(4))
        self.up = nn.ModuleList(UpBlock(ch[i + 1], ch[i], ch[i]) for i in reversed(range(4)))
        self.head = nn.Conv2d(ch[0], num_classes, 3, padding=1)
        self.feature_dropout = nn.Dropout2d(feature_dropout)
        self.num_classes = num_classes

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, Cin, H, W) -> five features, (B, ch[i], H / 2^i, W / 2^i)."""
        feats = [self.inc(x)]
        for block in self.down:
            feats.append(block(F.max_pool2d(feats[-1], 2)))
        return feats

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.up, reversed(feats[:-1]), strict=True):
            x = block(x, skip)
        return self.head(x)

    def forward(self, x: torch.Tensor, feature_perturb: bool = False):
        """(B, Cin, H, W) -> logits (B, C, H, W); with ``feature_perturb`` also the perturbed logits.

        H and W must be multiples of 16.
        """
        feats = self.encode(x)
        if not feature_perturb:
            return self.decode(feats)
        both = [torch.cat([f, self.feature_dropout(f)]) for f in feats]  # (2B, ...)
        clean, perturbed = self.decode(both).chunk(2)
        return clean, perturbed


def build_unet(cfg) -> UNet:
    """From a :class:`samatch.config.TrainConfig` (model + method sections)."""
    return UNet(
        cfg.model.in_channels,
        cfg.model.num_classes,
        cfg.model.base_channels,
        tuple(cfg.model.dropout),
        cfg.method.feature_dropout,
    )


def batchnorm_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of every BatchNorm parameter and buffer inside ``module`` (what FedBN keeps
    on the sites)."""
    keys = set()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            keys.update(f"{name}.{key}" for key in sub.state_dict())
    return keys
