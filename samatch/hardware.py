"""What a measurement ran on, for the JSON of benchmarks and runners (docs/performance.md,
docs/results.md name the hardware of every figure from it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from samatch import allocator


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's processor or machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """CPU, cores, torch and its threads, Python, CUDA version and GPU (None without CUDA), and the
    host allocator this process runs on."""
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "allocator": allocator.describe(),
    }
