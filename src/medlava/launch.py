"""The `medlava` command's entry point: it first gives its process the allocator CPU inference
wants, then runs the CLI.

tcmalloc serves the many short-lived tensors of a decode step faster than glibc's malloc (batch-1
decode ~5-10 % faster on the benchmark's machine, docs/BENCHMARKS.md); vLLM's CPU docs and torch's
own launcher (`python -m torch.backends.xeon.run_cpu`) preload it the same way. A preload only
takes effect when a process starts, so `medlava` re-executes itself once with LD_PRELOAD set
(same pid, arguments and environment otherwise). Nothing happens where tcmalloc is not installed
(Debian/Ubuntu: libtcmalloc-minimal4), off Linux, when an allocator (tcmalloc, jemalloc, mimalloc)
is already preloaded, or with MEDLAVA_TCMALLOC=0. Code that imports medlava (`medlava.LLM`) runs with its own process's allocator.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping

LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # gperftools' allocator, without and with its profiler
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}  # no stderr line per KV pool or weight file


def with_tcmalloc(env: Mapping[str, str]) -> dict[str, str] | None:
    """`env` with tcmalloc added to LD_PRELOAD, or None where nothing is to change (see above)."""
    preload = env.get("LD_PRELOAD", "")
    if not sys.platform.startswith("linux") or env.get("MEDLAVA_TCMALLOC") == "0" or "malloc" in preload:
        return None
    found = next((lib for lib in map(ctypes.util.find_library, LIBRARIES) if lib), None)
    if found is None:
        return None
    return QUIET | dict(env) | {"LD_PRELOAD": f"{found} {preload}".strip()}


def main() -> None:
    env = with_tcmalloc(os.environ)
    if env is not None:
        try:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
        except OSError:
            pass  # run with the allocator we have
    from medlava.cli import app

    app()
