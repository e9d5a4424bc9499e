"""Host memory: keep freed tensor memory in the process on Linux CPUs, rather than handing it
back to the OS; and how much memory is still available.

glibc serves every allocation above its mmap threshold (at most 32 MiB, often far less) with a
fresh `mmap` and unmaps it on free, so each prefill step's activations are page-faulted in
again, zero-filled by the kernel: on the benchmark's 2-core CPU that cost a third of every
elementwise op and a tenth of every matmul. Raising the thresholds makes freed blocks reusable.
The price: the process keeps its peak heap instead of shrinking after a large batch.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # allocations above this still get their own mapping

_result: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc (once per process); False where that is not possible (no glibc: macOS, musl, Windows)."""
    global _result
    if _result is None:
        _result = False
        if platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _result = all(libc.mallopt(opt, KEEP_BYTES) == 1 for opt in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))
            except (OSError, AttributeError):
                pass
    return _result


def available_bytes() -> int | None:
    """What can still be allocated without swapping (Linux): MemAvailable from /proc/meminfo,
    capped by this process's cgroup v2 limit (containers see the host's meminfo). None elsewhere."""
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if found is not None and limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found = min(found, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return found
