"""Host memory: keep freed tensor memory in the process on Linux CPUs, rather than handing it
back to the OS (inference), or hand it back at once (quantizing a model as it loads); memory on
2 MB pages for weights that are read front to back; and how much memory is still available.

glibc serves every allocation above its mmap threshold (at most 32 MiB, often far less) with a
fresh `mmap` and unmaps it on free, so each prefill step's activations are page-faulted in
again, zero-filled by the kernel: on the benchmark's 2-core CPU that cost a third of every
elementwise op and a tenth of every matmul. Raising the thresholds makes freed blocks reusable.
The price: the process keeps its peak heap instead of shrinking after a large batch.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # allocations above this still get their own mapping

_result: bool | None = None


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    except (OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc (once per process); False where that is not possible (no glibc: macOS, musl, Windows)."""
    global _result
    if _result is None:
        _result = _mallopt(KEEP_BYTES, KEEP_BYTES)
    return _result


@contextmanager
def hand_back_freed_memory(threshold: int = 1 << 20) -> Iterator[None]:
    """Within the block, every allocation above `threshold` gets its own mapping, unmapped when it
    is freed. A loader that quantizes weight by weight makes temporaries several times the size of
    each quantized result; from the heap, they would leave holes between the results that keep
    the process near the full-precision model's size (seen: int4 1.8 GB against 0.8 GB of weights).
    Afterwards malloc keeps freed memory, as inference wants it (`keep_freed_memory`)."""
    _mallopt(threshold, threshold)
    try:
        yield
    finally:
        global _result
        _result = _mallopt(KEEP_BYTES, KEEP_BYTES)


HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` that starts on a 2 MB boundary, in memory Linux may back with
    2 MB pages (transparent huge pages on `madvise`, their default): a matrix read front to back
    then misses the TLB once every 2 MB rather than every 4 KB, which made batch-1 decode ~1.3x
    faster here (docs/BENCHMARKS.md). Pages are committed when first written. Plain memory where
    the OS has no such advice."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without transparent huge pages
        pass
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` mapped while a view lives
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


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
