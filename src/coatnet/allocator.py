"""glibc's malloc told to keep freed memory for reuse: what the commands that compute
(``coatnet train``, ``eval``, ``predict``, ``study``) do for their own process.

By default glibc serves a block above its mmap threshold (dynamic, at most 32 MiB) with a fresh
``mmap`` and gives it back to the kernel when it is freed, so the next step's block of that size is
page-faulted in again, 4 KiB at a time. A training step of CoAtNet-0 at 224 px makes such blocks all
through its forward and backward passes: about 300,000 page faults per step at batch 8. With the
threshold at 1 GiB and the heap trimmed only past 2 GiB, freed blocks stay in the heap and the next
step reuses them: no page faults, for a few percent more peak memory (docs/performance.md has the
figures). Settings of the user's own (``MALLOC_*``, or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``) are
left as they are, and so is any C library other than glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap, where a freed one is reused
TRIM_THRESHOLD = (1 << 31) - 1  # the heap shrinks only past 2 GiB free at its top (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Set this process's glibc malloc to keep freed memory; True when it did."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    own_settings = "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    if own_settings or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # else ctypes would pass larger values truncated
    # older glibc refuses a threshold above 32 MiB (half its heap size): then blocks up to 32 MiB are kept
    threshold_set = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and threshold_set
