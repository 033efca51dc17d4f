"""samatch.engine: poly learning rate, the training loop on phantom data, exact resume, run outputs."""

import csv
import json

import pytest
import torch

from samatch.config import TrainConfig, apply_overrides
from samatch.data import build_train_data
from samatch.engine import Trainer, load_run_model, poly_lr
from samatch.methods.base import register
from samatch.methods.match import Supervised


@register("test-two-stage")
class TwoStage(Supervised):
    """Supervised, in two named stages: "first" before iteration 40, "second" after."""

    def stage(self) -> str:
        return "second" if self.iteration >= 40 else "first"


TINY = {
    "data.format": "phantom-cardiac",
    "data.root": "0",
    "data.size": 32,
    "model.base_channels": 4,
    "model.num_classes": 4,  # Trainer does not resolve 0 ("from the dataset"); build_train_data does
    "schedule.batch_size": 2,
    "schedule.iterations": 4,
    "schedule.eval_every": 1000,
    "schedule.log_every": 1000,
    "device": "cpu",
}


def tiny_cfg(**extra) -> TrainConfig:
    return apply_overrides(TrainConfig(), {**TINY, **extra})


@pytest.fixture(scope="module")
def phantom_data():
    """Phantom site 0 at 32 px: 3 labeled + 5 unlabeled patients (6 slices each), 2 val volumes."""
    cfg = tiny_cfg()
    data = build_train_data(cfg)
    return cfg, data


@pytest.mark.parametrize(
    "it,total,expected",
    [
        (0, 100, 0.01),
        (50, 100, 0.01 * 0.5**0.9),  # 0.005359
        (99, 100, 0.01 * 0.01**0.9),  # 0.0001585
        (100, 100, 0.0),
        (150, 100, 0.0),  # past the end: clamped, never negative (nor a complex power)
    ],
)
def test_poly_lr_hand_values(it, total, expected):
    lr = poly_lr(0.01, it, total, 0.9)
    assert isinstance(lr, float)
    assert lr == pytest.approx(expected, rel=1e-12, abs=0)


