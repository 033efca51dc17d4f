"""The folded mask decoder (samatch.models.folded_decoder) computes what segment_anything's computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samatch.models.folded_decoder import affine_parts, conv_transpose_2x2, foldable
from samatch.models.lora import LoraSettings, add_lora
from samatch.models.sam import build_sam


@pytest.fixture(scope="module")
def sam():
    """Pretrained LiteMedSAM with rank-8 decoder LoRA whose B matrices are not zero (as after training)."""
    torch.manual_seed(0)
    model = build_sam("litemedsam")
    add_lora(model, LoraSettings(rank=8))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # LoRA A and B
                p.normal_(0.0, 0.02)
    return model


def _decode_and_grads(sam, folded: bool, emb, boxes, points=None, masks=None):
    """Logits and the LoRA gradients of a fixed weighted sum of the probabilities."""
    sam.folded = folded
    sam.zero_grad()
    logits = sam.decode(emb, boxes, points, masks)
    weight = torch.linspace(-1.0, 1.0, logits.shape[-1])
    (logits.sigmoid() * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in sam.named_parameters() if p.requires_grad}
    sam.folded = True
    return logits.detach(), grads


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 56  # 7 attentions x (q, k, v, out) x (A, B)
    for name in a:
        # Sums over 4096 image tokens in another order: compare whole tensors, not single entries.
        assert a[name].norm() > 0
        assert (a[name] - b[name]).norm() <= 1e-4 * a[name].norm(), name


def test_affine_parts_of_a_linear_layer_by_hand():
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        lin.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    w, b = affine_parts(lin, 2, torch.zeros(1))
    assert w.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert b.tolist() == [0.5, -1.0, 2.0]


def test_affine_parts_of_a_lora_layer_is_w_plus_scaled_b_a(sam):
    layer = sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj
    expected = layer.base_layer.weight + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    w, b = affine_parts(layer, 256, torch.zeros(1))
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, layer.base_layer.bias, rtol=1e-5, atol=1e-6)
    # The LoRA tensors receive gradients through the probe.
    w.sum().backward()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    sam.zero_grad()


def test_conv_transpose_2x2_by_hand_and_against_torch():
    # Prepare: 1 channel in and out, weight [[1, 2], [3, 4]], bias 0.5, a 1 x 2 image [1, 10].
    conv = nn.ConvTranspose2d(1, 1, kernel_size=2, stride=2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
        conv.bias.fill_(0.5)
    x = torch.tensor([[[[1.0], [10.0]]]])  # (M=1, H=1, W=2, C=1), channels last
    # Execute
    out = conv_transpose_2x2(x, conv)  # (1, 1, 2, 2, 2, 1): pixel (i, j), block (a, b), channel
    assert out.shape == (1, 1, 2, 2, 2, 1)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(1, 2, 4)  # the image
    # Assert: each pixel writes value * kernel + bias into its own 2 x 2 block.
    assert out[0].tolist() == [[1.5, 2.5, 10.5, 20.5], [3.5, 4.5, 30.5, 40.5]]
    # And on random data against nn.ConvTranspose2d (channels first).
    conv = nn.ConvTranspose2d(5, 3, kernel_size=2, stride=2)
    x = torch.randn(2, 5, 4, 6)
    ours = conv_transpose_2x2(x.permute(0, 2, 3, 1), conv).permute(0, 1, 3, 2, 4, 5).reshape(2, 8, 12, 3)
    ours = ours.permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, conv(x).detach(), rtol=1e-5, atol=1e-5)


def test_folded_decode_equals_segment_anythings_for_boxes(sam):
    # Prepare: 3 images x 3 boxes each (the joint step's layout), one box per image touching the edge.
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(3, 256, 64, 64, generator=g)
    x0 = torch.randint(0, 150, (3, 3, 2), generator=g).float()
    boxes = torch.cat([x0, (x0 + torch.randint(10, 120, (3, 3, 2), generator=g)).clamp_max(255)], -1)
    boxes[:, 0] = torch.tensor([0.0, 0.0, 255.0, 255.0])
    # Execute
    straight, g_straight = _decode_and_grads(sam, False, emb, boxes)
    folded, g_folded = _decode_and_grads(sam, True, emb, boxes)
    # Assert: the same logits (they reach +-20) and the same LoRA gradients, to float32 rounding.
    assert straight.shape == (3, 3, 256, 256) and straight.abs().max() > 5
    torch.testing.assert_close(folded, straight, rtol=1e-4, atol=2e-4)
    _close(g_folded, g_straight)


@pytest.mark.slow
def test_compiled_folded_decode_equals_the_eager_one(sam):
    # Prepare: 2 images x 2 boxes; a compiled copy of the decoder's folded path (schedule.compile).
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(2, 256, 64, 64, generator=g)
    boxes = torch.tensor([[[10.0, 20.0, 120.0, 200.0], [0.0, 0.0, 255.0, 255.0]]] * 2)
    eager, g_eager = _decode_and_grads(sam, True, emb, boxes)
    sam.compile_decoder()
    calls, fold = [], sam._compiled_fold
    sam._compiled_fold = lambda *a, **k: calls.append(1) or fold(*a, **k)
    try:
        # Execute: the compiled path, twice (the second call runs the cached graph).
        for _ in range(2):
            compiled, g_compiled = _decode_and_grads(sam, True, emb, boxes)
    finally:
        sam._compiled_fold = None
    assert len(calls) == 2  # decode went through the compiled function
    # Assert: the same logits and LoRA gradients, to float32 rounding (fused kernels sum in other orders).
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=2e-4)
    _close(g_compiled, g_eager)


def test_folded_decode_equals_segment_anythings_for_points_and_masks(sam):
    # Mask prompts differ per prompt, so the image tokens are not shared: the other branch.
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(2, 256, 64, 64, generator=g)
    boxes = torch.tensor([[[20.0, 30.0, 140.0, 160.0]], [[90.0, 10.0, 250.0, 200.0]]]).expand(-1, 2, -1)
    coords = torch.tensor([[[80.0, 90.0], [5.0, 5.0]], [[150.0, 100.0], [0.0, 0.0]]]).expand(2, -1, -1, -1)
    labels = torch.tensor([[1, 0], [1, -1]]).expand(2, -1, -1)
    masks = torch.randn(2, 2, 1, 256, 256, generator=g)
    for kwargs in ({"points": (coords, labels)}, {"points": (coords, labels), "masks": masks}):
        straight, g_straight = _decode_and_grads(sam, False, emb, boxes, **kwargs)
        folded, g_folded = _decode_and_grads(sam, True, emb, boxes, **kwargs)
        torch.testing.assert_close(folded, straight, rtol=1e-4, atol=2e-4)
        _close(g_folded, g_straight)


def test_active_lora_dropout_is_not_foldable():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    assert not foldable(model.train())
    assert foldable(model.eval())
    assert foldable(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)).train())


@pytest.mark.slow
def test_samatch_steps_with_folded_and_straightforward_decoder_agree():
    # Prepare: two SAM-Match trainers from the same seed, joint stage from step 0; one decodes with
    # segment_anything's transformer as written. Pseudo-labels are recorded as the method makes them.
    from samatch.config import TrainConfig, apply_overrides
    from samatch.data import build_train_data
    from samatch.engine import Trainer

    overrides = {
        "method.name": "samatch",
        "data.format": "phantom-cardiac",
        "data.size": 64,
        "data.labeled": 1,
        "data.max_unlabeled": 2,
        "model.base_channels": 4,
        "schedule.batch_size": 2,
        "schedule.iterations": 4,
        "sam.warmup_fraction": 0.0,
        "sam.enclosed": "2>3",
        "method.threshold": 0.3,  # an untrained U-Net must be confident somewhere to prompt SAM
        "device": "cpu",
    }
    logs, pseudo = {}, {}
    for folded in (False, True):
        cfg = apply_overrides(TrainConfig(), overrides)
        trainer = Trainer(cfg, build_train_data(cfg))
        trainer.method.guide.sam.folded = folded
        seen = pseudo[folded] = []
        make = trainer.method.pseudo_targets

        def record(*args, _make=make, _seen=seen, **kwargs):
            conf, mask = _make(*args, **kwargs)
            _seen.append((conf.detach().clone(), mask.clone()))
            return conf, mask

        trainer.method.pseudo_targets = record
        # Execute: three steps
        logs[folded] = [trainer.step() for _ in range(3)]

    # Assert: the same pseudo-labels and confidences, the same losses, at every step.
    assert len(pseudo[True]) == 3
    for (c0, m0), (c1, m1) in zip(pseudo[False], pseudo[True], strict=True):
        assert (m0 != m1).float().mean() < 1e-4  # a pixel may flip where two classes tie to 1e-6
        torch.testing.assert_close(c1, c0, rtol=1e-4, atol=1e-4)
    for plain, fast in zip(logs[False], logs[True], strict=True):
        for key in ("loss", "loss_x", "loss_sam_x", "loss_sam_agree", "loss_u_s1", "mask_ratio"):
            assert float(fast[key]) == pytest.approx(float(plain[key]), rel=1e-4, abs=1e-6), key
    assert float(logs[True][2]["loss_sam_agree"]) > 0  # SAM was prompted from Match's predictions
