"""Throughput benchmark: medlava's paged engine against Hugging Face `generate` on the same weights.

Workload: a random-weight LLaVA of realistic proportions (CLIP ViT-S/16 at 224 px, a ~100M
parameter Mistral-style decoder with grouped-query attention and a 32k vocabulary), 64 requests
over 16 distinct images (a report request and three follow-up questions per image, ~30 text
tokens each), 64 output tokens per request (EOS ignored). For float32 and bfloat16:

  (a) HF `LlavaForConditionalGeneration.generate`, one request at a time (on a subset: slow)
  (b) HF `generate` in static batches of 16, left padded
  (c) medlava's `LLMEngine`, all requests submitted at once
  (d) with `--peer vllm`: vLLM CPU's `LLM.generate` on the same token ids and images, all at once,
      in its own virtual environment (bench/peers/, set up by bench/peers/setup_vllm.sh)
  (c int8), (c int4) with `--quantization`: mode (c) on weight-only quantized decoder layers

Each (mode, dtype) runs in its own subprocess so peak RSS is its own. TTFT counts from when a
request is handed over: each `generate` call in (a) and (b), the common submit time in (c).

    python bench/bench_engine.py            # full run, writes docs/BENCHMARKS.md
    python bench/bench_engine.py --quick    # a small smoke run, prints only
    python bench/bench_engine.py --peer vllm   # adds mode (d)
    python bench/bench_engine.py --quantization int8 --quantization int4   # adds quantized (c) rows
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medlava.errors import MedlavaError
from medlava.launch import with_tcmalloc
from medlava.model.quant import check_quantization

ROOT = Path(__file__).resolve().parents[1]



def _best_time(f, n: int = 5) -> float:
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_rooflines() -> dict:
    """This machine's peak matmul GFLOP/s per dtype (best of 2048^3 products), measured in the run
    (machines differ: AVX-512 or AMX)."""
    import torch

    out = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        out[name] = 2 * 2048**3 / _best_time(lambda: torch.mm(a, b)) / 1e9  # noqa: B023
    return out


def streaming_gbs() -> float:
    """The GB/s at which this machine streams weights, the most batch-1 decode can reach: the best of
    a 256 MB read and a 128 MB bf16 GEMV. Measured in the engine's worker right after its batch-1
    decode, since the host's memory bandwidth drifts over minutes (other tenants)."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(64 << 20)
    w, v = torch.randn(16384, 4096, dtype=torch.bfloat16), torch.randn(1, 4096, dtype=torch.bfloat16)
    return max(x.nbytes / _best_time(x.sum), w.nbytes / _best_time(lambda: F.linear(v, w))) / 1e9


MODEL_DIMS = dict(
    text_model="mistral",
    hidden_size=768,
    layers=12,
    heads=12,
    kv_heads=4,
    intermediate_size=2048,
    vision_hidden=384,
    vision_layers=12,
    vision_heads=6,
    vision_intermediate=1536,
    image_size=224,
    patch_size=16,
)
VOCAB = 32000

REPORT = "Write a structured radiology report for this study: describe the findings in each region, then give a short impression."
FOLLOW_UPS = [
    "Is there a pleural effusion on either side, and if so, how large is it and does it blunt the costophrenic angle on this view?",
    "Are the heart size and the mediastinal contours within normal limits on this view, or is there cardiomegaly or a widened mediastinum?",
    "Is there any focal consolidation, nodule or mass in either lung; where exactly is it, and how big does it look on this study?",
]
EXTRA = "What modality is this study, and which body part and projection does it show? Answer in one sentence."

WORDS = (
    "the of and a to in is there no with on for right left lung lungs chest heart size normal "
    "effusion pleural nodule mass consolidation opacity findings impression study radiograph ct mri "
    "view projection mediastinal contours cardiomegaly pneumothorax fracture bone soft tissue acute "
    "chronic small large mild moderate severe upper lower lobe base apex angle costophrenic blunting "
    "describe report structured region short give answer sentence which body part modality within "
    "limits focal where exactly how big does it look any either side if so blunt what this are widened mediastinum"
).split()


