"""Large CPU tensors reused from the heap instead of mapped anew at every step (glibc malloc).

glibc serves an allocation above its mmap threshold (at most 32 MiB by its own adjustment) with
a fresh memory mapping and unmaps it on free, so a training step that makes the same large
tensors every step (the (tokens, vocab) logits and their gradient: 64 MiB at 4,096 tokens and
vocab 4,096) page-faults all of them in again each time. Measured on a windowed `tiny` step at
4,096 tokens: 0.70 s with glibc's defaults, 0.59 s with the thresholds below, and 4x the tokens
cost 4.7x the time instead of 3.9x (docs/BENCHMARKS.md, attention). `keep_large_allocations`
raises the mmap and trim thresholds to 1 GiB for CPU training, so such blocks stay in the heap
and are reused; the process keeps its peak resident size instead of returning it between steps,
which a training process reaches again at the next step anyway. PyTorch's CPU performance guide
gives the same reason for preloading jemalloc or tcmalloc; with one of those preloaded (or on a
C library other than glibc) `mallopt` is absent or ignored and nothing changes.
Set SCALETRAIN_KEEP_ALLOCATIONS=0 to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_VAR = "SCALETRAIN_KEEP_ALLOCATIONS"
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30


def keep_large_allocations() -> bool:
    """Raise glibc's mmap and trim thresholds to KEEP_BYTES; True when both were taken."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_VAR, "1") == "0":
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    )
