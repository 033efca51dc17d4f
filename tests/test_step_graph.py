"""samatch.step_graph: a whole training step recorded once and replayed, checked on the CPU through
tests/op_replay.py (the operators of the step replayed on the same tensors, as a CUDA graph would)."""

import pytest
import torch
from op_replay import RecordedOps

from samatch.config import TrainConfig, apply_overrides
from samatch.data import build_train_data
from samatch.engine import Trainer
from samatch.step_graph import CaptureFailed, CudaGraphs, StepGraph
from samatch.transfer import to_device


def scaled_sum_step(w: torch.Tensor, lr: torch.Tensor):
    """A step with state: w += lr * x; returns loss = (w * x).sum() after the update."""

    def step(batch):
        w.add_(batch["x"] * lr)
        return {"loss": (w * batch["x"]).sum()}

    return step


def test_a_recorded_step_reads_new_inputs_and_state_on_every_replay():
    # Prepare: w = [0, 0], lr = 1; one eager warm-up step, then the recording
    w, lr = torch.zeros(2), torch.tensor(1.0)
    graph = StepGraph(scaled_sum_step(w, lr), RecordedOps(), warmup=1)

    # Execute / Assert (hand-computed): warm-up x = [1, 2] -> w = [1, 2], loss 1 + 4 = 5
    assert graph({"x": torch.tensor([1.0, 2.0])})["loss"].item() == 5.0
    assert graph.captures == 0
    # capture with x = [0, 1] -> w = [1, 3], loss 3
    assert graph({"x": torch.tensor([0.0, 1.0])})["loss"].item() == 3.0
    assert graph.captures == 1
    # replay with x = [2, 0], lr = 0.5 set in place -> w = [2, 3], loss 4
    lr.fill_(0.5)
    out = graph({"x": torch.tensor([2.0, 0.0])})
    assert out["loss"].item() == 4.0 and torch.equal(w, torch.tensor([2.0, 3.0]))
    # the returned losses are copies: the next replay (x = [1, 1] -> w = [2.5, 3.5], loss 6) leaves them
    assert graph({"x": torch.tensor([1.0, 1.0])})["loss"].item() == 6.0
    assert out["loss"].item() == 4.0
    assert graph.captures == 1


def test_a_new_key_warms_up_and_records_again():
    w, lr = torch.zeros(2), torch.tensor(1.0)
    graph = StepGraph(scaled_sum_step(w, lr), RecordedOps(), warmup=1)
    x = {"x": torch.ones(2)}
    for key in ("warmup", "warmup", "warmup", "joint"):
        graph(x, key=key)
    assert graph.captures == 1 and graph.outputs is None  # "joint": its warm-up step, no recording yet
    graph(x, key="joint")
    assert graph.captures == 2
    assert torch.equal(w, torch.full((2,), 5.0))  # five steps of +1, whatever ran them


def test_a_batch_of_another_shape_is_recorded_anew():
    # Prepare: w = [0, 0], recorded for x of shape (2,): w = [2, 2]
    w, lr = torch.zeros(2), torch.tensor(1.0)
    graph = StepGraph(scaled_sum_step(w, lr), RecordedOps(), warmup=1)
    graph({"x": torch.ones(2)})
    graph({"x": torch.ones(2)})
    assert graph.captures == 1

    # Execute: x = [1] of shape (1,) (broadcast): a warm-up step (w = [3, 3]), then a new recording
    # (w = [4, 4], loss 4 + 4)
    graph({"x": torch.ones(1)})
    out = graph({"x": torch.ones(1)})

    # Assert
    assert graph.captures == 2 and out["loss"].item() == 8.0
    with pytest.raises(ValueError, match="at least 1 warm-up"):
        StepGraph(scaled_sum_step(w, lr), RecordedOps(), warmup=0)


