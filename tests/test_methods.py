"""samatch.methods: the registry and the train steps of supervised, FixMatch and UniMatch."""

import math

import pytest
import torch
import torch.nn as nn

from samatch.config import TrainConfig, apply_overrides
from samatch.losses import dice_loss
from samatch.methods import METHODS, build_method, register
from samatch.methods.match import cutmix, pseudo_label, supervised_loss
from samatch.models.unet import UNet
from samatch.transforms import weak_view

BASIC = ["supervised", "fixmatch", "unimatch"]


def make_cfg(name: str, **extra):
    return apply_overrides(
        TrainConfig(),
        {"method.name": name, "model.num_classes": 4, "model.base_channels": 4, "data.size": 32, **extra},
    )


def tiny_batch(seed: int = 0, b: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    img_x = torch.rand(b, 1, size, size, generator=g)
    mask_x = torch.randint(0, 4, (b, size, size), generator=g)
    img_u = torch.rand(b, 1, size, size, generator=g)
    return img_x, mask_x, img_u


def make_method(name: str, model: nn.Module | None = None, seed: int = 0, **extra):
    cfg = make_cfg(name, **extra)
    torch.manual_seed(seed)
    model = model if model is not None else UNet(1, 4, 4)
    return build_method(cfg, model, torch.Generator().manual_seed(seed))


def test_registry_has_the_match_methods():
    assert set(BASIC) <= set(METHODS)
    assert METHODS["supervised"].uses_unlabeled is False
    assert METHODS["fixmatch"].uses_unlabeled and METHODS["unimatch"].uses_unlabeled
    assert all(METHODS[n].name == n for n in BASIC)


def test_unknown_method_lists_the_choices():
    cfg = make_cfg("supervised")
    cfg.method.name = "meanteacher"
    with pytest.raises(ValueError, match="unknown method 'meanteacher'") as err:
        build_method(cfg, UNet(1, 4, 4), torch.Generator())
    for name in METHODS:
        assert name in str(err.value)


def test_registering_a_name_twice_is_an_error():
    before = dict(METHODS)
    with pytest.raises(ValueError, match="registered twice"):
        register("fixmatch")(type("Other", (METHODS["fixmatch"],), {}))
    assert METHODS == before


@pytest.mark.parametrize("name", BASIC)
def test_train_step_gives_a_finite_loss_with_gradients_to_every_parameter(name):
    # Prepare
    method = make_method(name).train()
    img_x, mask_x, img_u = tiny_batch()

    # Execute
    losses = method.train_step(img_x, mask_x, None if name == "supervised" else img_u)
    losses["loss"].backward()

    # Assert
    assert losses["loss"].dim() == 0 and torch.isfinite(losses["loss"])
    assert all(torch.isfinite(v).all() for v in losses.values())
    params = list(method.model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert sum(p.grad.abs().sum() for p in params) > 0


def test_supervised_ignores_img_u():
    # Prepare: two identical methods, same generator and global seed
    img_x, mask_x, img_u = tiny_batch()
    a, b = make_method("supervised", seed=3).train(), make_method("supervised", seed=3).train()

    # Execute
    torch.manual_seed(0)
    la = a.train_step(img_x, mask_x, None)
    torch.manual_seed(0)
    lb = b.train_step(img_x, mask_x, img_u)

    # Assert
    assert set(la) == {"loss", "loss_x"}
    assert torch.equal(la["loss"], lb["loss"])
    assert torch.equal(la["loss"], la["loss_x"])


def test_dice_loss_with_an_all_zero_weight_mask_is_exactly_zero():
    # The documented convention: 0 / 0 becomes smooth / smooth = 1 per class, so 1 - 1 = 0.
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    loss = dice_loss(logits, target, weight_mask=torch.zeros(2, 8, 8))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(
    "name,unsup", [("unimatch", ["loss_u_s1", "loss_u_s2", "loss_u_fp"]), ("fixmatch", ["loss_u_s"])]
)
def test_threshold_one_masks_every_pixel_and_zeroes_the_unlabeled_losses(name, unsup):
    # Prepare: a softmax over 4 classes from a fresh network never reaches exactly 1.0
    method = make_method(name, **{"method.threshold": 1.0}).train()

    # Execute
    losses = method.train_step(*tiny_batch())

    # Assert: loss = (loss_x + w * 0) / 2
    assert losses["mask_ratio"].item() == 0.0
    for key in unsup:
        assert losses[key].item() == 0.0
    assert losses["loss"].item() == losses["loss_x"].item() / 2


@pytest.mark.parametrize("name", ["fixmatch", "unimatch"])
def test_threshold_zero_trusts_every_pixel(name):
    losses = make_method(name, **{"method.threshold": 0.0}).train().train_step(*tiny_batch())
    assert losses["mask_ratio"].item() == 1.0
    assert losses["loss"] > losses["loss_x"] / 2  # the unlabeled Dice now contributes


class IntensityClassifier(nn.Module):
    """Per-pixel 'segmenter' that labels intensity c / 3 as class c: a perfect model for labels
    drawn as images. No randomness and no batch statistics, so a train step is reproducible."""

    def __init__(self):
        super().__init__()
        self.sharpness = nn.Parameter(torch.tensor(60.0))
        self.register_buffer("centres", torch.arange(4.0).view(1, 4, 1, 1) / 3)

    def forward(self, x, feature_perturb=False):
        logits = -self.sharpness * (x - self.centres) ** 2  # (B, 4, H, W)
        return (logits, logits) if feature_perturb else logits


@pytest.mark.parametrize("name", BASIC)
def test_labeled_loss_uses_the_label_of_the_weak_view(name):
    # Prepare: the image IS its label (intensity c / 3); big blocks so few pixels sit on an edge
    mask_x = torch.zeros(2, 32, 32, dtype=torch.long)
    mask_x[:, :16, 16:] = 1
    mask_x[:, 16:, :16] = 2
    mask_x[:, 16:, 16:] = 3
    img_x = mask_x[:, None].float() / 3
    img_u = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    model = IntensityClassifier()
    method = make_method(name, model=model, seed=5)
    # The methods draw the labeled weak view first: replay it with a copy of the generator.
    g = torch.Generator().manual_seed(5)
    img_x_w, mask_x_w = weak_view(img_x, mask_x, g)
    expected = supervised_loss(model(img_x_w), mask_x_w)
    wrong = supervised_loss(model(img_x_w), mask_x)  # augmented prediction vs unaugmented label

    # Execute
    losses = method.train_step(img_x, mask_x, img_u)

    # Assert
    assert wrong.item() - expected.item() > 0.2  # the check below can tell the two apart
    torch.testing.assert_close(losses["loss_x"], expected, rtol=0, atol=1e-6)


def test_pseudo_label_hand_values():
    # logits (0, ln 3) -> softmax (0.25, 0.75); (ln 3, 0) -> (0.75, 0.25); (0, 0) -> (0.5, 0.5)
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3, 0.0], [ln3, 0.0, 0.0]]).view(1, 2, 1, 3).requires_grad_()
    conf, mask = pseudo_label(logits)
    torch.testing.assert_close(conf, torch.tensor([[[0.75, 0.75, 0.5]]]))
    assert mask.tolist() == [[[1, 0, 0]]]  # a tie goes to the first class
    assert not conf.requires_grad