def test_poly_lr_is_non_increasing_and_never_negative():
    lrs = [poly_lr(0.03, it, 10, 0.9) for it in range(15)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert min(lrs) == 0.0


def test_phantom_train_data_shapes(phantom_data):
    _, data = phantom_data
    assert data.labeled.images.shape == (18, 1, 32, 32)  # 3 patients x 6 slices
    assert data.labeled.labels.shape == (18, 32, 32)
    assert len(data.unlabeled) == 30 and data.unlabeled.labels is None
    assert len(data.val) == 2 and data.val[0].image.shape == (6, 32, 32)
    assert data.num_classes == 4


def test_run_stops_exactly_at_the_schedule(phantom_data):
    # Prepare
    cfg, data = phantom_data
    trainer = Trainer(cfg, data)

    # Execute
    partial = trainer.run(until=3, progress=False)
    result = trainer.run(until=100, progress=False)  # clamped to schedule.iterations = 4
    again = trainer.run(progress=False)

    # Assert
    assert partial["iteration"] == 3
    assert result["iteration"] == 4
    assert again["iteration"] == 4 and trainer.iteration == 4


def test_step_reports_the_poly_lr_and_sets_it_on_the_optimizer(phantom_data):
    cfg, data = phantom_data
    trainer = Trainer(cfg, data)
    logs = [trainer.step() for _ in range(2)]
    assert logs[0]["lr"] == cfg.schedule.lr  # iteration 0
    assert logs[1]["lr"] == pytest.approx(cfg.schedule.lr * 0.75**0.9)  # iteration 1 of 4
    assert trainer.optimizer.param_groups[0]["lr"] == logs[1]["lr"]
    assert all(torch.isfinite(v).all() for v in logs[1].values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize(
    "lines, expected",
    [
        (["fpu vme avx512f avx512bw avx512_vnni"], False),  # AVX-512 without its bf16 extension
        (["fpu avx512f avx512_bf16", "fpu avx512f avx512_bf16"], True),  # one line per core
        (["fpu avx512f amx_tile amx_bf16"], True),
        (["fp asimd sve bf16 i8mm"], True),  # Arm's Features line
        (["fp asimd sve"], False),
    ],
)
def test_cpu_bf16_units_from_the_cpu_flags(monkeypatch, lines, expected):
    from samatch import hardware

    monkeypatch.setattr(hardware, "_cpuinfo", lambda *fields: lines)
    assert hardware.cpu_has_bf16_units() is expected


def test_bf16_where_the_cpu_multiplies_bf16_slower_than_fp32_is_warned(phantom_data, monkeypatch):
    import samatch.engine
    from samatch.engine import slow_bf16

    cfg, data = phantom_data
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    samatch_bf16 = apply_overrides(cfg, {"method.name": "samatch", "sam.amp": "bf16"})
    both = apply_overrides(samatch_bf16, {"schedule.amp": "bf16"})
    monkeypatch.setattr(samatch.engine, "cpu_matmul_gflops", lambda: {"fp32": 297.0, "bf16": 165.0})
    assert slow_bf16(samatch_bf16, cpu) == (
        "sam.amp=bf16 on a CPU whose bf16 matrix products are slower than fp32 ones "
        "(measured 165 against 297 GFLOP/s): fp32 is likely faster here"
    )
    assert slow_bf16(both, cpu).startswith("schedule.amp and sam.amp=bf16 on a CPU")
    assert slow_bf16(both, cuda) is None
    assert slow_bf16(apply_overrides(cfg, {"sam.amp": "bf16"}), cpu) is None  # a method without SAM
    assert slow_bf16(cfg, cpu) is None  # fp32
    with pytest.warns(UserWarning, match="schedule.amp=bf16 on a CPU whose bf16 matrix products are slower"):
        Trainer(apply_overrides(cfg, {"schedule.amp": "bf16"}), data)
    monkeypatch.setattr(samatch.engine, "cpu_matmul_gflops", lambda: {"fp32": 185.0, "bf16": 415.0})
    assert slow_bf16(both, cpu) is None


def test_the_matrix_rates_are_measured_in_both_precisions():
    from samatch.hardware import cpu_matmul_gflops

    rates = cpu_matmul_gflops(64, 1)
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())
    assert cpu_matmul_gflops(64, 1) is rates  # measured once per process


def test_optimizers_run_torch_fused_kernels_where_it_has_them(phantom_data):
    from samatch.methods.base import fused_optimizer

    cfg, data = phantom_data
    assert Trainer(cfg, data).optimizer.defaults["fused"] is True  # this CPU
    assert fused_optimizer("cuda:0") == {"fused": True}
    assert fused_optimizer("mps") == {}  # torch's default there


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("method", ["supervised", "unimatch"])
def test_resume_is_exact(phantom_data, tmp_path, method):
    # Prepare
    _, data = phantom_data
    cfg = tiny_cfg(**{"schedule.iterations": 6, "method.name": method})

    # Execute: 6 iterations straight, versus 3 + save + a fresh Trainer + resume + 3
    straight = Trainer(cfg, data)
    straight.run(progress=False)
    first = Trainer(cfg, data)
    first.run(until=3, progress=False)
    first.save(tmp_path / "mid.pt")
    torch.manual_seed(1234)  # scramble the global RNG: resume must restore it
    second = Trainer(cfg, data)
    second.resume(tmp_path / "mid.pt")
    assert second.iteration == 3
    second.run(progress=False)

    # Assert: every tensor bit-identical (weights, BatchNorm statistics), and the momentum buffers too
    a, b = state_of(straight), state_of(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    assert second.iteration == straight.iteration == 6
    assert not torch.equal(a["head.weight"], state_of(Trainer(cfg, data))["head.weight"])  # it trained


def test_run_writes_metrics_history_and_checkpoints(phantom_data, tmp_path):
    # Prepare: log and validate every 2 of 4 iterations
    _, data = phantom_data
    cfg = tiny_cfg(**{"schedule.log_every": 2, "schedule.eval_every": 2})
    trainer = Trainer(cfg, data, out_dir=tmp_path / "run")

    # Execute
    result = trainer.run(progress=False)

    # Assert
    out = tmp_path / "run"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [2, 4]
    # the row of iteration 2 logs the lr of its last step (iteration index 1 of 4): 0.01 * 0.75^0.9
    assert float(rows[0]["lr"]) == pytest.approx(0.01 * 0.75**0.9)
    assert {"loss", "loss_x", "seconds"} <= set(rows[0])
    history = json.loads((out / "val_history.json").read_text())
    assert [h["iteration"] for h in history] == [2, 4]
    assert set(history[0]) == {"iteration", "dice_RV", "dice_myocardium", "dice_LV", "dice_mean"}
    assert all(0.0 <= h["dice_mean"] <= 1.0 for h in history)
    best = max(history, key=lambda h: h["dice_mean"])
    assert result["best"] == {"dice": best["dice_mean"], "iteration": best["iteration"]}
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert torch.load(out / "last.pt", weights_only=False)["iteration"] == 4
    assert torch.load(out / "best.pt", weights_only=False)["iteration"] == best["iteration"]
    assert not list(out.glob("*.tmp"))  # atomic saves leave no temporaries


def test_partial_run_saves_last_at_its_end(phantom_data, tmp_path):
    _, data = phantom_data
    trainer = Trainer(tiny_cfg(), data, out_dir=tmp_path)
    trainer.run(until=3, progress=False)  # 3 is not a validation point (eval_every = 1000)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["iteration"] == 3


def test_load_run_model_reproduces_the_trained_model(phantom_data, tmp_path):
    # Prepare: a run folder as `samatch train` writes it (config.json after the data set num_classes)
    _, data = phantom_data
    cfg = tiny_cfg()
    cfg.save(tmp_path / "config.json")
    trainer = Trainer(cfg, data, out_dir=tmp_path)
    trainer.run(progress=False)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))

    # Execute
    cfg_back, model, device = load_run_model(tmp_path, "last", "cpu")

    # Assert
    assert cfg_back == cfg and device == torch.device("cpu")
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(x), trainer.model.eval()(x))


