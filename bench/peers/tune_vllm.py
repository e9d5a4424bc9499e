"""Search vLLM CPU's settings for peer (d): each configuration in its own process, full workload.

    PYTHONPATH=src .venv/bin/python bench/peers/tune_vllm.py [--dtype bfloat16] [--only NAME ...]

Prints one line per configuration (output tok/s, TTFT p50, peak RSS, background CPUs) and a
JSON list at the end; the best goes into vllm_peer.ENGINE / ENV by hand, with the table in
docs/BENCHMARKS.md ("Peer (d): vLLM CPU").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import vllm_peer  # noqa: E402

UNTUNED = dict(
    engine={k: None for k in ("block_size", "enable_prefix_caching", "enable_chunked_prefill", "max_num_batched_tokens")},
    env={"VLLM_CPU_KVCACHE_SPACE": None, "VLLM_CPU_OMP_THREADS_BIND": None},
    preload=False,
)
# name: (engine overrides, env overrides, LD_PRELOAD tcmalloc + iomp); all else as vllm_peer.ENGINE / ENV.
CONFIGS = {
    "untuned": UNTUNED,
    "tuned": {},
    "no-preload": dict(preload=False),
    "bind-auto": dict(env={"VLLM_CPU_OMP_THREADS_BIND": "auto"}),
    "block-16": dict(engine={"block_size": 16}),
    "block-64": dict(engine={"block_size": 64}),
    "block-128": dict(engine={"block_size": 128}),
    "batched-2048": dict(engine={"max_num_batched_tokens": 2048}),
    "batched-8192": dict(engine={"max_num_batched_tokens": 8192}),
    "batched-16384": dict(engine={"max_num_batched_tokens": 16384}),
    "no-chunked": dict(engine={"enable_chunked_prefill": False, "max_num_batched_tokens": 16384}),
    "no-prefix": dict(engine={"enable_prefix_caching": False}),
    "in-process": dict(env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
    "eager": dict(engine={"enforce_eager": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--only", nargs="*", help=f"configurations to run (default: all of {', '.join(CONFIGS)})")
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "medlava-bench-model"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--out-tokens", type=int, default=64)
    args = parser.parse_args()
    import bench_engine

    folder = bench_engine.build_model(Path(args.model_dir))
    reqs, warmup, image_id, image_tokens = bench_engine.peer_inputs(folder, args.images)
    results = []
    for name in args.only or CONFIGS:
        c = CONFIGS[name]
        t0 = time.perf_counter()
        try:
            r = vllm_peer.run(
                folder, args.dtype, reqs, warmup, args.out_tokens, image_tokens, image_id,
                engine=c.get("engine"), env=c.get("env"), preload=c.get("preload", True),
            )
        except Exception as e:  # noqa: BLE001 (a configuration vLLM refuses is a result too)
            print(f"{name}: failed: {str(e)[-500:]}", flush=True)
            results.append({"name": name, "error": str(e)[-2000:]})
            continue
        r["name"] = name
        results.append(r)
        print(
            f"{name}: {r['tok_per_s']:.1f} tok/s, TTFT p50 {r.get('ttft_p50_s', float('nan')):.2f} s, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB, background {r['background_cpus']:.2f} CPUs, "
            f"{time.perf_counter() - t0:.0f} s | {vllm_peer.settings_line(r)}",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
