"""What a training step must do at least: its FLOPs and bytes, over what the device can do per second.

* ``step_cost(trainer)``: one ``Trainer.step`` under torch's ``FlopCounterMode`` (matrix products and
  convolutions, forward and backward) and :class:`BytesTouched` (every operator's inputs read and
  outputs written, views excluded). Bytes are an upper bound on memory traffic: every operator is
  assumed to miss the caches.
* ``device_rates(device)``: measured, not datasheet, rates: a large fp32 and bf16 matrix product
  (FLOP/s) and a large tensor copy (bytes read + written per second).
* ``floor_ms``: the roofline bound ``max(FLOPs / matmul rate, bytes / copy rate)``. A step cannot
  run faster than its FLOPs at the matmul rate; the byte term assumes no cache reuse, so the true
  floor lies between the two terms when they differ.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


class BytesTouched(TorchDispatchMode):
    """Sums, over every operator except views, the bytes of its tensor inputs and outputs; and counts
    every operator dispatched, views included (``ops``): each costs the host a dispatch, and on a GPU
    a step whose kernels are small is bound by these, not by FLOPs or bytes."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if func.is_view:  # a view moves no data
            return out
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.bytes += sum(t.numel() * t.element_size() for t in ins + outs)
        return out


@contextmanager
def eager(trainer) -> Iterator[None]:
    """Steps of ``trainer`` without its recorded step (``schedule.cuda_graph``): a replay dispatches
    no operators for the counters to see, and a step of other code (the reference-equivalent) must
    not replay the recording. The recording stays valid: every tensor it reads is updated in place."""
    graph = getattr(trainer, "graph", None)
    if graph is None:
        yield
        return
    trainer.graph = None
    try:
        yield
    finally:
        trainer.graph = graph


def step_cost(trainer) -> dict:
    """GFLOP, GB (upper bound) and operators (forward, backward, optimizer) of one ``trainer.step()``
    (the step does run, eagerly: it trains once)."""
    with eager(trainer), FlopCounterMode(display=False) as flops, BytesTouched() as touched:
        trainer.step()
    return {"gflop": flops.get_total_flops() / 1e9, "gbytes": touched.bytes / 1e9, "ops": touched.ops}


def synced_seconds(fn, device: torch.device) -> float:
    """Seconds one ``fn()`` takes on ``device`` (on CUDA bracketed by synchronisation, so queued
    kernels are neither counted before nor missed after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _best_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    fn()  # warm-up
    return min(synced_seconds(fn, device) for _ in range(repeats))


def device_rates(device: str | torch.device, n: int | None = None) -> dict:
    """Measured fp32 / bf16 matrix-product GFLOP/s and copy GB/s (best of 5) on ``device``."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        rates[f"matmul_{name}_gflops"] = 2 * n**3 / _best_seconds(lambda a=a, b=b: a @ b, device) / 1e9
    x = torch.empty(64 * 2**20, device=device)  # 256 MiB: far beyond any cache
    y = torch.empty_like(x)
    rates["copy_gbps"] = 2 * x.numel() * 4 / _best_seconds(lambda: y.copy_(x), device) / 1e9
    return rates


def floor_ms(cost: dict, rates: dict, amp: str = "fp32") -> float:
    """The roofline lower bound of a step, ms: FLOPs at the matmul rate, or bytes at the copy rate."""
    matmul = rates[f"matmul_{amp}_gflops"]
    return 1e3 * max(cost["gflop"] / matmul, cost["gbytes"] / rates["copy_gbps"])
