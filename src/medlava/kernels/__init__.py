"""medlava's own CPU kernels (csrc/), compiled on first use for the CPU they run on.

torch has no paged attention for the CPU, so the engine brings one (`paged_attention.cpp`); the
decoder's chains of small elementwise ops run fused for inference (`fused.cpp`: RMSNorm with the
residual add, rotary embeddings, SwiGLU), as vLLM's CPU build does with its own kernels; linear
layers at one to three rows read their weights at the memory's speed (`gemv.cpp`); and int8
weights are dequantized in one pass (`quant.cpp`). They are built with torch's C++ extension
tooling the first time a process needs them (well under a minute; `make setup` does it ahead),
with ATen's vector code for this CPU's instruction set, into a folder named by the instruction
set, torch and Python versions and the sources' digest (`cache_dir()`), so a build is made once
and never stale. Where they cannot be built (no C++ compiler) or MEDLAVA_CPU_KERNELS=0, `ops()`
returns None and the engine and the decoder use their portable torch code (int8 dequantizes
with torch ops).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("paged_attention.cpp", "fused.cpp", "gemv.cpp", "quant.cpp")]
# ATen's vector code picks its instruction set from these macros (as torch's own CPU kernels do).
_AVX512 = ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
CAPABILITY_FLAGS = {
    "AVX512": _AVX512,
    "AVX512_BF16": [*_AVX512, "-mavx512bf16"],  # + bf16 attention and gemv on vdpbf16ps
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}

_ops = None
_tried = False


def ops():
    """`torch.ops.medlava` once the kernels are built and loaded, else None (said once in the log)."""
    global _ops, _tried
    if not _tried:
        _tried = True
        if os.environ.get("MEDLAVA_CPU_KERNELS", "1") == "0":
            log.info("medlava CPU kernels off (MEDLAVA_CPU_KERNELS=0): using the portable torch code")
        else:
            try:
                _ops = _build()
            except Exception as exc:  # no compiler, no ninja, a failed build: run slower, not not at all
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                reason = next((line for line in lines if "error:" in line), lines[-1])  # a compiler's first error
                log.warning("medlava CPU kernels unavailable (%s): using the portable torch code", reason.strip())
    return _ops


def cache_dir() -> Path:
    """Where builds go: $MEDLAVA_KERNELS_DIR, else medlava/kernels under $XDG_CACHE_HOME (~/.cache)."""
    if os.environ.get("MEDLAVA_KERNELS_DIR"):
        return Path(os.environ["MEDLAVA_KERNELS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medlava" / "kernels"


def _has_avx512_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 (bf16 attention and gemv then run on its dot-product instruction)."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def _build():
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512" and _has_avx512_bf16():
        capability = "AVX512_BF16"
    # One build folder per content of csrc/ (headers included) and instruction set: checkouts or
    # versions side by side never rebuild each other's, and a changed source always rebuilds.
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(CSRC.iterdir()))).hexdigest()[:16]
    build = cache_dir() / f"{capability}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    # No contraction of a * b + c into one fused multiply-add: the fused ops round as torch does.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", *CAPABILITY_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])]
    cpp_extension.load(
        name=f"medlava_cpu_kernels_{capability.lower()}",
        sources=[str(s) for s in SOURCES],
        build_directory=str(build),
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.medlava

