"""A whole training step (forward, backward, optimizer updates) replayed as one CUDA graph.

On a fast GPU the SAM-Match step waits for the host: an H100 was busy 29 of the 97 ms of a joint step,
the rest spent issuing some 3,800 small operators one by one (docs/performance.md). A CUDA graph
records the kernels of one step once and then launches all of them with one call per step.

What a recorded step needs, and how the engine provides it (``schedule.cuda_graph``):

* Fixed shapes and fixed Python control flow: a new graph is recorded whenever the batch's shapes
  or the key change (the key is the method's stage: SAM-Match's warm-up, then joint training).
* Inputs in fixed tensors: the batch (images, labels, indices) is sampled as usual and copied into
  the graph's input tensors before each replay.
* Nothing from the host inside the step: augmentations draw from a generator on the GPU, registered
  with the graph so that every replay draws new numbers; a host tensor copied in during the capture
  raises (:func:`samatch.transfer.to_device`); value-dependent shortcuts are off
  (:func:`samatch.transfer.host_may_read`); no host synchronisation (there is none in the step).
* Optimizer settings the replay reads from the device: the learning rate of the poly schedule as a
  tensor updated in place, AdamW ``capturable``.

Before recording, ``warmup`` steps of each key run eagerly on a side stream, as torch's recipe for
whole-network capture asks (lazy initialisation, such as optimizer state and library workspaces,
happens outside the capture). Those are real training steps.

The recording itself is a backend: :class:`CudaGraphs` here, and a CPU stand-in in the tests that
records the dispatched operators and replays them on the same tensors (tests/op_replay.py), so the
engine's side of the contract is checked on machines without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from samatch.transfer import capture_scope

Batch = dict[str, torch.Tensor | None]
Losses = dict[str, torch.Tensor]


class CaptureFailed(RuntimeError):
    """The step could not be recorded (the error it raised while recording is the ``__cause__``); the
    recording is dropped, so the next steps of the same key warm up and record again."""


class GraphBackend(Protocol):
    def warm(self, fn: Callable[[], Losses]) -> Losses:
        """Run ``fn`` eagerly, as the steps before a capture must run."""

    def capture(self, fn: Callable[[], Losses]) -> Losses:
        """Record ``fn``; returns its outputs, filled in by each :meth:`replay`."""

    def replay(self) -> None:
        """Run the recorded step once more (the first replay after a capture runs the captured one)."""

    def release(self) -> None:
        """Drop the recording (and the memory it holds for its tensors)."""


class CudaGraphs:
    """:class:`GraphBackend` on ``torch.cuda.CUDAGraph``; ``generators`` are the CUDA generators the
    step draws from besides the default one (each replay advances them)."""

    def __init__(self, generators: Sequence[torch.Generator] = ()):
        self.generators = [g for g in generators if g.device.type == "cuda"]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side: torch.cuda.Stream | None = None  # the warm-up steps' stream, made on first use

    def warm(self, fn):
        self.side = self.side or torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.side)
        return out

    def capture(self, fn):
        self.graph = torch.cuda.CUDAGraph()
        for g in self.generators:
            self.graph.register_generator_state(g)
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(self.graph):
                return fn()
        except BaseException:
            # When ending a broken capture raises, torch.cuda.graph leaves its capture stream current:
            # the steps after it would run there.
            torch.cuda.set_stream(stream)
            self.graph = None
            raise

    def replay(self) -> None:
        self.graph.replay()

    def release(self) -> None:
        self.graph = None


class StepGraph:
    """Runs ``step(batch) -> losses`` eagerly ``warmup`` times per key and batch layout, then records
    it once and replays the recording for every later batch of that key and layout.

    batch: the step's input tensors (None entries stay None); a replay copies them into the tensors
    the recording reads. Returns the losses as new tensors (the recording's outputs are overwritten
    by the next replay).
    """

    def __init__(self, step: Callable[[Batch], Losses], backend: GraphBackend, warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"a step graph needs at least 1 warm-up step, got {warmup}")
        self.step = step
        self.backend = backend
        self.warmup = warmup
        self.captures = 0  # recordings made so far
        self.reset()

    def reset(self) -> None:
        """Forget the recording: call it when a tensor the step reads or writes is replaced instead of
        updated in place (optimizer state loaded or cleared), since a replay would use the old one."""
        self.backend.release()
        self.key: object = None
        self.warm_left = self.warmup
        self.inputs: Batch | None = None
        self.outputs: Losses | None = None

    def __call__(self, batch: Batch, key: object = None) -> Losses:
        key = (key, _layout(batch))
        if key != self.key:
            self.reset()
            self.key = key
        if self.warm_left > 0:
            self.warm_left -= 1
            return self.backend.warm(lambda: self.step(batch))
        if self.outputs is None:
            self.inputs = {k: None if v is None else v.clone() for k, v in batch.items()}
            try:
                with capture_scope():
                    self.outputs = self.backend.capture(lambda: self.step(self.inputs))
            except Exception as err:
                self.reset()
                raise CaptureFailed(
                    f"schedule.cuda_graph: the step could not be recorded: {type(err).__name__}: {err}"
                ) from err
            self.captures += 1
        else:
            for k, v in batch.items():
                if v is not None:
                    self.inputs[k].copy_(v)
        self.backend.replay()
        return {k: v.detach().clone() for k, v in self.outputs.items()}


def _layout(batch: Batch) -> tuple:
    """What a recording fixes of its inputs: keys, shapes, dtypes, strides (channels-last or not)."""
    return tuple(
        (k, None if v is None else (tuple(v.shape), v.dtype, v.stride())) for k, v in sorted(batch.items())
    )