def test_a_step_that_cannot_be_recorded_raises_capture_failed_and_warms_up_again():
    # Prepare: a step that reads a value on the host (w.sum().item()): eager steps run, a recording
    # refuses it. w = [0, 0]; one warm-up step.
    w = torch.zeros(2)

    def step(batch):
        w.add_(batch["x"])
        return {"loss": w * w.sum().item()}

    graph = StepGraph(step, RecordedOps(), warmup=1)
    graph({"x": torch.ones(2)})  # warm-up: w = [1, 1]

    # Execute / Assert: the recording fails with the reason as its cause, and is dropped ...
    with pytest.raises(CaptureFailed, match="could not be recorded: RuntimeError: .*on the host") as failed:
        graph({"x": torch.ones(2)})
    assert isinstance(failed.value.__cause__, RuntimeError)
    assert graph.outputs is None and graph.captures == 0
    # ... so the next step of the same batch layout is an eager warm-up step again (w = [2, 2] -> [3, 3])
    assert torch.equal(graph({"x": torch.ones(2)})["loss"], torch.full((2,), 18.0))


def test_a_broken_cuda_capture_leaves_the_previous_stream_current(monkeypatch):
    # Prepare: torch.cuda stand-ins. As torch.cuda.graph does, entering the capture makes its stream
    # current, and an exit that raises (ending a broken capture) leaves it so.
    current = ["default"]

    class Graph:
        def register_generator_state(self, g):
            pass

    class Capture:
        def __init__(self, graph):
            pass

        def __enter__(self):
            current[0] = "capture"

        def __exit__(self, *exc):
            raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: current.__setitem__(0, stream))
    backend = CudaGraphs()

    # Execute
    with pytest.raises(RuntimeError, match="previous error during capture"):
        backend.capture(lambda: {"loss": torch.ones(1)})

    # Assert: the stream before the capture is current again, and no recording is kept
    assert current == ["default"] and backend.graph is None


@pytest.mark.parametrize(
    "body, message",
    [
        (lambda x, g: x * x.sum().item(), "on the host"),  # .item() waits for a GPU
        (lambda x, g: x[x > 0], "on the host"),  # boolean indexing: nonzero
        (lambda x, g: x + torch.rand(2, generator=torch.Generator().manual_seed(9)), "generator"),
    ],
    ids=["item", "nonzero", "unregistered-generator"],
)
def test_the_cpu_recording_refuses_what_a_cuda_graph_cannot_hold(body, message):
    g = torch.Generator().manual_seed(1)
    with pytest.raises(RuntimeError, match=message):
        RecordedOps(generators=[g]).capture(lambda: {"y": body(torch.ones(2), g)})


def test_the_cpu_recording_refuses_to_replay_a_freed_tensor_and_keeps_its_own_constants():
    # Prepare: a step reading state held elsewhere (as an optimizer holds its momentum) and a constant
    # made during the step (nobody else holds it afterwards)
    state = {"m": torch.ones(2)}
    backend = RecordedOps()
    out = backend.capture(lambda: {"y": state["m"] * torch.tensor([3.0, 3.0])})
    backend.replay()  # the capture's own run

    # Execute / Assert: the constant stays usable; state["m"] updated in place is read anew ...
    state["m"].add_(1)
    backend.replay()
    assert torch.equal(out["y"], torch.full((2,), 6.0))
    # ... but replaced, the old tensor is gone: a CUDA graph would read its freed memory
    state["m"] = torch.ones(2)
    with pytest.raises(RuntimeError, match="freed after its capture"):
        backend.replay()


def test_a_registered_generator_draws_anew_on_each_replay():
    # Prepare: y = 1 + U[0, 1) from g, recorded
    g = torch.Generator().manual_seed(1)
    backend = RecordedOps(generators=[g])
    out = backend.capture(lambda: {"y": 1 + torch.rand(2, generator=g)})
    first = out["y"].clone()
    want = 1 + torch.rand(2, generator=torch.Generator().manual_seed(1).set_state(g.get_state()))

    # Execute
    backend.replay()  # the capture's own run: nothing more
    assert torch.equal(out["y"], first)
    backend.replay()  # the next draw from g

    # Assert: g's next numbers, written into the recorded output
    assert torch.equal(out["y"], want)


