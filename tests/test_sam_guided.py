"""SAM-Match helpers with hand-computed values; the full step runs in tests/test_federation.py."""

import functools
import math

import pytest
import torch

from samatch.methods.sam_guided import filled_masks, invert_affine, ring_probs
from samatch.transforms import apply_affine


def test_invert_affine_of_a_rotation_is_its_transpose():
    # Prepare: 30 degrees and a flip, no translation.
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    theta = torch.tensor([[[-c, -s, 0.0], [-s, c, 0.0]]])
    # Execute
    inv = invert_affine(theta)
    # Assert: A^-1 = A^T for an orthogonal A, and the translation stays 0.
    assert torch.allclose(inv[0, :, :2], theta[0, :, :2].T, atol=1e-6)
    assert torch.allclose(inv[0, :, 2], torch.zeros(2))


def test_invert_affine_of_a_scaling_with_translation():
    # Prepare: x -> 2x + 2, y -> 4y + 4 (hand-computed inverse: x -> x / 2 - 1, y -> y / 4 - 1)
    theta = torch.tensor([[[2.0, 0.0, 2.0], [0.0, 4.0, 4.0]], [[0.0, 1.0, 0.0], [1.0, 0.0, 3.0]]])
    # Execute
    inv = invert_affine(theta)
    # Assert: the second, a swap of x and y plus a shift of y by 3, is undone by the swap and a shift of x
    want = torch.tensor([[[0.5, 0.0, -1.0], [0.0, 0.25, -1.0]], [[0.0, 1.0, -3.0], [1.0, 0.0, 0.0]]])
    assert torch.equal(inv, want)


def test_warp_then_inverse_warp_returns_the_label_for_right_angles():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[0, 1:3, 2:7] = 2
    label[0, 5, 0] = 1
    theta = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])  # 90 degrees
    image = torch.zeros(1, 1, 8, 8)
    _, warped = apply_affine(image, label, theta)
    _, back = apply_affine(image, warped, invert_affine(theta))
    assert not torch.equal(warped, label)
    assert torch.equal(back, label)


def test_filled_masks_adds_the_enclosed_class_to_the_outer_one():
    # Classes 1..3 -> channels 0..2; class 2 encloses class 3.
    masks = torch.zeros(1, 3, 1, 4, dtype=torch.bool)
    masks[0, 0, 0, 0] = True  # class 1 at x=0
    masks[0, 1, 0, 1] = True  # class 2 (ring) at x=1
    masks[0, 2, 0, 2] = True  # class 3 (inside) at x=2
    out = filled_masks(masks, {2: (3,)})
    assert out[0, 0, 0].tolist() == [True, False, False, False]
    assert out[0, 1, 0].tolist() == [False, True, True, False]
    assert out[0, 2, 0].tolist() == [False, False, True, False]
    assert masks[0, 1, 0].tolist() == [False, True, False, False]  # input untouched


def test_ring_probs_is_outer_times_not_inner():
    filled = torch.tensor([[[[0.9]], [[0.8]], [[0.5]]]])  # (1, 3, 1, 1): p1, p_filled2, p_filled3
    out = ring_probs(filled, {2: (3,)})
    assert torch.allclose(out.flatten(), torch.tensor([0.9, 0.8 * (1 - 0.5), 0.5]))
    assert torch.equal(ring_probs(filled, {}), filled)


