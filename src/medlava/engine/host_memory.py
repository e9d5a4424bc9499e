"""Keep freed tensor memory in the process on Linux CPUs, rather than handing it back to the OS.

glibc serves every allocation above its mmap threshold (at most 32 MiB, often far less) with a
fresh `mmap` and unmaps it on free, so each prefill step's activations are page-faulted in
again, zero-filled by the kernel: on the benchmark's 2-core CPU that cost a third of every
elementwise op and a tenth of every matmul. Raising the thresholds makes freed blocks reusable.
The price: the process keeps its peak heap instead of shrinking after a large batch.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # allocations above this still get their own mapping

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process; False where there is no glibc (macOS, musl, Windows)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
    except (OSError, AttributeError):
        return False
    return _done