def test_cutmix_pastes_the_previous_sample_inside_the_box():
    # Prepare: 3 samples of 1 x 2 pixels; sample i has image value i, confidence i / 10, label i
    img = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 1, 2)
    conf = torch.arange(3.0).view(3, 1, 1).expand(3, 1, 2) / 10
    mask = torch.arange(3).view(3, 1, 1).expand(3, 1, 2)
    box = torch.tensor([[[True, False]], [[False, False]], [[False, True]]])

    # Execute
    img_m, conf_m, mask_m = cutmix(img, conf, mask, box)

    # Assert: roll(1) makes sample i's partner sample i - 1 (sample 0's is sample 2)
    assert img_m[:, 0].tolist() == [[[2.0, 0.0]], [[1.0, 1.0]], [[2.0, 1.0]]]
    assert mask_m.tolist() == [[[2, 0]], [[1, 1]], [[2, 1]]]
    torch.testing.assert_close(conf_m, torch.tensor([[[0.2, 0.0]], [[0.1, 0.1]], [[0.2, 0.1]]]))


def test_samatch_is_listed_but_imported_on_first_use():
    # A fresh interpreter: the ClientApp module and the registry listing must not import peft (~4 s
    # per deployed ClientApp process); looking the method up does.
    import subprocess
    import sys

    code = (
        "import sys, clients.client_app\n"
        "from samatch.methods import METHODS\n"
        "print(sorted(METHODS), 'samatch' in METHODS, 'peft' in sys.modules)\n"
        "print(METHODS['samatch'].__name__, 'peft' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [
        "['fixmatch', 'samatch', 'supervised', 'unimatch'] True False",
        "SamMatch True",
    ]
