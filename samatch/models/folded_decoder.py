"""SAM's two-way transformer with its projections folded onto the prompt tokens: same function, less work.

Every attention in SAM's mask decoder pairs a few prompt tokens (T = 7 for a box: IoU token, 4 mask
tokens, 2 corners) with the N = 64 x 64 = 4096 image tokens. segment_anything projects both sides
(256 -> 128 channels, 8 heads of c = 16) before attending, so each prompt pays four N x 256 x 128
projections per layer, and it repeats the image embedding once per prompt. Attention is bilinear,
so every projection on the image side can move to the token side instead:

* tokens attend to the image (scores over n, then a weighted sum of image values):
  ``q_h . (W_k,h y_n + b_k,h) = (W_k,h^T q_h) . y_n + const_h``, and the constant cancels in the
  softmax over n; ``sum_n a_n (W_v,h y_n + b_v,h) = W_v,h (sum_n a_n y_n) + b_v,h`` (the weights sum
  to 1). Cost per head and token: two N x 256 dot products instead of projecting all N tokens.
* the image attends to the tokens (scores over t): ``(W_q,h x_n + b_q,h) . k_ht = x_n .
  (W_q,h^T k_ht) + b_q,h . k_ht`` (this constant depends on t, so it is kept), and the output
  projection is affine, so ``out_proj(concat_h sum_t a_hnt v_ht) = sum_{h,t} a_hnt U_ht + b_o`` with
  ``U_ht = W_o,h v_ht``: one (N x 8T) @ (8T x 256) product instead of an N x 128 x 256 projection.
* the last attention feeds only mask token 0 (single-mask output; the IoU and multimask heads are
  not used), so it is computed for that one query.

With 8 heads this costs 8 T x N x 256 multiply-adds per attention and prompt instead of 2 x N x 256
x 128, i.e. less while T < 16 (boxes, a few points). The projections' weights are read by probing
each projection module with the identity (:func:`affine_parts`), so peft's LoRA layers work
unchanged and their gradients flow through the probe. The result equals
``SamGuide``'s straightforward path up to float rounding (tests/test_folded_decoder.py).

Shapes: D = 256 channels, N image tokens, B images with K prompts each (BK = B * K), T tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def affine_parts(module: nn.Module, d_in: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An affine module (nn.Linear, a peft LoRA Linear without active dropout) -> (W (out, in), b (out,)).

    Found by applying the module to the zero vector and the identity, in fp32 with autocast off
    (differences of bf16 outputs would lose the weights), so module(x) == x @ W.T + b and the
    gradients of trainable tensors inside the module (LoRA A and B) flow through W and b.
    """
    # Made on the device: a copy from host memory would make the host wait for a GPU inside the step.
    opts = {"device": like.device, "dtype": torch.float32}
    probe = torch.cat([torch.zeros(1, d_in, **opts), torch.eye(d_in, **opts)])  # the zero row, then I
    with torch.autocast(like.device.type, enabled=False):
        out = module(probe)
    bias = out[0]
    return (out[1:] - bias).t(), bias