def test_boxes_scale_inclusive_extents_to_the_sam_grid():
    # Prepare: a 64-pixel mask covering columns 0..63 of row 10, and an empty class.
    from types import SimpleNamespace

    from samatch.methods.sam_guided import SamGuidance

    stub = SimpleNamespace(
        enclosed={}, cfg=SimpleNamespace(box_margin=0), refine_mask=torch.tensor([True, True])
    )
    masks = torch.zeros(1, 2, 64, 64, dtype=torch.bool)
    masks[0, 0, 10, :] = True
    # Execute
    boxes, valid = SamGuidance.boxes(stub, masks, largest=False)
    # Assert: x 0..63 -> 0..255 (k = 4: x1 = (63 + 1) * 4 - 1); y 10 -> 40..43; empty -> zeros.
    assert boxes[0, 0].tolist() == [0.0, 40.0, 255.0, 43.0]
    assert valid.tolist() == [[True, False]]
    assert boxes[0, 1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_refine_classes_drops_prompts_of_other_classes():
    from types import SimpleNamespace

    from samatch.methods.sam_guided import SamGuidance

    stub = SimpleNamespace(
        enclosed={}, cfg=SimpleNamespace(box_margin=0), refine_mask=torch.tensor([True, False])
    )
    masks = torch.ones(1, 2, 8, 8, dtype=torch.bool)
    _, valid = SamGuidance.boxes(stub, masks, largest=False)
    _, valid_all = SamGuidance.boxes(stub, masks, largest=False, all_classes=True)
    assert valid.tolist() == [[True, False]]
    assert valid_all.tolist() == [[True, True]]


def test_decode_only_refined_skips_the_other_classes_and_keeps_the_order():
    # Prepare: a stub SAM whose mask for a prompt is filled with that box's x0; classes 1 and 3 of
    # 3 foreground classes are refined.
    from types import SimpleNamespace

    from samatch.methods.sam_guided import SamGuidance

    calls = []

    def fake_decode(emb, boxes, points=None):  # (B, K, 4) -> (B, K, 256, 256)
        calls.append(tuple(boxes.shape))
        return boxes[..., 0, None, None].expand(*boxes.shape[:2], 256, 256).clone()

    refine_mask = torch.tensor([True, False, True])
    stub = SimpleNamespace(
        sam=SimpleNamespace(decode=fake_decode),
        refine_mask=refine_mask,
        refine_index=refine_mask.nonzero()[:, 0],
        refines_all=False,
        skip_invalid=False,
        cfg=SimpleNamespace(amp="step"),
    )
    stub.precision = lambda device: SamGuidance.precision(stub, device)
    boxes = torch.tensor([[[10.0, 0, 20, 20], [30, 0, 40, 40], [50, 0, 60, 60]]])  # (1, 3, 4)

    # Execute
    some = SamGuidance.decode(stub, None, boxes, 256, only_refined=True)
    every = SamGuidance.decode(stub, None, boxes, 256)

    # Assert: 2 prompts decoded instead of 3; class 2's logits are 0, the others in their places.
    assert calls == [(1, 2, 4), (1, 3, 4)]
    assert some.shape == every.shape == (1, 3, 256, 256)
    assert some[0, :, 0, 0].tolist() == [10.0, 0.0, 50.0]
    assert every[0, :, 0, 0].tolist() == [10.0, 30.0, 50.0]


def test_decode_valid_prompts_only_on_cpu():
    # Prepare: the stub SAM above (a prompt's mask is filled with its box's x0 plus 100 x its image's
    # embedding value); 2 images x 3 prompts, of which (0, 1) and (1, 0) are invalid.
    from types import SimpleNamespace

    from samatch.methods.sam_guided import SamGuidance

    calls = []

    def fake_decode(emb, boxes, points=None):  # (B, K, 4) -> (B, K, 256, 256)
        calls.append((emb.shape[0], tuple(boxes.shape)))
        value = boxes[..., 0] + 100 * emb[:, None, 0, 0, 0]
        return value[..., None, None].expand(*boxes.shape[:2], 256, 256).clone()

    stub = SimpleNamespace(
        sam=SimpleNamespace(decode=fake_decode),
        refines_all=True,
        skip_invalid=True,
        cfg=SimpleNamespace(amp="step"),
    )
    stub._decode_valid = lambda *a: SamGuidance._decode_valid(stub, *a)
    stub.precision = lambda device: SamGuidance.precision(stub, device)
    emb = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 256, 64, 64)
    boxes = torch.tensor([[10.0, 0, 20, 20], [30, 0, 40, 40], [50, 0, 60, 60]]).expand(2, 3, 4)
    valid = torch.tensor([[True, False, True], [False, True, True]])

    # Execute
    out = SamGuidance.decode(stub, emb, boxes, 256, valid=valid)
    none = SamGuidance.decode(stub, emb, boxes, 256, valid=torch.zeros(2, 3, dtype=torch.bool))

    # Assert: the 4 valid prompts decoded, each with its own image (one prompt per image), in place;
    # the invalid ones 0. With none valid, all 6 are decoded (the losses keep their graph).
    assert calls[0] == (4, (4, 1, 4))
    assert out[:, :, 0, 0].tolist() == [[110.0, 0.0, 150.0], [0.0, 230.0, 250.0]]
    assert calls[1] == (2, (2, 3, 4)) and none[1, 0, 0, 0] == 210.0


