"""samatch.hostmem: big tensors come from the heap and freed memory stays in the process (glibc)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Run in a fresh interpreter: the setting is process-wide and other tests' Trainers apply it.
PROBE = """
import ctypes, json, torch
from samatch.hostmem import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
info = libc.mallinfo2
out = {"mapped_0": info().hblkhd}
x = torch.empty(100 * 2**20, dtype=torch.uint8)  # 100 MiB
out["mapped_default"] = info().hblkhd  # glibc maps it by itself
del x
out["applied"] = keep_freed_host_memory()
out["mapped_1"], out["heap_1"] = info().hblkhd, info().arena
x = torch.empty(100 * 2**20, dtype=torch.uint8)
out["mapped_2"], out["heap_2"] = info().hblkhd, info().arena
del x
out["heap_3"] = info().arena
print(json.dumps(out))
"""


def test_big_tensors_come_from_the_heap_and_stay():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "mallinfo2" in proc.stderr:
        pytest.skip("libc without mallinfo2 (not glibc >= 2.33)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    # Default glibc: the 100 MiB block is a mapping of its own.
    assert out["mapped_default"] - out["mapped_0"] >= 100 * mib
    # After keep_freed_host_memory: no new mapping, the heap grows instead, and keeps it when freed.
    assert out["applied"] is True
    assert out["mapped_2"] == out["mapped_1"]
    assert out["heap_2"] - out["heap_1"] >= 90 * mib  # less if free heap space was there already
    assert out["heap_3"] == out["heap_2"]