def corpus(n: int = 60000, seed: int = 0):
    """Clinical-sounding sentences plus pseudo-words, enough for a 32k-token BPE vocabulary."""
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ae", "ou", "ia")]
    yield from (REPORT, EXTRA, *FOLLOW_UPS)
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        words += ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(2, 6))]
        rng.shuffle(words)
        yield " ".join(words).capitalize() + "."


def build_model(folder: Path, quiet: bool = True) -> Path:
    """The benchmark model (built once, reused when the folder already holds it)."""
    if (folder / "config.json").is_file():
        return folder
    from medlava.chat.bpe import train_bpe_tokenizer
    from medlava.model.random_init import save_random_llava

    tokenizer = train_bpe_tokenizer(corpus(), VOCAB)
    if len(tokenizer) < VOCAB:  # the corpus ran out of merges: pad with unused tokens
        tokenizer.add_tokens([f"<unused{i}>" for i in range(VOCAB - len(tokenizer))])
    save_random_llava(
        folder,
        tokenizer=tokenizer,
        widen_init=False,
        extra_config={"conv_mode": "mistral_instruct", "image_aspect_ratio": "pad"},
        **MODEL_DIMS,
    )
    return folder


def make_images(n: int, seed: int = 0):
    """n distinct synthetic grey 'radiographs' (smooth structure plus noise), non-square."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:280]
    out = []
    for _ in range(n):
        fx, fy, phase = rng.uniform(3, 12), rng.uniform(3, 12), rng.uniform(0, 6.3)
        arr = 128 + 60 * np.sin(x / fx + phase) * np.cos(y / fy) + rng.normal(0, 12, x.shape)
        out.append(Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L"))
    return out


def workload(n_images: int, seed: int = 0) -> list[tuple[int, str]]:
    """(image index, question) pairs: a report request then the follow-ups, image by image."""
    return [(i, q) for i in range(n_images) for q in (REPORT, *FOLLOW_UPS)]


# -- workers (one per subprocess) ------------------------------------------------------------------


def cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies of this process) so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime


def background_load(start: tuple[int, int], wall: float) -> float:
    """CPUs' worth of work other processes did since `start` (0 on a quiet machine)."""
    busy, own = cpu_jiffies()
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((busy - start[0]) - (own - start[1])) / hz / wall)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Inputs:
    """Tokenizer, preprocessing and prompt template of the model folder (no weights loaded)."""

    def __init__(self, folder: Path):
        from medlava.chat.image_processing import ImageProcessing
        from medlava.model.loader import default_conv_mode, hf_config, load_tokenizer, read_json

        raw = read_json(folder / "config.json")
        self.config = hf_config(folder, raw)
        self.tokenizer = load_tokenizer(folder)
        self.conv_mode = default_conv_mode(raw, "hf", self.config)
        self.proc = ImageProcessing.from_file(
            folder / "preprocessor_config.json", raw.get("image_aspect_ratio", "crop"), self.config.vision.image_size
        )

    def pixels(self, image):
        from medlava.chat.image_processing import preprocess

        return preprocess(image, self.proc)

    def prompt_ids(self, question: str) -> list[int]:
        from medlava.chat.templates import build_prompt
        from medlava.chat.tokenize import tokenize_prompt

        prompt = build_prompt(self.conv_mode, question)
        return tokenize_prompt(self.tokenizer, prompt, self.config.image_token_id, self.config.image_tokens)


def prepared(folder: Path, n_images: int):
    """Each request's prompt ids and pixels, built the same way for every mode, plus two spare images."""
    inputs = Inputs(folder)
    pixels = [inputs.pixels(im) for im in make_images(n_images + 2)]
    reqs = [(inputs.prompt_ids(question), pixels[img]) for img, question in workload(n_images)]
    extras = [pixels[n_images], pixels[n_images + 1]]  # never in the workload: warm-up and batch-1 probe
    return inputs, reqs, extras