def test_build_cache_with_cache_dir_encodes_once_across_guides(tmp_path):
    # Prepare: two guides (two worker processes of one site) whose "SAM" embeds an image as its mean.
    from types import SimpleNamespace

    from samatch.methods.sam_guided import SamGuidance

    class FakeSam(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image_encoder = torch.nn.Linear(1, 1)
            self.calls = 0

        def encode(self, x):  # (B,1,S,S) -> (B,256,64,64)
            self.calls += 1
            return x.mean((1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 256, 64, 64)

    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 8, 8) / 4  # means 0, 0.25, 0.5
    guides = [
        SimpleNamespace(sam=FakeSam(), cfg=SimpleNamespace(cache_dir=str(tmp_path / d)), cache={})
        for d in ("a", "a", "")
    ]
    guides[0].sam.image_encoder.load_state_dict(guides[1].sam.image_encoder.state_dict())

    # Execute: batch 2 -> two encode calls for 3 images
    for g in guides:
        SamGuidance.build_cache(g, "unlabeled", images, "cpu", batch=2)

    # Assert: the second guide read the first one's file; all three agree with the hand values.
    assert [g.sam.calls for g in guides] == [2, 0, 2]
    for g in guides:
        assert g.cache["unlabeled"].dtype == torch.float16
        assert g.cache["unlabeled"][:, 0, 0, 0].tolist() == [0.0, 0.25, 0.5]


# A tiny SAM-Match run on the cardiac phantom, in the joint stage from step 0.
TINY_JOINT = {
    "method.name": "samatch",
    "data.format": "phantom-cardiac",
    "data.size": 32,
    "data.labeled": 1,
    "data.max_unlabeled": 2,
    "model.base_channels": 4,
    "schedule.batch_size": 2,
    "schedule.iterations": 4,
    "sam.lora_rank": 2,
    "sam.warmup_fraction": 0.0,
    "method.threshold": 0.3,  # an untrained U-Net must be confident somewhere to prompt SAM
    "device": "cpu",
}


def guide_and_prompts(**settings):
    """A LiteMedSAM guide with LoRA (4 classes, TINY_JOINT plus ``settings``), random embeddings of 2
    images (2, 256, 64, 64) and 3 boxes each (2, 3, 4)."""
    from samatch.config import TrainConfig, apply_overrides
    from samatch.methods.sam_guided import SamGuidance

    guide = SamGuidance(apply_overrides(TrainConfig(), {**TINY_JOINT, "sam.enclosed": "", **settings}), 4)
    emb = torch.randn(2, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[20.0, 30, 150, 170], [60, 60, 120, 200], [0, 0, 255, 255]]).expand(2, 3, 4)
    return guide, emb, boxes


def test_sam_amp_runs_the_decoder_in_its_own_precision_whatever_the_steps():
    # Prepare: a guide, 2 images x 3 boxes; the decoder's logits in fp32 and under bf16 autocast,
    # computed directly (the expected values).
    guide, emb, boxes = guide_and_prompts()
    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        want_fp32 = guide.sam.decode(emb, boxes)
        with bf16():
            want_bf16 = guide.sam.decode(emb, boxes).float()

        # Execute: each setting, inside a bf16 step and an fp32 step
        got = {}
        for amp in ("step", "fp32", "bf16"):
            guide.cfg.amp = amp
            with bf16():
                got[amp, "bf16 step"] = guide.decode(emb, boxes, 256)
            got[amp, "fp32 step"] = guide.decode(emb, boxes, 256)

    # Assert: "step" follows the step (its logits in the step's autocast type); fp32 and bf16 hold
    # whatever the step's, with float32 logits. bf16 rounds the logits (they differ) but keeps nearly
    # every pixel's side of 0.
    want = {
        ("step", "bf16 step"): want_bf16,
        ("step", "fp32 step"): want_fp32,
        ("fp32", "bf16 step"): want_fp32,
        ("fp32", "fp32 step"): want_fp32,
        ("bf16", "bf16 step"): want_bf16,
        ("bf16", "fp32 step"): want_bf16,
    }
    for key, logits in got.items():
        assert logits.dtype == (torch.bfloat16 if key == ("step", "bf16 step") else torch.float32), key
        assert torch.equal(logits.float(), want[key]), key
    assert not torch.equal(want_bf16, want_fp32)
    assert ((want_bf16 > 0) == (want_fp32 > 0)).float().mean() > 0.99