def test_to_device_refuses_a_host_copy_inside_a_cuda_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(
        RuntimeError, match=r"host tensor \(3,\) is copied to cuda inside a CUDA graph capture"
    ):
        to_device(torch.zeros(3), "cuda")


TINY = {
    "data.format": "phantom-cardiac",
    "data.root": "0",
    "data.size": 32,
    "model.base_channels": 4,
    "model.num_classes": 4,
    "schedule.batch_size": 2,
    "schedule.iterations": 6,
    "schedule.eval_every": 1000,
    "schedule.log_every": 1000,
    "schedule.cuda_graph": True,
    "device": "cpu",
}


def recorded_run(overrides: dict, steps: int, record: bool, warmup: int = 1):
    """A cuda_graph trainer on the CPU recording through RecordedOps, or (record=False) the same
    trainer never recording (every step eager). Returns (the trainer, its step logs)."""
    cfg = apply_overrides(TrainConfig(), {**TINY, **overrides})
    trainer = Trainer(cfg, build_train_data(cfg), graph_backend=RecordedOps)
    trainer.graph.warmup = warmup if record else 10**9
    trainer.graph.reset()
    return trainer, [trainer.step() for _ in range(steps)]


def assert_same_training(a, b, keys):
    """The same losses and weights, bit for bit."""
    (ta, la), (tb, lb) = a, b
    for x, y in zip(la, lb, strict=True):
        for k in keys:
            assert float(x[k]) == float(y[k]), k
    sa, sb = ta.method.state_dict(), tb.method.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_recorded_unimatch_steps_equal_eager_steps():
    # Prepare / Execute: 6 steps: 1 eager warm-up, the recording, 4 replays (new batches, new
    # augmentations from the device generator, the poly learning rate falling)
    eager = recorded_run({"method.name": "unimatch"}, 6, record=False)
    recorded = recorded_run({"method.name": "unimatch"}, 6, record=True)

    # Assert: the same losses and weights, bit for bit (the same operators on the same values)
    assert recorded[0].graph.captures == 1 and eager[0].graph.captures == 0
    assert_same_training(eager, recorded, ("loss", "loss_x", "loss_u_s1", "loss_u_fp", "mask_ratio", "lr"))
    assert len({float(log["loss"]) for log in recorded[1]}) == 6  # each step saw a new batch
    assert isinstance(recorded[0].optimizer.param_groups[0]["lr"], torch.Tensor)


def test_recorded_steps_resume_exactly(tmp_path):
    # Prepare: 4 recorded steps straight, and 2 + save + resume (a new recording) + 2
    straight, _ = recorded_run({"method.name": "unimatch"}, 4, record=True)
    first, _ = recorded_run({"method.name": "unimatch"}, 2, record=True)
    first.save(tmp_path / "last.pt")
    cfg = apply_overrides(TrainConfig(), {**TINY, "method.name": "unimatch"})
    second = Trainer(cfg, build_train_data(cfg), graph_backend=RecordedOps)
    second.graph.warmup = 1
    second.resume(tmp_path / "last.pt")

    # Execute
    second.step()
    second.step()

    # Assert: the device generator's state travelled with the checkpoint
    a, b = straight.method.state_dict(), second.method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_loaded_host_lr_is_replaced_by_one_on_the_device_before_recording():
    # Prepare: a recording trainer whose optimizer group holds a host tensor, as Optimizer.load_state_dict
    # leaves the lr of a checkpoint loaded to the CPU; "meta" stands for a GPU (any device but the host)
    trainer, _ = recorded_run({"method.name": "unimatch"}, 0, record=True)
    group = trainer.optimizer.param_groups[0]
    group["lr"] = torch.tensor(0.01)
    trainer.device = torch.device("meta")

    # Execute
    trainer._set_lr(0.5)

    # Assert: a fused CUDA kernel reads a host lr once, so it would be frozen into the recording
    assert group["lr"].device.type == "meta"


