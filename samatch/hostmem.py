"""Host memory for CPU training: keep freed memory in the process instead of handing it back.

glibc's malloc serves every block above 32 MiB with a fresh ``mmap`` and returns it with ``munmap``
when freed. A training step allocates and frees gigabytes of such blocks (activations of a 256 x 256
batch), so every step pays the kernel to map and zero the same amount of memory again: measured on
this project's 2-core CPU machine, system time took most of a batch-12 step, and turning this off
made a UniMatch step at batch 12 2.1x faster (docs/performance_log.md). With ``M_MMAP_MAX = 0`` big blocks
come from the heap, and with an unlimited ``M_TRIM_THRESHOLD`` the heap is never shrunk, so freed
blocks are reused. The cost: the process keeps its peak memory until it exits (``malloc_trim(0)``
still returns it on request), and blocks of changing sizes fragment the heap, so it can grow past
the peak: one benchmark process that ran twelve differently sized cases in a row grew to 24 GB
and was killed for memory. Hence opt-in (``schedule.keep_host_memory``), for a process that
repeats one step shape, such as a training run.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from samatch import allocator

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
_applied = False


def keep_freed_host_memory() -> bool:
    """Apply the two glibc settings above to this process (once). False where libc is not glibc, or
    where a preloaded allocator serves malloc (``samatch.allocator``: it keeps freed pages itself)."""
    global _applied
    if _applied:
        return True
    if allocator.active() != "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): leave the allocator alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # -1 becomes SIZE_MAX inside glibc (the threshold is a size_t): never trim on free.
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    return _applied
