"""TinyViT-5M image encoder in the variant LiteMedSAM uses: 256x256 RGB -> (B, 256, 64, 64).

Differences from ImageNet TinyViT (facts taken from the LiteMedSAM checkpoint and its description):
- the patch embedding is two 1x1 conv+BN layers at stride 1, so stage 0 runs at full 256x256;
- stages downsample 256 -> 128 -> 64, and the merge into the last stage (320 channels) keeps 64x64;
- a SAM "neck" (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) maps 320 -> 256 channels.
Module names follow the checkpoint's `image_encoder.*` keys so it loads with strict=True.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samatch.models.sam_import import sam_modeling


class Conv2dBN(nn.Sequential):
    """Bias-free conv followed by BatchNorm; children named `c` and `bn` as in the checkpoint."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every :class:`Conv2dBN`'s BatchNorm (running statistics) into its conv, in place.

    For a frozen encoder only: the outputs are those of the module in eval mode (to float rounding),
    one op per layer cheaper (about 10% of LiteMedSAM's encoder time on a CPU), and no BatchNorm is
    left to switch to batch statistics when the method is put in training mode. Returns the count.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    count = 0
    for m in module.modules():
        if isinstance(m, Conv2dBN) and isinstance(m.bn, nn.BatchNorm2d):
            fused = fuse_conv_bn_eval(m.c.eval(), m.bn.eval())
            fused.requires_grad_(False)
            m.c, m.bn = fused, nn.Identity()
            count += 1
    return count


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, C, H, W): per-pixel 3 -> C/2 -> C, no downsampling."""

    def __init__(self, c_in: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(c_in, dim // 2), nn.GELU(), Conv2dBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU. (B, C, H, W) kept."""

    def __init__(self, dim: int, expand: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """(B, C, H, W) -> (B, C', H/s, W/s): 1x1, depthwise 3x3 with stride s, 1x1."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention over (N, ws*ws, C) windows with a learned bias per |dy|, |dx| offset.

    qkv's output is laid out per head as [q, k, v] (each C/heads wide); LayerNorm sits inside the
    attention, before qkv, as in TinyViT.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # Offsets (|dy|, |dx|) are numbered |dy| * window + |dx|: the order TinyViT assigns them in.
        yy, xx = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        yy, xx = yy.flatten(), xx.flatten()
        idx = (yy[:, None] - yy[None, :]).abs() * window + (xx[:, None] - xx[None, :]).abs()
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("bias_idx", idx, persistent=False)  # (ws*ws, ws*ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape  # (N windows, ws*ws tokens, C)
        qkv = self.qkv(self.norm(x)).view(n, t, self.num_heads, 3, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4)  # each (N, heads, T, C/heads)
        bias = self.attention_biases[:, self.bias_idx]  # (heads, T, T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    """Pre-norm MLP on channels-last tokens: LayerNorm, fc1, GELU, fc2."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise 3x3 conv, MLP. (B, H, W, C) channels-last in and out."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = Conv2dBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window
        pad_h, pad_w = (-h) % ws, (-w) % ws
        # Zero padding (bottom/right) takes part in attention as keys, as in TinyViT; the checkpoint
        # was trained that way.
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // ws, (w + pad_w) // ws
        win = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        win = self.attn(win)  # (B*nh*nw, ws*ws, C)
        x = win.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        return x[:, :h, :w]


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks, then merging (out_dim, stride). (B, C, H, W) -> (B, C', H', W')."""

    def __init__(self, dim: int, depth: int, merge: tuple[int, int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim) for _ in range(depth))
        self.downsample = PatchMerging(dim, *merge)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class AttentionStage(nn.Module):
    """Stages 1-3: TinyViT blocks, then merging (out_dim, stride) if any. (B, C, H, W) -> (B, C', H', W')."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        merge: tuple[int, int] | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, *merge) if merge is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # channels-last: attention and MLP act on the last axis
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """LiteMedSAM image encoder. (B, 3, 256, 256) -> (B, 256, 64, 64).

    BatchNorm layers always run in eval mode (see `train`): the encoder is used frozen or LoRA-tuned,
    and batch statistics from small federated batches would drift from the checkpoint's.
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        merge_strides: Sequence[int] = (2, 2, 1),
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(3, embed_dims[0])
        # (out_dim, stride) of the merge after each stage, none after the last. The merge into the
        # last stage keeps the resolution, so the output is 256 / 2 / 2 = 64 pixels wide.
        merges: list[tuple[int, int] | None] = [*zip(embed_dims[1:], merge_strides, strict=True), None]
        stages: list[nn.Module] = [ConvStage(embed_dims[0], depths[0], (embed_dims[1], merge_strides[0]))]
        for i in range(1, len(depths)):
            stages.append(
                AttentionStage(embed_dims[i], depths[i], num_heads[i], window_sizes[i], mlp_ratio, merges[i])
            )
        self.layers = nn.ModuleList(stages)
        layer_norm_2d = sam_modeling().common.LayerNorm2d
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False),
            layer_norm_2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            layer_norm_2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, 64, 256, 256)
        for stage in self.layers:
            x = stage(x)  # ... -> (B, 320, 64, 64)
        return self.neck(x)  # (B, 256, 64, 64)

    def train(self, mode: bool = True) -> TinyViT:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self
