"""SamGuide: a promptable SAM (image encoder + prompt encoder + mask decoder) with a batched API.

Coordinates and masks live on one 256x256 grid whatever the backbone: boxes and points are given
in pixels of that grid, mask prompts and output logits are 256x256. For the 1024-pixel SAM ViTs
the prompts are scaled by 4 internally; their low-res logits are 256x256 anyway.

    sam = build_sam("litemedsam")
    emb = sam.encode(images)            # (B, 256, 64, 64), images (B, 1|3, H, W) in [0, 1]
    logits = sam.decode(emb, boxes)     # (B, K, 256, 256), boxes (B, K, 4) xyxy
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samatch.models.folded_decoder import foldable, folded_two_way, upscale_and_read
from samatch.models.sam_import import litemedsam_checkpoint_path, sam_modeling
from samatch.models.tiny_vit import TinyViT

MASK_GRID = 256  # side of the prompt / logit grid (4x the 64x64 embedding)
EMBED_GRID = 64
EMBED_DIM = 256

_IMAGENET_MEAN = (123.675, 116.28, 103.53)  # SAM's pixel statistics, 0-255 scale
_IMAGENET_STD = (58.395, 57.12, 57.375)


def minmax_normalise(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1], as LiteMedSAM was trained. (B, C, H, W) -> same."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def imagenet_normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> SAM's mean/std standardisation on the 0-255 scale. (B, 3, H, W) -> same.

    Channel by channel with Python constants: a tensor of them would be copied from the host in every
    step, which a CUDA graph cannot record."""
    stats = enumerate(zip(_IMAGENET_MEAN, _IMAGENET_STD, strict=True))
    return torch.cat([(x[:, c : c + 1] * 255.0 - m) / s for c, (m, s) in stats], dim=1)


@dataclass(frozen=True)
class SamBackbone:
    """How to build one SAM variant: its encoder, input side, normalisation and default weights."""

    build_encoder: Callable[[], nn.Module]
    input_size: int
    normalise: Callable[[torch.Tensor], torch.Tensor]
    default_checkpoint: Callable[[], Path] | None = None
    checkpoint_hint: str = ""


def _sam_vit(embed_dim: int, depth: int, num_heads: int, global_attn: tuple[int, ...]) -> nn.Module:
    # Hyper-parameters of segment_anything's build_sam_vit_{b,l,h}.
    return sam_modeling().ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=1024,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_attn,
        window_size=14,
        out_chans=EMBED_DIM,
    )


SAM_BACKBONES: dict[str, SamBackbone] = {
    "litemedsam": SamBackbone(TinyViT, 256, minmax_normalise, litemedsam_checkpoint_path),
    "vit_b": SamBackbone(
        partial(_sam_vit, 768, 12, 12, (2, 5, 8, 11)),
        1024,
        imagenet_normalise,
        checkpoint_hint="sam_vit_b_01ec64.pth",
    ),
    "vit_l": SamBackbone(
        partial(_sam_vit, 1024, 24, 16, (5, 11, 17, 23)),
        1024,
        imagenet_normalise,
        checkpoint_hint="sam_vit_l_0b3195.pth",
    ),
    "vit_h": SamBackbone(
        partial(_sam_vit, 1280, 32, 16, (7, 15, 23, 31)),
        1024,
        imagenet_normalise,
        checkpoint_hint="sam_vit_h_4b8939.pth",
    ),
}