def tokens_to_image(
    attn: nn.Module, q: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor
) -> torch.Tensor:
    """segment_anything ``Attention(q, k_img, v_img)`` for few queries against many image tokens.

    q (BK, T, D) prompt tokens; k_img, v_img (G, N, D) image tokens, G = B (one image shared by its K
    prompts) or BK. Returns (BK, T, D).
    """
    h, d_in = attn.num_heads, attn.internal_dim
    c, d = d_in // h, q.shape[-1]
    g = k_img.shape[0]
    bk, t = q.shape[:2]
    wk, _ = affine_parts(attn.k_proj, d, q)  # its bias adds a constant per query: cancels in the softmax
    wv, bv = affine_parts(attn.v_proj, d, q)
    qh = attn.q_proj(q).reshape(g, bk // g * t, h, c) / math.sqrt(c)  # the K prompts of an image side by side
    qk = torch.einsum("gthc,hcd->gthd", qh, wk.view(h, c, d)).reshape(g, -1, d)  # (G, KT*H, D)
    a = (qk @ k_img.transpose(1, 2)).softmax(-1)  # (G, KT*H, N)
    mixed = (a @ v_img).view(g, -1, h, d)  # (G, KT, H, D): attention-weighted image tokens per head
    out = torch.einsum("gthd,hcd->gthc", mixed, wv.view(h, c, d)) + bv.view(h, c)
    return attn.out_proj(out.reshape(bk, t, d_in))


def image_to_tokens(attn: nn.Module, q_img: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything ``Attention(q_img, k, v)``: every image token attends to its prompt's tokens.

    q_img (G, N, D) image tokens, G = B (shared by the K prompts of each image) or BK; k, v (BK, T, D)
    prompt tokens. Returns (BK, N, D).
    """
    h, d_in = attn.num_heads, attn.internal_dim
    c, d = d_in // h, q_img.shape[-1]
    g, n = q_img.shape[:2]
    bk, t = k.shape[:2]
    kk = bk // g
    wq, bq = affine_parts(attn.q_proj, d, k)
    wo, bo = affine_parts(attn.out_proj, d_in, k)
    kh = attn.k_proj(k).reshape(g, kk, t, h, c) / math.sqrt(c)
    vh = attn.v_proj(v).reshape(g, kk, t, h, c)
    kq = torch.einsum("gkthc,hcd->gkhtd", kh, wq.view(h, c, d)).reshape(
        g, -1, d
    )  # q_proj folded: (G, KHT, D)
    const = torch.einsum("gkthc,hc->gkht", kh, bq.view(h, c)).reshape(
        g, -1, 1
    )  # b_q . k: varies over t, kept
    # Scores with the image tokens last, so the softmax over the T tokens runs along contiguous rows.
    a = torch.baddbmm(const, kq, q_img.transpose(1, 2)).view(g, kk, h, t, n).softmax(3)
    u = torch.einsum("gkthc,dhc->gkhtd", vh, wo.view(d, h, c)).reshape(bk, h * t, d)  # out_proj folded
    # One bmm with the bias as its addend: no separate pass over the (BK, N, D) output for the bias.
    return torch.baddbmm(bo, a.view(bk, h * t, n).transpose(1, 2), u)


def per_prompt(keys: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """keys (G, N, D) shared by K prompts each + update (G*K, N, D) -> (G*K, N, D)."""
    g = keys.shape[0]
    return (keys[:, None] + update.view(g, -1, *update.shape[1:])).flatten(0, 1)


def folded_two_way(
    transformer: nn.Module, image: torch.Tensor, pe: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """segment_anything ``TwoWayTransformer`` for single-mask output, folded.

    image (G, N, D) image tokens with the dense prompt added, G = B when every prompt of an image has
    the same dense prompt (boxes and points only) or BK; pe (1, N, D); tokens (BK, T, D) with
    mask token 0 at index 1. Returns mask token 0's output (BK, D) and the image tokens (BK, N, D).
    """
    queries, keys = tokens, image
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        k_img = keys + pe
        queries = layer.norm2(
            queries + tokens_to_image(layer.cross_attn_token_to_image, queries + tokens, k_img, keys)
        )
        queries = layer.norm3(queries + layer.mlp(queries))
        update = image_to_tokens(layer.cross_attn_image_to_token, k_img, queries + tokens, queries)
        keys = layer.norm4(per_prompt(keys, update) if keys.shape[0] != update.shape[0] else keys + update)
    mask_query = queries[:, 1:2]
    out = tokens_to_image(transformer.final_attn_token_to_image, mask_query + tokens[:, 1:2], keys + pe, keys)
    return transformer.norm_final_attn(mask_query + out)[:, 0], keys


def conv_transpose_2x2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A kernel-2, stride-2 transposed convolution on channels-last pixels, as one matrix product.

    x (..., Cin) pixels -> (..., 2, 2, Cout) output blocks: each input pixel (i, j) writes its own
    2 x 2 block, ``out[2i+a, 2j+b, o] = sum_c x[i, j, c] W[c, o, a, b] + bias[o]`` at ``[i, j, a, b, o]``
    (for an (M, H, W, Cin) image, ``.permute(0, 1, 3, 2, 4, 5).reshape(M, 2H, 2W, Cout)`` is the image).
    """
    c_in, c_out = conv.weight.shape[:2]
    w = conv.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in)  # rows ordered (a, b, o)
    return F.linear(x, w, conv.bias.repeat(4)).view(*x.shape[:-1], 2, 2, c_out)


def upscale_and_read(
    decoder: nn.Module, keys: torch.Tensor, mask_token: torch.Tensor, grid: int
) -> torch.Tensor:
    """``einsum(hyper(mask_token), output_upscaling(image))`` of SAM's MaskDecoder in channels-last layout.

    keys (BK, grid*grid, D) image tokens (row-major), mask_token (BK, D) -> logits (BK, 4 grid, 4 grid).
    The upscaling (transposed conv, LayerNorm2d, GELU, transposed conv, GELU) runs on pixels with
    channels last, so both convolutions are plain matrix products and the LayerNorm over channels is
    one fused ``layer_norm``. Every step after the first convolution works per pixel, so the pixels
    stay in the convolutions' block order ((i, j, a, b, c, d) for the output pixel (4i + 2a + c,
    4j + 2b + d)) and only the logits, 32x fewer numbers than the features, are put in image order.
    """
    conv1, norm, act1, conv2, act2 = decoder.output_upscaling
    bk = keys.shape[0]
    x = conv_transpose_2x2(keys.view(bk, grid, grid, -1), conv1)  # (BK, grid, grid, 2, 2, 64)
    x = act1(F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))
    x = act2(conv_transpose_2x2(x, conv2))  # (BK, grid, grid, 2, 2, 2, 2, 32)
    hyper = decoder.output_hypernetworks_mlps[0](mask_token)  # (BK, 32)
    # A product and a sum, not a (65536 x 32) @ (32 x 1) bmm per prompt, whose backward (an outer product
    # and a matrix-vector product over 200 MB for 8 x 3 prompts) took 1.7x as long on the CPU.
    logits = (x.flatten(1, 6) * hyper[:, None, :]).sum(-1)  # (BK, 65536) in the order (i, j, a, b, c, d)
    logits = logits.view(bk, grid, grid, 2, 2, 2, 2)
    return logits.permute(0, 1, 3, 5, 2, 4, 6).reshape(bk, 4 * grid, 4 * grid)  # rows (i, a, c)


def foldable(module: nn.Module) -> bool:
    """False while a LoRA dropout is active (training with p > 0): then a projection is not affine."""
    return not any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in module.modules())
