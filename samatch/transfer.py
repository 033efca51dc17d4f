"""Host -> device copies that never make the host wait for the GPU.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory waits until every kernel already
queued on the stream has finished, so a training step that draws its random numbers on the host
(augmentation parameters, batch indices) would drain the GPU's queue several times per step, and
the host could never run ahead of the device. Through page-locked memory the copy is queued like a
kernel. The values are the same either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_capturing = False  # inside samatch.step_graph's capture of a step (CUDA graph or the tests' recording)


@contextmanager
def capture_scope() -> Iterator[None]:
    """Marks a step being recorded for replay: :func:`host_may_read` answers False inside."""
    global _capturing
    previous, _capturing = _capturing, True
    try:
        yield
    finally:
        _capturing = previous


def host_may_read(t: torch.Tensor) -> bool:
    """Whether a step may branch on ``t``'s values on the host (a shortcut such as stopping a loop
    early): free on the CPU; on a GPU it would wait for the device; in a recorded step the branch
    taken at capture would be replayed whatever the values."""
    return t.device.type == "cpu" and not _capturing


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a host tensor goes to a CUDA device through pinned memory, queued
    (``non_blocking``). Torch's pinned-memory allocator keeps the host block until the copy is done."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        if torch.cuda.is_current_stream_capturing():
            # A graph would replay this copy from a host buffer that is gone by then: stale values.
            raise RuntimeError(
                f"a host tensor {tuple(t.shape)} is copied to {device} inside a CUDA graph capture; "
                "draw it on the device (a CUDA generator) or pass it in as a graph input"
            )
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