def peer_inputs(folder: Path, n_images: int):
    """For a peer that preprocesses images itself: each request's prompt ids and its image padded to
    square as medlava pads it (the peer's CLIP resize and crop then give medlava's pixels), the
    warm-up pair, and the image placeholder's id and count."""
    from medlava.chat.image_processing import pad_to_square

    inputs = Inputs(folder)
    images = [pad_to_square(im.convert("RGB"), inputs.proc.mean) for im in make_images(n_images + 2)]
    reqs = [(inputs.prompt_ids(question), images[img]) for img, question in workload(n_images)]
    warmup = (reqs[0][0], images[n_images])
    return reqs, warmup, inputs.config.image_token_id, inputs.config.image_tokens


def peer_module(peer: str):
    """The medlava side of a peer (bench/peers/), which runs the peer in its own environment."""
    if peer != "vllm":
        raise MedlavaError(f"--peer must be vllm, got {peer}")
    peers = str(Path(__file__).resolve().parent / "peers")
    if peers not in sys.path:
        sys.path.insert(0, peers)
    import vllm_peer

    return vllm_peer


def worker_peer(folder: Path, dtype: str, n_images: int, out_tokens: int, peer: str) -> dict:
    """Mode (d): the peer runs in its own process, started from here (bench/peers/)."""
    vllm_peer = peer_module(peer)
    reqs, warmup, image_id, image_tokens = peer_inputs(folder, n_images)
    result = vllm_peer.run(folder, dtype, reqs, warmup, out_tokens, image_tokens, image_id)
    return result | {"settings": vllm_peer.settings_line(result)}


def summary(ttfts: list[float], wall: float, n_req: int, out_tokens: int) -> dict:
    qs = statistics.quantiles(ttfts, n=10) if len(ttfts) > 1 else ttfts * 9
    return {
        "wall_s": wall,
        "requests": n_req,
        "output_tokens": out_tokens,
        "tok_per_s": out_tokens / wall,
        "req_per_s": n_req / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p90_s": qs[8],
    }


def worker_hf(folder: Path, dtype: str, mode: str, n_images: int, out_tokens: int, subset: int, batch: int) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    _, reqs, extras = prepared(folder, n_images)
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 3

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.t = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.t is None:  # the first put is the prompt
                self.t = time.perf_counter()

        def end(self):
            pass

    def run(group):
        width = max(len(ids) for ids, _ in group)
        ids = torch.tensor([[3] * (width - len(i)) + i for i, _ in group])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in group])
        pix = torch.stack([p for _, p in group]).to(getattr(torch, dtype))
        streamer = FirstToken()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=out_tokens,
                do_sample=False, streamer=streamer,
            )
        assert out.shape[1] - width == out_tokens
        return t0, streamer.t, time.perf_counter()

    run([(reqs[0][0], extras[0])])  # warm-up (one-time kernel setup), on an image the workload never uses
    groups = [[r] for r in reqs[:subset]] if mode == "a" else [reqs[i : i + batch] for i in range(0, len(reqs), batch)]
    ttfts, start, jiffies = [], time.perf_counter(), cpu_jiffies()
    for group in groups:
        t0, t_first, _ = run(group)
        ttfts += [t_first - t0] * len(group)
    wall = time.perf_counter() - start
    n = sum(len(g) for g in groups)
    return summary(ttfts, wall, n, n * out_tokens) | {
        "peak_rss_mb": peak_rss_mb(),
        "background_cpus": background_load(jiffies, wall),
    }


