"""What a benchmark's JSON says about its run (the command, the date, the machine, the settings),
and how it is written, so that every figure in docs/performance.md can be traced and rerun."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from samatch.hardware import hardware


def provenance(name: str, script: str, args: argparse.Namespace, argv: list[str] | None) -> dict:
    """The fields that open a benchmark's result: its name, the command line that reruns it (from
    ``script``, the benchmark's ``__file__``, and ``argv``, its ``main``'s arguments: the process's
    own when None), the date, :func:`samatch.hardware.hardware` (CPU and its bf16 units, torch and its
    threads, GPU, heap allocator) and the parsed options (paths as text)."""
    return {
        "benchmark": name,
        "command": " ".join(
            ["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": hardware(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def write_json(path: Path, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
