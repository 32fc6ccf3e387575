"""Freed tensor memory kept in the process while fastmask works on the CPU (glibc only).

glibc's malloc hands a freed block back to the OS when it is larger than its mmap threshold, or when the free space
at the top of the heap passes its trim threshold, and faults every page in again on the next allocation. A forward
pass allocates and frees megabytes per layer: with the defaults, scoring a width-16 resnet18 spent 20 to 40% of its
time in page faults (hundreds of thousands of minor faults a call, on a 2-core AMD EPYC) and a training step about
10%. Raising only one of the two thresholds made scoring slower still; with both, the faults went away. Freed memory
then stays with the process, up to TRIM_BYTES of free heap, instead of going back to the OS, as torch's CUDA caching
allocator does on the GPU. Elsewhere (macOS, musl) nothing changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
from typing import Optional

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's own ceiling for the mmap threshold on 64-bit machines
TRIM_BYTES = 512 * 2**20  # what CPU scoring may hold by default (scoring.DEFAULT_CPU_BUDGET_MB)

_applied: Optional[int] = None  # the trim threshold set in this process, 0 where it could not be


def keep_freed_memory() -> bool:
    """From now on keeps freed blocks up to MMAP_THRESHOLD_MAX on the heap, and up to TRIM_BYTES of free heap in the
    process. Applies once per process (later calls change nothing); True when glibc took both settings."""
    global _applied
    if _applied is not None:
        return _applied > 0
    _applied = 0
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1:
        _applied = TRIM_BYTES
    return _applied > 0


def kept_trim_bytes() -> Optional[int]:
    """The trim threshold keep_freed_memory set in this process; None before it ran, 0 where it could not."""
    return _applied
