"""What a measurement ran on, for the JSON of benchmarks and runners (docs/performance.md,
docs/results.md name the hardware of every figure from it)."""

from __future__ import annotations

import functools
import math
import os
import platform
import time
from pathlib import Path

import torch

from samatch import allocator


def _cpuinfo(*fields: str) -> list[str]:
    """The values of /proc/cpuinfo's lines that start with one of ``fields`` ([] off Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith(fields) and ":" in line]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's processor or machine name."""
    names = _cpuinfo("model name")
    return names[0] if names else platform.processor() or platform.machine()


def cpu_has_bf16_units() -> bool | None:
    """Whether the CPU has bf16 instructions (x86 AVX-512 bf16 or AMX, Arm's bf16 extension); None
    where that is not known (no /proc/cpuinfo and not x86: e.g. Apple silicon). From /proc/cpuinfo's
    flags, else torch's own x86 checks. The flag does not say bf16 is faster: see
    :func:`cpu_matmul_gflops`."""
    flags = {flag for line in _cpuinfo("flags", "Features") for flag in line.split()}
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@functools.cache
def cpu_matmul_gflops(n: int = 1024, repeats: int = 3) -> dict[str, float]:
    """This CPU's measured rate of an (n x n) @ (n x n) product in fp32 and in bf16, GFLOP/s (best
    of ``repeats`` after a warm-up; about 0.1 s, once per process and size). Whether bf16 pays on a
    CPU takes more than its flags: with AVX-512 bf16 both, an AMD EPYC ran bf16 at 404-426 GFLOP/s
    against fp32's 170-199, an Intel Xeon without AMX bf16 at 165 against fp32's 297 (2026-11-28)."""
    gen = torch.Generator().manual_seed(0)
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
        a @ b  # warm-up: oneDNN picks and caches its kernel
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        rates[name] = round(2 * n**3 / best / 1e9, 1)
    return rates


def hardware() -> dict:
    """CPU, cores, whether the CPU has bf16 instructions and its measured fp32 / bf16 matrix rates,
    torch and its threads, Python, CUDA version and GPU (None without CUDA), and the host allocator
    this process runs on."""
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_bf16": cpu_has_bf16_units(),
        "cpu_matmul_gflops": cpu_matmul_gflops(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "allocator": allocator.describe(),
    }