def test_loading_a_checkpoint_makes_the_extra_optimizers_capturable():
    # Prepare: a recording trainer with an extra AdamW, and a checkpoint that says capturable=False
    trainer, _ = recorded_run({"method.name": "unimatch"}, 0, record=True)
    extra = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], capturable=False)
    trainer.optimizers.append(extra)
    state = trainer.state_dict()
    assert state["extra_optimizers"][0]["param_groups"][0]["capturable"] is False

    # Execute
    trainer.load_state_dict(state)

    # Assert: a recorded step may update it (capture refuses capturable=False)
    assert extra.param_groups[0]["capturable"] is True


def test_federated_rounds_record_anew_after_the_optimizer_state_is_cleared():
    # Prepare: two sessions of one site, recording (1 eager step, the recording, 2 replays per round)
    # and never recording; each round starts from the same global weights and clears the momentum
    from federation.config import FederationConfig, Site
    from federation.local import SiteSession, train_round

    fed = FederationConfig(local_iterations=4)
    finals = []
    for record in (True, False):
        trainer, _ = recorded_run({"method.name": "unimatch"}, 0, record=record)
        initial = {k: v.detach().clone() for k, v in trainer.method.checkpoint_state().items()}
        session = SiteSession(Site("a", 0, ()), trainer.cfg, trainer, initial)
        state = initial

        # Execute: two rounds
        for server_round in (1, 2):
            state, _ = train_round(session, state, {}, server_round, fed)
        finals.append((state, trainer.graph.captures))

    # Assert: one recording per round, and the same weights as eager rounds (a replay of round 1's
    # recording would carry its momentum buffers into round 2)
    (recorded, captures), (eager, _) = finals
    assert all(torch.equal(recorded[k], eager[k]) for k in eager)
    assert captures == 2


@pytest.mark.slow
def test_recorded_samatch_steps_equal_eager_steps_across_the_stage_change(tmp_path, monkeypatch):
    # Prepare / Execute: SAM-Match, warm-up stage for iterations 0-2, joint from 3; with one eager step
    # per stage, each stage is recorded once and replayed (the joint stage's steps 5-6). A recorded
    # step decodes every prompt (it may not read which exist); the eager steps do so too here, since
    # decoding fewer rows changes the decoder's matrix products' rounding on some CPUs (an Intel Xeon
    # with AVX-512, 2026-11-28: the 7th digit). test_sam_guided compares the two decodings.
    from samatch.methods.sam_guided import SamGuidance

    monkeypatch.setattr(SamGuidance, "skip_invalid", False)
    joint = {"method.name": "samatch", "sam.warmup_fraction": 0.4, "schedule.iterations": 7}
    # Fewer slices for SAM to encode, and once for both trainers
    joint.update(
        {"data.labeled": 1, "data.max_unlabeled": 2, "sam.lora_rank": 2, "sam.cache_dir": str(tmp_path)}
    )
    joint["method.threshold"] = 0.3  # an untrained U-Net must be confident somewhere to prompt SAM
    eager = recorded_run(joint, 7, record=False)
    recorded = recorded_run(joint, 7, record=True)

    # Assert: two recordings, and the same losses and weights (U-Net and LoRA), bit for bit
    assert recorded[0].graph.captures == 2
    keys = ("loss", "loss_x", "loss_sam_x", "loss_sam_agree", "loss_u_s1", "mask_ratio")
    assert_same_training(eager, recorded, keys)
    assert float(recorded[1][-1]["loss_sam_agree"]) > 0  # SAM was prompted from Match's predictions


def test_cuda_graph_needs_a_cuda_device_and_no_graphs_inside():
    cfg = apply_overrides(TrainConfig(), {**TINY, "method.name": "supervised"})
    with pytest.raises(ValueError, match="schedule.cuda_graph needs a CUDA device, got cpu"):
        Trainer(cfg, build_train_data(cfg))
    with pytest.raises(ValueError, match="use compile_mode=default"):
        apply_overrides(
            TrainConfig(),
            {
                "schedule.cuda_graph": True,
                "schedule.compile": True,
                "schedule.compile_mode": "reduce-overhead",
            },
        )