def test_load_run_model_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        load_run_model(tmp_path, "best", "cpu")


def test_time_budget_cuts_the_schedule_and_records_it(tmp_path):
    # Prepare: a budget far too small for 10,000 iterations.
    cfg = tiny_cfg(**{"method.name": "supervised", "schedule.iterations": 10000, "schedule.minutes": 0.05})
    trainer = Trainer(cfg, build_train_data(cfg), out_dir=tmp_path)
    # Execute
    result = trainer.run(progress=False)
    # Assert: stopped after the probe (>= 30 steps) at the cut length, which config.json now holds.
    saved = TrainConfig.load(tmp_path / "config.json")
    assert 30 <= result["iteration"] < 10000
    assert saved.schedule.iterations == result["iteration"] == cfg.schedule.iterations


def test_time_budget_is_refit_when_the_method_changes_stage(tmp_path, monkeypatch):
    # Prepare: record each fit (iteration, stage) and let it return the schedule unchanged.
    cfg = tiny_cfg(**{"method.name": "test-two-stage", "schedule.iterations": 80, "schedule.minutes": 60})
    trainer = Trainer(cfg, build_train_data(cfg))
    fits = []

    def record(seconds, steps, until):
        fits.append((trainer.iteration, trainer.method.stage(), steps))
        return until

    monkeypatch.setattr(trainer, "_fit_time_budget", record)
    # Execute
    trainer.run(progress=False)
    # Assert: one probe over steps 10..30 of the first stage, one over steps 10..30 of the second.
    assert fits == [(30, "first", 20), (70, "second", 20)]


# On a CPU whose bf16 is slower than its fp32 the Trainer says so; this test is about the numbers.
@pytest.mark.filterwarnings("ignore:schedule.amp=bf16 on a CPU whose bf16:UserWarning")
def test_bf16_autocast_and_channels_last_train_like_fp32(phantom_data):
    # Prepare: the same seed, data and first step in three settings.
    cfg0, data = phantom_data

    def first_step(**extra):
        trainer = Trainer(tiny_cfg(**{"method.name": "unimatch", **extra}), data)
        seen = []
        trainer.model.register_forward_hook(
            lambda m, i, o: seen.append(o[0].dtype if isinstance(o, tuple) else o.dtype)
        )
        logs = trainer.step()
        return trainer, float(logs["loss"]), seen

    # Execute
    ref, loss32, dtypes32 = first_step()
    amp, loss16, dtypes16 = first_step(**{"schedule.amp": "bf16"})
    cl, loss_cl, _ = first_step(**{"schedule.channels_last": True})
    # Assert: the U-Net ran in bf16 under autocast, its parameters stayed fp32, and the loss is the
    # fp32 loss to bf16 precision (8 mantissa bits: ~0.4% per op); channels-last changes layout only.
    assert set(dtypes32) == {torch.float32} and set(dtypes16) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in amp.model.parameters())
    assert loss16 == pytest.approx(loss32, rel=0.05)
    conv = next(m for m in cl.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # Dropout masks are drawn in memory order, so the training loss differs slightly; without
    # dropout the channels-last network computes the same function.
    assert loss_cl == pytest.approx(loss32, rel=0.05)
    ref.model.load_state_dict(cl.model.state_dict())
    ref.model.eval(), cl.model.eval()
    x = data.labeled.images[:2]
    with torch.no_grad():
        torch.testing.assert_close(
            cl.model(x.contiguous(memory_format=torch.channels_last)), ref.model(x), rtol=1e-4, atol=1e-5
        )


@pytest.mark.slow
def test_compiled_unet_keeps_its_parameter_names_and_its_function(phantom_data):
    # Prepare: the same seed and data, the U-Net compiled (schedule.compile) and not.
    _, data = phantom_data
    ref = Trainer(tiny_cfg(**{"method.name": "supervised"}), data)
    comp = Trainer(tiny_cfg(**{"method.name": "supervised", "schedule.compile": True}), data)
    assert comp.model._compiled_call_impl is not None and ref.model._compiled_call_impl is None
    # Assert: checkpoints and federation payloads keep their names (compiled in place, no prefix) ...
    assert list(comp.model.state_dict()) == list(ref.model.state_dict())
    # Execute: ... and, with the same weights, the compiled network computes the same function.
    comp.model.load_state_dict(ref.model.state_dict())
    ref.model.eval(), comp.model.eval()
    x = data.labeled.images[:2]
    with torch.no_grad():
        torch.testing.assert_close(comp.model(x), ref.model(x), rtol=1e-4, atol=1e-5)


def test_unknown_amp_is_a_clear_error():
    with pytest.raises(ValueError, match="schedule.amp must be fp32 or bf16"):
        tiny_cfg(**{"schedule.amp": "fp8"})


def test_a_semi_supervised_method_without_unlabeled_data_is_a_clear_error():
    cfg = tiny_cfg(**{"method.name": "unimatch"})
    data = build_train_data(cfg)
    data.unlabeled = None
    with pytest.raises(ValueError, match="needs unlabeled data"):
        Trainer(cfg, data)
