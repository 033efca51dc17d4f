"""LoRA on SamGuide: only adapters train, adapter-only state round-trips, FFA-LoRA keeps A fixed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samatch.models.lora import (
    LoraSettings,
    add_lora,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    save_lora,
)
from samatch.models.sam import build_sam

BOXES = torch.tensor([[[40.0, 50.0, 160.0, 170.0]], [[90.0, 30.0, 230.0, 140.0]]])  # (2, 1, 4)


def _lora_sam(**settings):
    return add_lora(build_sam("litemedsam"), LoraSettings(**settings))


def _embedding() -> torch.Tensor:
    return torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1))  # (1, 256, 64, 64)


def _image() -> torch.Tensor:
    """One grey image with a bright square where BOXES[0] points; (1, 1, 256, 256)."""
    x = torch.full((1, 1, 256, 256), 0.2)
    x[..., 50:170, 40:160] = 0.8
    return x


def _train(sam, steps: int, through_encoder: bool) -> None:
    """SGD steps towards the square's mask; SGD so that a zero gradient means no change."""
    opt = torch.optim.SGD([p for p in sam.parameters() if p.requires_grad], lr=0.5)
    target = _image() > 0.5
    sam.train()
    for _ in range(steps):
        if through_encoder:
            logits = sam(_image(), BOXES[:1])  # (1, 1, 256, 256)
        else:
            logits = sam.decode(_embedding(), BOXES[:1])
        loss = F.binary_cross_entropy_with_logits(logits, target.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    sam.eval()


def _perturb_adapters(sam, seed: int = 0) -> dict[str, torch.Tensor]:
    """Add noise to every adapter tensor: B starts at zero, and a zero B gives A no gradient and no effect."""
    gen = torch.Generator().manual_seed(seed)
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in lora_state_dict(sam).items()}
    load_lora_state_dict(sam, noisy)
    return noisy


@pytest.mark.parametrize(
    "bad",
    [
        {"rank": 0},
        {"rank": 2.5},
        {"alpha": 0},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"targets": "everything"},
        {"seed": -1},
    ],
)
def test_settings_reject_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LoraSettings(**bad)


def test_settings_defaults():
    s = LoraSettings()
    assert (s.rank, s.alpha, s.dropout, s.targets, s.freeze_a, s.seed) == (8, 16.0, 0.0, "decoder", False, 0)


@pytest.mark.parametrize(
    ("targets", "through_encoder", "n_layers"),
    [
        ("decoder", False, 28),  # 7 attentions x (q, k, v, out)
        ("encoder+decoder", True, 28 + 20),  # + 10 TinyViT blocks x (qkv, proj)
    ],
)
def test_only_adapter_tensors_change(targets, through_encoder, n_layers):
    sam = _lora_sam(targets=targets)
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * n_layers
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    _perturb_adapters(sam)  # so that one step moves every A as well as every B
    before = {k: v.clone() for k, v in sam.state_dict().items()}  # BatchNorm statistics included
    _train(sam, 1, through_encoder)
    after = sam.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable


@pytest.mark.parametrize(("targets", "n_bytes"), [("decoder", 384_680), ("encoder+decoder", 745_856)])
def test_adapter_round_trip_gives_identical_outputs(tmp_path, targets, n_bytes):
    trained = _lora_sam(targets=targets, seed=0)
    noisy = _perturb_adapters(trained)
    path = tmp_path / "adapters.safetensors"
    save_lora(trained, path)
    # 94,208 float32 for the 28 decoder projections at rank 8 (+ 89,088 in the encoder) + header.
    assert path.stat().st_size == n_bytes < 1_000_000

    fresh = _lora_sam(targets=targets, seed=1)  # a different A before loading
    load_lora(fresh, path)
    loaded = lora_state_dict(fresh)
    assert loaded.keys() == noisy.keys() and all(torch.equal(loaded[k], noisy[k]) for k in noisy)
    plain = build_sam("litemedsam")
    small = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))  # TinyViT takes any size
    with torch.no_grad():
        outs = [(m.decode(_embedding(), BOXES[:1]), m.image_encoder(small)) for m in (trained, fresh, plain)]
    (dec_a, enc_a), (dec_b, enc_b), (dec_plain, enc_plain) = outs
    assert torch.equal(dec_a, dec_b) and torch.equal(enc_a, enc_b)
    # The adapters change the outputs, so the equalities above are not vacuous.
    assert (dec_a - dec_plain).abs().max() > 1e-2
    assert ((enc_a - enc_plain).abs().max() > 1e-3) == (targets == "encoder+decoder")


def test_state_dict_holds_adapters_only():
    sd = lora_state_dict(_lora_sam())
    assert len(sd) == 56 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    assert sd["mask_decoder.transformer.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 256)
    # Cross-attention projects 256 -> 128 (downsample rate 2), so its B is (128, 8).
    key = "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.lora_B.weight"
    assert sd[key].shape == (128, 8)


def test_load_is_strict():
    sam = _lora_sam()
    sd = lora_state_dict(sam)
    key = next(iter(sd))
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(sam, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(KeyError, match="unexpected"):
        load_lora_state_dict(sam, {**sd, "mask_decoder.extra.lora_A.weight": torch.zeros(8, 256)})
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(sam, {**sd, key: torch.zeros(4, 256)})
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(_lora_sam(targets="encoder+decoder"), sd)


def test_add_lora_twice_is_an_error():
    sam = _lora_sam()
    with pytest.raises(ValueError, match="already"):
        add_lora(sam, LoraSettings())


def test_freeze_a_shares_a_and_trains_b_only():
    torch.manual_seed(123)  # the global RNG must not matter: A comes from settings.seed
    sam = _lora_sam(freeze_a=True, seed=7)
    torch.manual_seed(456)
    twin = _lora_sam(freeze_a=True, seed=7)
    other = _lora_sam(freeze_a=True, seed=8)
    sd, sd_twin, sd_other = lora_state_dict(sam), lora_state_dict(twin), lora_state_dict(other)
    a_keys = [k for k in sd if ".lora_A." in k]
    assert all(torch.equal(sd[k], sd_twin[k]) for k in a_keys)
    assert not any(torch.equal(sd[k], sd_other[k]) for k in a_keys)
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    assert len(trainable) == 28 and all(".lora_B." in n for n in trainable)

    _train(sam, 2, through_encoder=False)
    after = lora_state_dict(sam)
    assert all(torch.equal(sd[k], after[k]) for k in a_keys)
    assert all(not torch.equal(sd[k], after[k]) for k in after if ".lora_B." in k)
