"""glibc ``malloc`` settings for the processes that run pipelines.

With glibc's defaults, a pipeline call on the CPU gives much of its working memory
back to the kernel when it frees it (allocations above a moving threshold are
``mmap``-ed and unmapped, and the heap's free top is trimmed), and the next call
faults every page in again: thousands of page faults per job, about a tenth of a
small CPU job's time, and a few percent of jitter from one process to the next
depending on the threshold's history. :func:`tune` serves allocations up to 32 MiB
from the heap and keeps up to ``retain_mib`` of freed memory per arena for the next
job; :func:`trim` (called when a model is unloaded) hands all free memory back.

Only glibc has these knobs; elsewhere both functions do nothing and return False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("easel.hostmem")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (half its per-thread heap size)

_libc: ctypes.CDLL | None = None
_loaded = False


def _glibc() -> ctypes.CDLL | None:
    global _libc, _loaded
    if not _loaded:
        _loaded = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such symbol)
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                _libc = libc
            except (OSError, AttributeError):
                _libc = None
    return _libc


def tune(retain_mib: int) -> bool:
    """Keep freed memory for reuse (see module docstring); ``retain_mib`` 0 leaves
    glibc's defaults. True when the settings took effect."""
    libc = _glibc()
    if retain_mib <= 0 or libc is None:
        return False
    retain = min(retain_mib << 20, 2**31 - 1)  # mallopt takes an int
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, retain))
    if ok:
        log.debug(
            "malloc: heap allocations up to %d MiB, %d MiB of freed memory kept per arena", MMAP_THRESHOLD_MAX >> 20, retain >> 20
        )
    return ok


def trim() -> bool:
    """Return every free page of every arena to the kernel (``malloc_trim(0)``)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
