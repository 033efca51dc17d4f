"""What a measurement ran on, for the JSON of benchmarks and runners (docs/performance.md,
docs/results.md name the hardware of every figure from it)."""

from __future__ import annotations

import os
import platform
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
    """Whether the CPU multiplies bf16 natively (x86 AVX-512 bf16 or AMX, Arm's bf16 extension);
    None where that is not known (no /proc/cpuinfo and not x86: e.g. Apple silicon). Without such
    units torch still runs bf16 autocast on the CPU, converting to and from fp32, likely slower than
    fp32 itself (not measured here: this project's CPU has bf16 units). From /proc/cpuinfo's flags,
    else torch's own x86 checks."""
    flags = {flag for line in _cpuinfo("flags", "Features") for flag in line.split()}
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def hardware() -> dict:
    """CPU, cores, whether the CPU has bf16 units, torch and its threads, Python, CUDA version and
    GPU (None without CUDA), and the host allocator this process runs on."""
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_bf16": cpu_has_bf16_units(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "allocator": allocator.describe(),
    }