def test_sam_amp_bf16_on_the_cpus_paths_valid_prompts_only_and_refined_classes_only():
    # Prepare: the guide above in bf16, refining classes 1 and 3; 2 images x 3 boxes, two invalid
    guide, emb, boxes = guide_and_prompts(**{"sam.amp": "bf16", "sam.refine_classes": "1,3"})
    valid = torch.tensor([[True, False, True], [True, True, False]])
    with torch.no_grad():
        want = guide.sam.decode(emb, boxes)  # fp32, every prompt

        # Execute: only the valid prompts decoded (the CPU's path); only the refined classes
        some = guide.decode(emb, boxes, 256, valid=valid)
        refined = guide.decode(emb, boxes, 256, only_refined=True)

    # Assert: float32 logits; 0 where nothing was decoded; elsewhere bf16's rounding of fp32's
    for logits in (some, refined):
        assert logits.dtype == torch.float32
    assert not some[~valid].any() and not refined[:, 1].any()
    for got, where in ((some, valid), (refined, torch.tensor([True, False, True]).expand(2, 3))):
        assert ((got[where] > 0) == (want[where] > 0)).float().mean() > 0.99
        assert not torch.equal(got[where], want[where])


def test_sam_amp_rejects_other_precisions():
    from samatch.config import TrainConfig, apply_overrides

    with pytest.raises(ValueError, match="sam.amp must be step, fp32 or bf16, got 'fp16'"):
        apply_overrides(TrainConfig(), {"sam.amp": "fp16"})


@pytest.mark.slow
def test_cached_embeddings_step_equals_encoding_every_step():
    # Prepare: two SAM-Match trainers from the same seed on the same phantom slices, joint stage from
    # step 0; one encodes every batch (the straightforward path), one reads the fp16 cache.
    from samatch.config import TrainConfig, apply_overrides
    from samatch.data import build_train_data
    from samatch.engine import Trainer

    logs = {}
    for cache in (False, True):
        cfg = apply_overrides(TrainConfig(), {**TINY_JOINT, "sam.cache_embeddings": cache})
        trainer = Trainer(cfg, build_train_data(cfg))

        # Execute: two steps
        logs[cache] = [trainer.step() for _ in range(2)]

    # Assert: the same losses up to the cache's float16 rounding of the embeddings
    for plain, cached in zip(logs[False], logs[True], strict=True):
        assert plain.keys() == cached.keys()
        for key in ("loss", "loss_x", "loss_sam_x", "loss_sam_agree", "loss_u_s1", "mask_ratio"):
            assert float(cached[key]) == pytest.approx(float(plain[key]), rel=2e-2, abs=2e-3), key
    assert float(logs[True][1]["loss_sam_agree"]) > 0  # SAM was prompted from Match's predictions


@functools.cache  # the batched, all-prompts run serves both tests below: it is computed once
def three_joint_steps(refine: str, batch_decodes: bool, skip_invalid: bool):
    """A SAM-Match trainer on TINY_JOINT (joint stage from step 0) after three steps: (their logs, the
    LoRA tensors, (images, prompts) of every decode call). Read-only: cached."""
    from samatch.config import TrainConfig, apply_overrides
    from samatch.data import build_train_data
    from samatch.engine import Trainer

    cfg = apply_overrides(TrainConfig(), {**TINY_JOINT, "sam.refine_classes": refine})
    trainer = Trainer(cfg, build_train_data(cfg))
    trainer.method.batch_decodes = batch_decodes
    trainer.method.guide.skip_invalid = skip_invalid
    calls = []
    decode = trainer.method.guide.sam.decode
    trainer.method.guide.sam.decode = lambda emb, boxes, *a, **k: (
        calls.append((emb.shape[0], boxes.shape[0] * boxes.shape[1])) or decode(emb, boxes, *a, **k)
    )
    logs = [trainer.step() for _ in range(3)]
    lora = {n: p.detach().clone() for n, p in trainer.method.guide.named_parameters() if p.requires_grad}
    return logs, lora, calls


