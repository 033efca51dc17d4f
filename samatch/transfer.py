"""Host -> device copies that never make the host wait for the GPU.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory waits until every kernel already
queued on the stream has finished, so a training step that draws its random numbers on the host
(augmentation parameters, batch indices) would drain the GPU's queue several times per step, and
the host could never run ahead of the device. Through page-locked memory the copy is queued like a
kernel. The values are the same either way.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a host tensor goes to a CUDA device through pinned memory, queued
    (``non_blocking``). Torch's pinned-memory allocator keeps the host block until the copy is done."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