class SamGuide(nn.Module):
    """SAM with batched, vectorised encode / decode; single-mask output (multimask_output=False)."""

    def __init__(self, backbone: SamBackbone) -> None:
        super().__init__()
        m = sam_modeling()
        self.input_size = backbone.input_size
        # Decode through samatch.models.folded_decoder (same logits, less work); False: segment_anything's
        # transformer as written, the straightforward path kept for tests and the reference benchmark.
        self.folded = True
        self._compiled_fold = None  # compile_decoder()
        self._normalise = backbone.normalise
        self.image_encoder = backbone.build_encoder()
        self.prompt_encoder = m.PromptEncoder(
            embed_dim=EMBED_DIM,
            image_embedding_size=(EMBED_GRID, EMBED_GRID),
            input_image_size=(self.input_size, self.input_size),
            mask_in_chans=16,
        )
        self.mask_decoder = m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 1] -> (B, 3, S, S) normalised encoder input (S = 256 or 1024)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1|3, H, W), got {tuple(images.shape)}")
        x = images.float().expand(-1, 3, -1, -1)  # grey -> RGB by repetition, as LiteMedSAM does
        s = self.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        return self._normalise(x)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 1] -> image embeddings (B, 256, 64, 64)."""
        return self.image_encoder(self.preprocess(images))

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """K prompts per image, all decoded against that image's embedding, in one batched pass.

        embeddings: (B, 256, 64, 64).
        boxes: (B, K, 4) xyxy in pixels of the 256 grid.
        points: coords (B, K, P, 2) xy in pixels of the 256 grid, labels (B, K, P): 1 foreground,
            0 background, -1 padding.
        mask_inputs: (B, K, 1, 256, 256) low-res logits, e.g. a previous `decode` output.
        At least one prompt kind is required. Returns logits (B, K, 256, 256).
        """
        b = embeddings.shape[0]
        k = _num_prompts(b, boxes, points, mask_inputs)
        scale = self.input_size / MASK_GRID
        flat_boxes = boxes.reshape(b * k, 4).float() * scale if boxes is not None else None
        flat_points = None
        if points is not None:
            coords, labels = points
            flat_points = (coords.reshape(b * k, -1, 2).float() * scale, labels.reshape(b * k, -1))
        flat_masks = mask_inputs.reshape(b * k, 1, MASK_GRID, MASK_GRID) if mask_inputs is not None else None
        sparse, dense = self.prompt_encoder(points=flat_points, boxes=flat_boxes, masks=flat_masks)
        # sparse (B*K, T, 256), dense (B*K, 256, 64, 64)
        if self.folded and foldable(self.mask_decoder):
            fold = self._compiled_fold or self._predict_masks_folded
            logits = fold(embeddings, sparse, dense, shared=mask_inputs is None)
        else:
            logits = self._predict_masks(embeddings, sparse, dense)
        return logits.view(b, k, MASK_GRID, MASK_GRID)

    def forward(
        self,
        images: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 1|3, H, W) images and prompts as in `decode` -> logits (B, K, 256, 256)."""
        return self.decode(self.encode(images), boxes, points, mask_inputs)

    def compile_decoder(self, mode: str = "default") -> None:
        """Decode the folded path through ``torch.compile`` in ``mode`` (the same logits to float
        rounding)."""
        self._compiled_fold = torch.compile(self._predict_masks_folded, mode=mode)

    def _tokens(self, sparse: torch.Tensor) -> torch.Tensor:
        """(B*K, T, 256) sparse prompt embeddings -> (B*K, 5 + T, 256): SAM's IoU token and 4 mask
        tokens, then the prompts."""
        md = self.mask_decoder
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)  # (1 + 4, 256)
        return torch.cat([out_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)

    def _predict_masks_folded(
        self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, shared: bool
    ) -> torch.Tensor:
        """`_predict_masks` through :func:`folded_two_way`: the same logits (B*K, 256, 256), less work.

        shared: every prompt's dense embedding is the same (no mask inputs), so the K prompts of an
        image read one copy of its image tokens instead of K.
        """
        md = self.mask_decoder
        b, bk = embeddings.shape[0], sparse.shape[0]
        tokens = self._tokens(sparse)  # (B*K, 5 + T, 256)
        if shared:
            src = embeddings + dense[:1]  # (B, 256, 64, 64)
        else:
            src = (embeddings.unsqueeze(1) + dense.reshape(b, bk // b, *dense.shape[1:])).flatten(0, 1)
        # Row-major tokens: a sum with a transposed view keeps the view's layout, so every LayerNorm
        # of the image tokens after it (and its backward) would copy its input first.
        image = src.flatten(2).transpose(1, 2).contiguous()  # (B or B*K, 64*64, 256)
        pe = self.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2).contiguous()  # (1, 64*64, 256)
        mask_token, keys = folded_two_way(md.transformer, image, pe, tokens)  # (B*K, 256), (B*K, 4096, 256)
        return upscale_and_read(md, keys, mask_token, EMBED_GRID)

    def _predict_masks(
        self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """MaskDecoder.predict_masks for B images x K prompts -> (B*K, 256, 256) single-mask logits.

        segment_anything's version repeats the image embeddings once per prompt of the whole batch
        (B images x B*K prompts); here each image is paired with its own K prompts only.
        """
        md = self.mask_decoder
        b, bk = embeddings.shape[0], sparse.shape[0]
        tokens = self._tokens(sparse)  # (B*K, 5 + T, 256)
        dense = dense.reshape(b, bk // b, *dense.shape[1:])  # (B, K, 256, 64, 64)
        src = (embeddings.unsqueeze(1) + dense).flatten(0, 1)  # (B*K, 256, 64, 64)
        pos = self.prompt_encoder.get_dense_pe().expand(bk, -1, -1, -1)  # (B*K, 256, 64, 64)
        hs, src = md.transformer(src, pos, tokens)  # (B*K, 5 + T, 256), (B*K, 64*64, 256)
        src = src.transpose(1, 2).reshape(bk, EMBED_DIM, EMBED_GRID, EMBED_GRID)
        upscaled = md.output_upscaling(src)  # (B*K, 32, 256, 256)
        # Mask token 0 is SAM's single-mask output; the 3 multimask heads are not needed.
        hyper = md.output_hypernetworks_mlps[0](hs[:, 1])  # (B*K, 32)
        return torch.einsum("nc,nchw->nhw", hyper, upscaled)


def _num_prompts(
    b: int,
    boxes: torch.Tensor | None,
    points: tuple[torch.Tensor, torch.Tensor] | None,
    mask_inputs: torch.Tensor | None,
) -> int:
    """K, the number of prompts per image, checked to agree across the prompt kinds given."""
    given = {
        name: tuple(t.shape[:2])
        for name, t in (
            ("boxes", boxes),
            ("points", points[0] if points else None),
            ("mask_inputs", mask_inputs),
        )
        if t is not None
    }
    if not given:
        raise ValueError("decode needs at least one of boxes, points, mask_inputs")
    if len(set(given.values())) != 1 or next(iter(given.values()))[0] != b:
        raise ValueError(f"prompts must all be (B={b}, K, ...) with one K; got leading dims {given}")
    return next(iter(given.values()))[1]


def load_sam_weights(sam: SamGuide, checkpoint: str | Path) -> None:
    """Load a full SAM checkpoint (image_encoder.*, prompt_encoder.*, mask_decoder.*) strictly."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "model" in state and not isinstance(state["model"], torch.Tensor):  # training-checkpoint wrapper
        state = state["model"]
    sam.load_state_dict(state, strict=True)


def build_sam(
    name: str = "litemedsam", checkpoint: str | Path | None = None, pretrained: bool = True
) -> SamGuide:
    """Build a registered SAM backbone in eval mode.

    checkpoint: weights to load; LiteMedSAM defaults to the packaged `lite_medsam.pth`, the SAM
    ViTs have no default and need a path. pretrained=False skips loading (random init, for tests).
    """
    if name not in SAM_BACKBONES:
        raise KeyError(f"unknown SAM backbone {name!r}; choose from {sorted(SAM_BACKBONES)}")
    backbone = SAM_BACKBONES[name]
    path = None
    if pretrained:  # resolve the weights first: building a ViT-H takes seconds
        if checkpoint is not None:
            path = Path(checkpoint)
        elif backbone.default_checkpoint is not None:
            path = backbone.default_checkpoint()
        else:
            raise ValueError(
                f"SAM backbone {name!r} needs checkpoint=<path to {backbone.checkpoint_hint}> "
                "(download it from the segment-anything release page)"
            )
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    sam = SamGuide(backbone)
    if path is not None:
        load_sam_weights(sam, path)
    return sam.eval()