def assert_same_steps(plain: tuple, fast: tuple) -> None:
    """The same losses and LoRA weights after three steps, to float32 rounding."""
    for a, b in zip(plain[0], fast[0], strict=True):
        for key in ("loss", "loss_x", "loss_sam_x", "loss_sam_agree", "loss_u_s1", "mask_ratio"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-6), key
    assert float(fast[0][2]["loss_sam_agree"]) > 0  # SAM was prompted from Match's predictions
    assert fast[1].keys() == plain[1].keys() and len(fast[1]) > 0
    for name, w in fast[1].items():
        torch.testing.assert_close(w, plain[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("refine", ["", "1,3"])
def test_one_batched_decode_equals_two_decodes(refine):
    # Prepare / Execute: three steps of two trainers from the same seed; one decodes the unlabeled and
    # the labeled prompts separately. With refine "1,3" the classes differ, so both decode separately
    # (the batched one must fall back, not mix class sets). Every prompt decoded: fixed counts.
    from samatch.methods.sam_guided import SamMatch

    plain = three_joint_steps(refine, batch_decodes=False, skip_invalid=False)
    fast = three_joint_steps(refine, batch_decodes=True, skip_invalid=False)

    # Assert: one decode of 2 x 2 images per step when the classes match, else two of 2 images ...
    assert [images for images, _ in plain[2]] == [2, 2] * 3
    assert [images for images, _ in fast[2]] == ([4] * 3 if refine == "" else [2, 2] * 3)
    # ... and the same steps
    assert_same_steps(plain, fast)
    assert SamMatch.batch_decodes is True  # the default


@pytest.mark.slow
@pytest.mark.parametrize("refine", ["", "1,3"])
def test_decoding_only_valid_prompts_gives_the_same_steps(refine):
    # Prepare / Execute: three steps of two trainers from the same seed; one decodes every prompt (as a
    # GPU does), one only the valid ones (the CPU default). With refine "1,3" the unlabeled prompts of
    # class 2 are invalid by configuration and decoded apart from the labeled.
    from samatch.methods.sam_guided import SamGuidance

    plain = three_joint_steps(refine, batch_decodes=True, skip_invalid=False)
    fast = three_joint_steps(refine, batch_decodes=True, skip_invalid=True)

    # Assert: fewer prompts decoded (the phantom's pseudo-labels leave some classes unprompted) and
    # the same steps
    assert sum(n for _, n in fast[2]) < sum(n for _, n in plain[2])
    assert_same_steps(plain, fast)
    assert SamGuidance.skip_invalid is True  # the default


def test_compile_mode_reaches_both_compiled_networks_and_marks_each_cuda_graph_step(monkeypatch):
    # Prepare: torch.compile recorded (and left out: eager), and the CUDA-graph step marker counted.
    # What reduce-overhead does on a GPU is measured by scripts/gpu_session.sh's bench_cg, not here.
    from samatch.config import TrainConfig, apply_overrides
    from samatch.data import build_train_data
    from samatch.engine import Trainer

    modes, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    def trainer(method: str, mode: str | None) -> Trainer:
        over = {**TINY_JOINT, "method.name": method, "sam.cache_embeddings": False, "schedule.compile": True}
        if mode is not None:
            over["schedule.compile_mode"] = mode
        cfg = apply_overrides(TrainConfig(), over)
        return Trainer(cfg, build_train_data(cfg))

    # Execute / Assert: the U-Net (nn.Module.compile) and SAM's folded decoder get the mode ...
    trainer("samatch", "reduce-overhead")
    assert modes == ["reduce-overhead", "reduce-overhead"]
    # ... every step of a CUDA-graph mode is marked, a mode without CUDA graphs marks nothing ...
    modes.clear()
    uni = trainer("unimatch", "reduce-overhead")
    uni.step(), uni.step()
    assert modes == ["reduce-overhead"] and len(marks) == 2
    modes.clear(), marks.clear()
    uni = trainer("unimatch", None)
    uni.step()
    assert modes == ["default"] and marks == []
    # ... and an unknown mode is a clear error.
    with pytest.raises(ValueError, match="schedule.compile_mode must be one of default, reduce-overhead"):
        apply_overrides(TrainConfig(), {"schedule.compile_mode": "fast"})