def decoder_flops(cfg) -> dict:
    """Matmul FLOPs per unit of work for the rooflines."""
    t, v = cfg.text, cfg.vision
    d, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    per_layer = d * t.num_attention_heads * t.head_dim * 2 + d * kv * 2 + 3 * d * t.intermediate_size
    linear = 2 * per_layer * t.num_hidden_layers
    n_tok = v.num_patches + 1
    vit_layers = v.num_hidden_layers + cfg.vision_feature_layer + 1 if cfg.vision_feature_layer < 0 else cfg.vision_feature_layer
    vit_layer = 2 * n_tok * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * n_tok**2 * v.hidden_size
    vision = vit_layers * vit_layer + 2 * v.num_patches * (3 * v.patch_size**2 * v.hidden_size)
    vision += 2 * cfg.image_tokens * (v.hidden_size * d + d * d)  # projector
    return {
        "token": linear,
        "logits": 2 * d * t.vocab_size,
        "attn_pair": 4 * t.num_attention_heads * t.head_dim,
        "image": vision,
        "weight_params": per_layer * t.num_hidden_layers + d * t.vocab_size,
    }


def worker_engine(
    folder: Path, dtype: str, n_images: int, out_tokens: int, max_batched: int, block_size: int,
    quantization: str | None = None,
) -> dict:
    import torch

    from medlava.engine.llm_engine import LLMEngine
    from medlava.engine.sampling import SamplingParams
    from medlava.model.loader import load_model

    inputs, reqs, extras = prepared(folder, n_images)
    lm = load_model(folder, dtype=dtype, quantization=quantization)
    # KV blocks for every request at full length, as if nothing were shared (+ the probes).
    num_blocks = sum(-(-(len(ids) + out_tokens) // block_size) for ids, _ in reqs) + 64
    engine = LLMEngine(
        lm, block_size=block_size, num_blocks=num_blocks, max_num_seqs=len(reqs), max_num_batched_tokens=max_batched
    )
    params = SamplingParams(max_tokens=out_tokens, ignore_eos=True)
    counter = iter(range(10**6))

    def drain():
        done = {}
        while engine.has_unfinished():
            done |= {o.request_id: o for o in engine.step() if o.finished}
        return done

    def one(ids, pix, n_tokens=out_tokens):
        rid = f"probe{next(counter)}"
        engine.add_request(rid, ids, [pix], SamplingParams(max_tokens=n_tokens, ignore_eos=True))
        return drain()[rid]

    # Warm-up on an image the workload never uses (one-time kernel setup).
    one(reqs[0][0], extras[0], 4)

    stats0 = dict(engine.runner.stats.__dict__)
    start, jiffies = time.perf_counter(), cpu_jiffies()
    for i, (ids, pix) in enumerate(reqs):
        engine.add_request(f"r{i}", ids, [pix], params)
    done = drain()
    wall = time.perf_counter() - start
    background = background_load(jiffies, wall)
    s = {k: v - stats0[k] for k, v in engine.runner.stats.__dict__.items()}
    m = engine.metrics()
    ttfts = [o.metrics.time_to_first_token for o in done.values()]
    result = summary(ttfts, wall, len(done), sum(len(o.token_ids) for o in done.values()))

    f = decoder_flops(lm.config)
    prefill_flops = (
        s["prefill_tokens"] * f["token"] + s["prefill_attn_pairs"] * f["attn_pair"]
        + len(reqs) * f["logits"] + s["images_encoded"] * f["image"]
    )
    decode_flops = s["decode_tokens"] * (f["token"] + f["logits"]) + s["decode_attn_pairs"] * f["attn_pair"]
    result |= {
        "prefill_gflops": prefill_flops / s["prefill_time"] / 1e9,
        "prefill_tokens": s["prefill_tokens"],
        "prefill_time_s": s["prefill_time"],
        "decode_gflops": decode_flops / s["decode_time"] / 1e9,
        "decode_tok_per_s": s["decode_tokens"] / s["decode_time"],
        "decode_time_s": s["decode_time"],
        "decode_steps": s["decode_steps"],
        "images_encoded": s["images_encoded"],
        "prefix_hit_rate": m.prefix_cache_hit_rate,
        "vision_hit_rate": m.vision_cache_hit_rate,
        "preemptions": m.preemptions,
        "kv_blocks_total": m.kv_blocks_total,
        "background_cpus": background,
    }

    # Follow-up TTFT: the first question on an unseen image, then a follow-up on it (median of 5 images).
    firsts, follows = [], []
    for probe in make_images(5, seed=4242):
        pix = inputs.pixels(probe)
        firsts.append(one(inputs.prompt_ids(REPORT), pix, 1).metrics)
        follows.append(one(inputs.prompt_ids(EXTRA), pix, 1).metrics)
    result["first_ttft_s"] = statistics.median(m.time_to_first_token for m in firsts)
    result["follow_up_ttft_s"] = statistics.median(m.time_to_first_token for m in follows)
    result["follow_up_cached_tokens"] = follows[0].cached_prompt_tokens
    result["prompt_tokens_mean"] = statistics.mean(len(ids) for ids, _ in reqs)
    result["image_tokens"] = lm.config.image_tokens
    result["peak_rss_mb"] = peak_rss_mb()
    result["kv_cache_mb"] = engine.runner.pool.nbytes / 2**20

    # Batch-1 decode (weight-read bound) on an image outside the workload, three times, each
    # followed at once by the streaming roofline (after the peak RSS: its buffers are not the
    # engine's); the medians of both, since the host's bandwidth jumps for moments ("Rooflines").
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    rates, roofs = [], []
    for _ in range(3):
        stats1 = dict(engine.runner.stats.__dict__)
        solo = one(reqs[1][0], extras[1])
        steps = engine.runner.stats.decode_steps - stats1["decode_steps"]
        rates.append(steps / (engine.runner.stats.decode_time - stats1["decode_time"]))
        roofs.append(streaming_gbs())
        result.setdefault("b1_ttft_s", solo.metrics.time_to_first_token)  # the first: nothing cached
    result["b1_decode_tok_per_s"] = statistics.median(rates)
    result["b1_decode_gbs"] = f["weight_params"] * itemsize * result["b1_decode_tok_per_s"] / 1e9
    result["b1_roofline_gbs"] = statistics.median(roofs)
    assert engine.block_manager.all_free()
    return result


# -- driver --------------------------------------------------------------------------------------


def _spawn(args: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args["mode"] == "c":  # the engine as the `medlava` command runs it (medlava/launch.py: tcmalloc)
        env = with_tcmalloc(env) or env
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise MedlavaError(f"benchmark worker {args['mode']} {args['dtype']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(
    quick: bool = False,
    *,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    model_dir: str | Path | None = None,
    write: bool | None = None,
    max_batched: int = 4096,
    block_size: int = 16,
    rounds: int | None = None,
    budget_s: float = 9 * 60,
    doc: str | Path = ROOT / "docs" / "BENCHMARKS.md",
    peer: str | None = None,
    quantizations: tuple[str, ...] = (),
    log=print,
) -> dict:
    """Run the benchmark; returns {dtype: {mode: results}} (modes "a" to "d", and "c int8" etc.).

    Writes the doc only for the documented configuration (full workload, both dtypes, the
    engine's default block size) unless `write` says otherwise. `peer="vllm"` adds mode (d),
    `quantizations` mode (c) on quantized weights.
    """
    if block_size < 1:
        raise MedlavaError(f"--block-size must be at least 1, got {block_size}")
    for q in quantizations:
        check_quantization(q)
    if peer is not None:
        peer_module(peer).check()  # before the first mode runs, not after ten minutes
    n_images = 4 if quick else 16
    out_tokens = 16 if quick else 64
    subset = 2 if quick else 8
    rounds = rounds or (1 if quick else 2)
    folder = Path(model_dir) if model_dir else Path(tempfile.gettempdir()) / "medlava-bench-model"
    log(f"model: {folder} (building if absent)")
    build_model(folder)
    results: dict = {dtype: {} for dtype in dtypes}
    modes = [*("abcd" if peer else "abc"), *(f"c {q}" for q in quantizations)]
    runs: dict = {(dtype, key): [] for dtype in dtypes for key in modes}
    started = time.perf_counter()
    common = dict(folder=str(folder), n_images=n_images, out_tokens=out_tokens)
    plan = {
        "a": dict(mode="a", subset=subset, batch=1),
        "b": dict(mode="b", subset=0, batch=16),
        "c": dict(mode="c", max_batched=max_batched, block_size=block_size),
        "d": dict(mode="d", peer=peer),
    } | {f"c {q}": dict(mode="c", max_batched=max_batched, block_size=block_size, quantization=q) for q in quantizations}
    # The machine's speed drifts (other tenants, memory bandwidth): every mode runs once per
    # round, rounds interleave the modes, and each mode keeps its best run. A run that shared
    # its CPUs with other processes (background load >= 0.2 CPUs) only counts if no other did.
    for round_ in range(rounds):
        if round_ and time.perf_counter() - started > budget_s:
            log(f"time budget spent: {round_} round(s)")
            break
        for dtype in dtypes:
            for key in modes:
                extra = plan[key]
                t0 = time.perf_counter()
                r = _spawn(common | extra | {"dtype": dtype}, timeout=1800)
                runs[dtype, key].append(r)
                log(
                    f"[round {round_ + 1}, {dtype}] mode {key}: {time.perf_counter() - t0:.0f} s, "
                    f"{r['tok_per_s']:.1f} tok/s, background load {r['background_cpus']:.2f} CPUs"
                )
    for (dtype, key), rs in runs.items():
        quiet = [r for r in rs if r["background_cpus"] < 0.2] or [min(rs, key=lambda r: r["background_cpus"])]
        results[dtype][key] = max(quiet, key=lambda r: r["tok_per_s"]) | {"runs": len(rs)}
    table = format_table(results, n_images * 4, out_tokens, subset, quick, block_size, rooflines=measure_rooflines())
    log(table)
    documented = not quick and set(dtypes) == {"float32", "bfloat16"} and block_size == 16
    if documented if write is None else write:
        write_doc(Path(doc), table)
        log(f"wrote {doc}")
    elif not quick:
        log(f"not written to {doc}: only runs of both dtypes with 16-token blocks are recorded there")
    return results


def _secs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"  # vLLM reports no TTFT without its stats


MODE_NAMES = {"a": "hf_one", "b": "hf_static", "c": "medlava", "d": "vllm"}  # in --json rows (c int8: medlava)


def json_rows(results: dict) -> list[dict]:
    """One row per (dtype, mode) for other tools (`medlava bench --json`)."""
    rows = []
    for dtype, modes in results.items():
        for key, r in modes.items():
            follow_up = r["follow_up_ttft_s"] / r["first_ttft_s"] if "follow_up_ttft_s" in r else None
            mode, _, quantization = key.partition(" ")
            rows.append({
                "mode": MODE_NAMES[mode], "dtype": dtype, "quantization": quantization or None, "requests": r["requests"],
                "tok_per_s": r["tok_per_s"], "req_per_s": r["req_per_s"], "ttft_p50_s": r.get("ttft_p50_s"),
                "ttft_p90_s": r.get("ttft_p90_s"), "follow_up_ttft_ratio": follow_up, "peak_rss_mb": r["peak_rss_mb"],
                "background_cpus": r["background_cpus"],
            })
    return rows


TARGETS = {"c/a": 8.0, "c/b": 3.0, "follow-up": 0.20, "c/d": 1.0, "batch-1": 0.60}


def format_table(
    results: dict, n_req: int, out_tokens: int, subset: int, quick: bool = False, block_size: int = 16, *,
    rooflines: dict,
) -> str:
    """The results as Markdown; `rooflines` from measure_rooflines(), the streaming roofline from (c)'s own run."""
    names = {
        "a": f"(a) HF generate, one at a time (first {subset} of {n_req})",
        "b": "(b) HF generate, static batches of 16",
        "c": "(c) medlava engine, all at once",
        "d": "(d) vLLM CPU, all at once",
    } | {key: f"(c) medlava engine, {key[2:]} weights" for modes in results.values() for key in modes if key.startswith("c ")}
    lines = [
        "| dtype | mode | requests | output tok/s | requests/s | TTFT p50 (s) | TTFT p90 (s) | peak RSS (MB) | background CPUs |",
        "|" + "---|" * 9,
    ]
    for dtype, modes in results.items():
        for key in [*(k for k in "abcd" if k in modes), *sorted(k for k in modes if k.startswith("c "))]:
            r = modes[key]
            lines.append(
                f"| {dtype} | {names[key]} | {r['requests']} | {r['tok_per_s']:.1f} | {r['req_per_s']:.3f} | "
                f"{_secs(r.get('ttft_p50_s'))} | {_secs(r.get('ttft_p90_s'))} | {r['peak_rss_mb']:.0f} | "
                f"{r['background_cpus']:.2f} |"
            )
    lines += [
        "",
        "| dtype | c/a tok/s | c/b tok/s | engine prefill GFLOP/s | engine decode GFLOP/s (whole batch) | "
        "batch-1 decode: tok/s, weight GB/s | follow-up TTFT / first | prefix-cache hit | vision-cache hit |",
        "|" + "---|" * 9,
    ]
    checks = []
    for dtype, modes in results.items():
        a, b, c = modes["a"], modes["b"], modes["c"]
        roof, roof_gbs = rooflines[dtype], c["b1_roofline_gbs"]
        ca, cb = c["tok_per_s"] / a["tok_per_s"], c["tok_per_s"] / b["tok_per_s"]
        fu = c["follow_up_ttft_s"] / c["first_ttft_s"]
        b1 = c["b1_decode_gbs"] / roof_gbs
        cd = c["tok_per_s"] / modes["d"]["tok_per_s"] if "d" in modes else None
        lines.append(
            f"| {dtype} | {ca:.1f}x | {cb:.1f}x | "
            f"{c['prefill_gflops']:.0f} ({100 * c['prefill_gflops'] / roof:.0f} % of {roof:.0f}) | "
            f"{c['decode_gflops']:.0f} ({100 * c['decode_gflops'] / roof:.0f} % of {roof:.0f}) | "
            f"{c['b1_decode_tok_per_s']:.1f}, {c['b1_decode_gbs']:.1f} "
            f"({100 * c['b1_decode_gbs'] / roof_gbs:.0f} % of {roof_gbs:.0f}) | "
            f"{c['follow_up_ttft_s']:.3f} s / {c['first_ttft_s']:.3f} s = {100 * fu:.0f} % | "
            f"{100 * c['prefix_hit_rate']:.0f} % | {100 * c['vision_hit_rate']:.0f} % |"
        )
        ok = lambda cond: "met" if cond else "MISSED"  # noqa: E731
        checks.append(
            f"- {dtype}: c/a {ca:.1f}x (target >= {TARGETS['c/a']:.0f}x: {ok(ca >= TARGETS['c/a'])}), "
            f"c/b {cb:.1f}x (>= {TARGETS['c/b']:.0f}x: {ok(cb >= TARGETS['c/b'])}), "
            f"follow-up TTFT {100 * fu:.0f} % of the first (<= {100 * TARGETS['follow-up']:.0f} %: "
            f"{ok(fu <= TARGETS['follow-up'])}), batch-1 decode {100 * b1:.0f} % of the weight-streaming "
            f"roofline (>= {100 * TARGETS['batch-1']:.0f} %: {ok(b1 >= TARGETS['batch-1'])})"
            + (f", c/d {cd:.2f}x (>= {TARGETS['c/d']:.1f}x: {ok(cd >= TARGETS['c/d'])})" if "d" in modes else "")
        )
    lines += ["", f"Engine: {block_size}-token KV blocks, prefix caching on, {out_tokens} output tokens per request."]
    peer = {dtype: modes["d"] for dtype, modes in results.items() if "d" in modes}
    if peer:
        lines += ["", "| dtype | c/d tok/s | c/d requests/s | TTFT p50 (c) / (d) | prefix-cache hit (d) | vLLM settings |",
                  "|" + "---|" * 6]
        for dtype, d in peer.items():
            c = results[dtype]["c"]
            lines.append(
                f"| {dtype} | {c['tok_per_s'] / d['tok_per_s']:.2f}x | {c['req_per_s'] / d['req_per_s']:.2f}x | "
                f"{_secs(c['ttft_p50_s'])} s / {_secs(d.get('ttft_p50_s'))} s | {100 * d['prefix_hit_rate']:.0f} % | "
                f"{d['settings']} |"
            )
        lines += ["", "(d)'s peak RSS adds up vLLM's processes (front end, engine core, worker); its prompts "
                  "were checked to be medlava's ids with 196 image tokens."]
    quantized = [(dtype, key) for dtype, modes in results.items() for key in modes if key.startswith("c ")]
    if quantized:
        lines += ["", "| dtype | weights | output tok/s (vs c) | batch-1 decode tok/s (vs c) | peak RSS MB (vs c) |",
                  "|" + "---|" * 5]
        for dtype, key in quantized:
            c, q = results[dtype]["c"], results[dtype][key]
            lines.append(
                f"| {dtype} | {key[2:]} | {q['tok_per_s']:.1f} ({q['tok_per_s'] / c['tok_per_s']:.2f}x) | "
                f"{q['b1_decode_tok_per_s']:.1f} ({q['b1_decode_tok_per_s'] / c['b1_decode_tok_per_s']:.2f}x) | "
                f"{q['peak_rss_mb']:.0f} ({q['peak_rss_mb'] / c['peak_rss_mb']:.2f}x) |"
            )
    if quick:
        return "\n".join(lines + ["", "(--quick: a small workload; the targets apply to the full run)"])
    return "\n".join(lines + ["", "Targets:", "", *checks])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in cpuinfo)
    except OSError:
        pass
    return (
        f"{cpu} ({flags or platform.machine()}), {os.cpu_count()} cores, {platform.system()}, "
        f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def write_doc(path: Path, table: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = f"### Results, {stamp}\n\nMachine: {machine()}\n\n{table}\n"
    old = path.read_text() if path.exists() else ""
    marker = "<!-- bench_engine results -->"
    if marker in old:  # replace the last results, up to the next section
        head, _, rest = old.partition(marker)
        _, heading, tail = rest.partition("\n## ")
        path.write_text(f"{head}{marker}\n\n{section}" + (f"\n## {tail}" if heading else ""))
    else:
        path.write_text((old.rstrip() + "\n\n" if old else "") + f"{marker}\n\n{section}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workload, nothing written")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"], help="default: both")
    parser.add_argument("--model-dir", help="where the benchmark model is (built there if absent)")
    parser.add_argument("--rounds", type=int, help="runs per mode, interleaved; the best counts (default 2, quick 1)")
    parser.add_argument("--block-size", type=int, default=16, help="the engine's KV block size (default 16)")
    parser.add_argument("--peer", choices=["vllm"], help="add mode (d): vLLM CPU (bash bench/peers/setup_vllm.sh first)")
    parser.add_argument("--json", action="store_true", help="print every row as JSON on stdout (the log goes to stderr)")
    parser.add_argument("--quantization", action="append", choices=["int8", "int4"], help="add mode (c) on quantized weights (repeat)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        w = json.loads(args.worker)
        folder = Path(w["folder"])
        if w["mode"] == "c":
            res = worker_engine(
                folder, w["dtype"], w["n_images"], w["out_tokens"], w["max_batched"], w["block_size"],
                w.get("quantization"),
            )
        elif w["mode"] == "d":
            res = worker_peer(folder, w["dtype"], w["n_images"], w["out_tokens"], w["peer"])
        else:
            res = worker_hf(folder, w["dtype"], w["mode"], w["n_images"], w["out_tokens"], w["subset"], w["batch"])
        print(json.dumps(res))
        return
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    results = run_benchmark(
        args.quick, dtypes=tuple(args.dtype or ("float32", "bfloat16")), model_dir=args.model_dir, rounds=args.rounds,
        block_size=args.block_size, peer=args.peer, quantizations=tuple(args.quantization or ()), log=log,
    )
    if args.json:
        print(json.dumps(json_rows(results), indent=1))


if __name__ == "__main__":
    main()
