"""Keep freed step buffers in the C heap while ISNE trains on the CPU, instead of unmapping them.

A CPU training step at 10^6 nodes allocates a few buffers of ~100 MB (the sparse θ gradient, its
row-wise optimizer temporaries) and frees them at the end of the step. glibc's malloc serves every
allocation above its mmap threshold (at most 32 MB) with a fresh `mmap` and returns it with `munmap`
on free, so every step page-faults and zero-fills those buffers again. Measured on this box
(2 cores, 1e6-node graph, 10 steps, 5 runs each): 236-357 ms per step with the default, 195-198 ms
with mmap switched off for the duration (1e5 nodes: 124-131 -> 114-118 ms).

PyTorch has no caching allocator for CPU tensors, and LD_PRELOADing jemalloc/tcmalloc cannot be done
from inside a running process, so this sets glibc's own knobs with `mallopt` (`M_MMAP_MAX=0`:
every allocation from the heap; `M_TRIM_THRESHOLD` high: freed memory at its top is not returned
after every step), restores glibc's defaults afterwards and calls `malloc_trim(0)` so the memory
goes back to the system once training ends. Elsewhere (musl, macOS, Windows) it does nothing.

Side effects a user should know (off with `isne.keep_freed_memory=false`): the settings are
process-wide for the duration (other threads' large allocations also come from the heap meanwhile);
afterwards glibc's *defaults* are restored, not whatever the process had set itself; and glibc
stops adapting its mmap threshold once `mallopt` was called (its documented behaviour).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import platform
import threading
from typing import Iterator, Optional

log = logging.getLogger(__name__)

# mallopt parameters (<malloc.h>) and glibc's defaults for the two we change
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
KEEP_TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: "do not trim during training"

_lock = threading.Lock()
_depth = 0  # nested or concurrent users: the first one in sets, the last one out restores


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        # the soname, not ctypes.util.find_library: that one runs ldconfig/gcc in a subprocess
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, large allocations come from (and return to) the heap, not fresh mappings.

    Yields whether the setting took effect (False when disabled or not on glibc)."""
    global _depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _lock:
        ok = True
        if _depth == 0:
            ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD) == 1
            if not ok:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        if ok:
            _depth += 1
    if not ok:
        log.debug("mallopt refused the heap settings; training with the allocator's defaults")
        yield False
        return
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)


__all__ = ["keep_freed_memory"]
