"""Peer (d) of bench/bench_engine.py: the same workload through `vllm.LLM.generate` (vLLM CPU).

Runs inside the peer's own virtual environment (bench/peers/setup_vllm.sh), in its own process,
never imported by medlava. The bench writes a workload file and starts this script with the
peer's python and the tuned environment (bench/peers/vllm_peer.py); it prints one JSON line.

    bench/peers/.venv-vllm/bin/python bench/peers/vllm_runner.py WORKLOAD.json

WORKLOAD.json:
    model          the bench's model folder (medlava writes it in the llava-hf layout vLLM loads)
    dtype          "float32" or "bfloat16"
    max_tokens     output tokens per request (EOS ignored, greedy)
    image_tokens   image tokens per image (196): checked against what reaches the model
    requests       [{"prompt_token_ids": [...], "medlava_ids": [...], "image": "x.png"}]:
                   medlava's ids with one image placeholder (vLLM expands it), and medlava's
                   expanded ids, which must equal what reaches vLLM's model
    warmup         one more request of the same shape, on an image the workload never uses
    engine         keyword arguments for vllm.LLM (block_size, enable_prefix_caching, ...)
    result_path    (optional) where to write the JSON result as well
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


def layout_problem(folder: Path) -> str | None:
    """Why vLLM 0.32's llava loader would not load `folder`, or None. It wants the CLIP tower as
    `vision_tower.vision_model.*` (the llava-hf layout medlava writes); folders written by
    transformers 5 itself have `vision_tower.*`."""
    from safetensors import safe_open

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            if any(k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") for k in f.keys()):
                return (f"{folder} has its vision tower as vision_tower.* (written before medlava used the llava-hf "
                        "layout): delete it, and the bench builds it again")
    return None


def peak_rss_mb() -> float:
    """Peak RSS (VmHWM) of this process plus that of its children still alive (vLLM's engine core)."""
    import psutil

    def hwm(pid: int) -> float:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    me = psutil.Process()
    return hwm(me.pid) + sum(hwm(c.pid) for c in me.children(recursive=True))


def cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies of this process tree) so far."""
    import psutil

    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]
    hz = os.sysconf("SC_CLK_TCK")
    me = psutil.Process()
    own = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            own += t.user + t.system
        except psutil.Error:
            pass
    return busy, int(own * hz)


def main(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    import vllm
    from PIL import Image
    from vllm import LLM, SamplingParams

    model = Path(spec["model"])
    problem = layout_problem(model)
    if problem:
        raise SystemExit(problem)
    engine_args = dict(spec["engine"])
    llm = LLM(
        model=str(model),
        dtype=spec["dtype"],
        seed=0,
        limit_mm_per_prompt={"image": 1},
        **engine_args,
    )
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)

    def prompt(r):
        return {"prompt_token_ids": r["prompt_token_ids"], "multi_modal_data": {"image": Image.open(r["image"]).convert("RGB")}}

    # Warm-up on an image the workload never uses (one-time kernel setup and compilation).
    warm = llm.generate([prompt(spec["warmup"])], params, use_tqdm=False)
    reqs = spec["requests"]
    prompts = [prompt(r) for r in reqs]  # images decoded before the clock starts, as for medlava

    t0 = time.time()  # RequestOutput.metrics use wall-clock time.time()
    start, jiffies = time.perf_counter(), cpu_jiffies()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    busy, own = cpu_jiffies()
    background = max(0.0, ((busy - jiffies[0]) - (own - jiffies[1])) / os.sysconf("SC_CLK_TCK") / wall)

    # The ids that reached the model are medlava's, and each prompt holds image_tokens image tokens.
    image_id = json.loads((model / "config.json").read_text())["image_token_index"]
    same_ids = all(list(o.prompt_token_ids) == r["medlava_ids"] for o, r in zip(outs, reqs, strict=True))
    image_counts = sorted({list(o.prompt_token_ids).count(image_id) for o in outs})
    prompt_total = sum(len(o.prompt_token_ids) for o in outs)
    cached = sum(o.num_cached_tokens or 0 for o in outs)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    # TTFT from the common submit time, as for medlava's engine: the frontend stamps each request's
    # arrival (wall clock) and its first-token latency from there (needs log stats on).
    ttfts = [
        o.metrics.arrival_time + o.metrics.first_token_latency - t0
        for o in outs
        if o.metrics is not None and o.metrics.first_token_latency > 0
    ]
    ttft_source = "RequestOutput.metrics (arrival_time + first_token_latency)" if len(ttfts) == len(outs) else "n/a"
    result = {
        "vllm_version": vllm.__version__,
        "wall_s": wall,
        "requests": len(outs),
        "output_tokens": out_tokens,
        "tok_per_s": out_tokens / wall,
        "req_per_s": len(outs) / wall,
        "ids_equal_medlava": same_ids,
        "image_tokens_in_prompt": image_counts,
        "prefix_hit_rate": cached / prompt_total,
        "image_tokens_expected": spec["image_tokens"],
        "prompt_tokens": sorted({len(o.prompt_token_ids) for o in outs}),
        "warmup_output_tokens": len(warm[0].outputs[0].token_ids),
        "peak_rss_mb": peak_rss_mb(),
        "background_cpus": background,
        "engine": engine_args,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "OMP_", "KMP_")) or k == "LD_PRELOAD"},
        "ttft_source": ttft_source,
    }
    if ttft_source != "n/a":
        qs = statistics.quantiles(ttfts, n=10) if len(ttfts) > 1 else ttfts * 9
        result |= {"ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": qs[8]}
    if not same_ids or image_counts != [spec["image_tokens"]]:
        result["error"] = "the prompt that reached vLLM differs from medlava's (ids or image tokens)"
    # vLLM logs to stdout too: the result goes to its own file when the workload names one.
    if spec.get("result_path"):
        Path(spec["result_path"]).write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
