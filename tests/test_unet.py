"""samatch.models.unet: size of the SSL4MIS / UniMatch U-Net, shapes, and the feature-perturbation pass."""

import pytest
import torch

from samatch.config import TrainConfig, apply_overrides
from samatch.models.unet import UNet, build_unet


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_default_unet_has_about_1_8_million_parameters():
    # Execute
    n = n_params(UNet(in_channels=1, num_classes=4, base_channels=16))
    print(f"UNet(1, 4, 16): {n} parameters")

    # Assert: the SSL4MIS / UniMatch medical U-Net is ~1.81 M
    assert 1_700_000 <= n <= 1_900_000


def test_parameter_count_scales_with_width():
    # Convolutions dominate, so halving the base width divides the count by about 4.
    ratio = n_params(UNet(base_channels=16)) / n_params(UNet(base_channels=8))
    assert 3.5 < ratio < 4.1


@pytest.mark.parametrize("shape,classes", [((2, 1, 32, 32), 4), ((1, 1, 48, 64), 2), ((3, 2, 16, 32), 5)])
def test_output_shape(shape, classes):
    # Prepare
    b, c_in, h, w = shape
    model = UNet(in_channels=c_in, num_classes=classes, base_channels=4).eval()

    # Execute
    out = model(torch.rand(shape))

    # Assert
    assert out.shape == (b, classes, h, w)


def test_build_unet_follows_the_config():
    cfg = apply_overrides(
        TrainConfig(), {"model.num_classes": 3, "model.base_channels": 4, "method.feature_dropout": 0.3}
    )
    model = build_unet(cfg)
    assert model.num_classes == 3
    assert model.inc.body[0].out_channels == 4
    assert model.down[-1].body[0].out_channels == 4 * 16
    assert model.feature_dropout.p == 0.3


def test_feature_perturb_returns_two_outputs_of_the_plain_shape():
    model = UNet(num_classes=4, base_channels=4).train()
    clean, perturbed = model(torch.rand(3, 1, 32, 32), feature_perturb=True)
    assert clean.shape == perturbed.shape == (3, 4, 32, 32)


def test_feature_perturb_in_eval_mode_is_the_plain_forward():
    # Prepare: in eval mode Dropout2d and Dropout are identities and BatchNorm uses running statistics,
    # so the clean half, the "perturbed" half and a plain forward all see the same features.
    torch.manual_seed(0)
    model = UNet(num_classes=4, base_channels=4).eval()
    x = torch.rand(2, 1, 32, 32)

    # Execute
    plain = model(x)
    clean, perturbed = model(x, feature_perturb=True)

    # Assert: exactly equal. The halves are the same features through the same ops; the plain pass
    # ran the decoder on B instead of 2B images, which on CPU computes each image identically.
    assert torch.equal(perturbed, clean)
    assert torch.equal(clean, plain)


def test_feature_perturb_in_train_mode_perturbs():
    # Prepare
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    model = UNet(num_classes=4, base_channels=4, dropout=(0.0,) * 5, feature_dropout=0.5).train()
    no_fp = UNet(num_classes=4, base_channels=4, dropout=(0.0,) * 5, feature_dropout=0.0).train()
    no_fp.load_state_dict(model.state_dict())

    # Execute
    clean, perturbed = model(x, feature_perturb=True)
    clean0, perturbed0 = no_fp(x, feature_perturb=True)

    # Assert: with p = 0.5 the halves differ; with p = 0 they are the same input through the same ops
    assert not torch.allclose(clean, perturbed)
    assert torch.equal(clean0, perturbed0)


def test_feature_perturb_gradients_reach_the_encoder():
    model = UNet(num_classes=2, base_channels=4).train()
    _, perturbed = model(torch.rand(2, 1, 32, 32), feature_perturb=True)
    perturbed.sum().backward()
    assert model.inc.body[0].weight.grad is not None
    assert model.inc.body[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("h,w", [(40, 48), (32, 24), (33, 32)])
def test_sizes_not_multiple_of_16_are_refused_by_the_skip_concatenation(h, w):
    # Documented: "H and W must be multiples of 16". The model does not pad or check; the mismatch
    # surfaces as torch.cat's RuntimeError in the decoder. The pipeline never gets here, because
    # data.size must be a multiple of 16 (samatch.config) and every slice is resized to it.
    model = UNet(base_channels=4).eval()
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        model(torch.rand(1, 1, h, w))
