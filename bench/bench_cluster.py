"""Scale-out on this machine: `medlava serve` against `medlava serve --replicas 1` and `--replicas 2`
on Ray Serve, each engine given one CPU core, over HTTP, on the bench model and workload shape.

Workload: 16 images (bench_engine.make_images) x 4 questions, 32 output tokens each (EOS ignored),
bfloat16: every image's first question at once, then all the follow-ups at once, 16 clients.
Modes, each its own server process (started, measured, stopped in turn):

  plain        `medlava serve` with its torch limited to one thread (OMP_NUM_THREADS=1)
  ray-1        `medlava serve --replicas 1 --num-cpus-per-replica 1`: the Ray path's overhead
  ray-2        `medlava serve --replicas 2 --num-cpus-per-replica 1`: two engines, one core each

    python bench/bench_cluster.py [--model-dir DIR] [--rounds 2]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine  # noqa: E402

MODES = {
    "plain": [],
    "ray-1": ["--replicas", "1", "--num-cpus-per-replica", "1"],
    "ray-2": ["--replicas", "2", "--num-cpus-per-replica", "1"],
}
OUT_TOKENS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_urls(n: int) -> list[str]:
    out = []
    for im in bench_engine.make_images(n):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def run_mode(folder: Path, mode: str, images: list[str]) -> dict:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1") if mode == "plain" else dict(os.environ)
    cmd = [sys.executable, "-m", "medlava", "serve", "--model", str(folder), "--dtype", "bfloat16", "--port", str(port),
           "--max-queue", "1000", *MODES[mode]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]

        def ask(job) -> dict:
            image, question = job
            body = {"model": name, "max_tokens": OUT_TOKENS, "ignore_eos": True, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]}]}
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            r.raise_for_status()
            return r.json()["usage"]

        ask((images[-1], bench_engine.EXTRA))  # warm-up on an image outside the workload
        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            usage = list(pool.map(ask, [(im, bench_engine.REPORT) for im in images[:-1]]))
            usage += list(pool.map(ask, [(im, q) for im in images[:-1] for q in bench_engine.FOLLOW_UPS]))
        wall = time.perf_counter() - start
        tokens = sum(u["completion_tokens"] for u in usage)
        cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
        return {"mode": mode, "requests": len(usage), "tok_per_s": tokens / wall, "req_per_s": len(usage) / wall,
                "prefix_hit": cached / sum(u["prompt_tokens"] for u in usage)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="the benchmark model (built there if absent)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs per mode; the best counts")
    args = parser.parse_args(argv)
    folder = bench_engine.build_model(Path(args.model_dir or Path(tempfile.gettempdir()) / "medlava-bench-model"))
    images = data_urls(17)
    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for mode in MODES:
            r = run_mode(folder, mode, images)
            print(f"[round {round_ + 1}] {mode}: {r['tok_per_s']:.1f} tok/s, prefix hit {r['prefix_hit']:.2f}", file=sys.stderr)
            if mode not in best or r["tok_per_s"] > best[mode]["tok_per_s"]:
                best[mode] = r
    print("| mode | requests | output tok/s | requests/s | prefix-cache hit |")
    print("|---|---|---|---|---|")
    for r in best.values():
        print(f"| {r['mode']} | {r['requests']} | {r['tok_per_s']:.1f} | {r['req_per_s']:.2f} | {100 * r['prefix_hit']:.0f} % |")
    plain, one, two = best["plain"]["tok_per_s"], best["ray-1"]["tok_per_s"], best["ray-2"]["tok_per_s"]
    print(f"\nray-2 / ray-1: {two / one:.2f}x; ray-1 / plain (the Ray path's overhead): {one / plain:.2f}x")


if __name__ == "__main__":
    main()
