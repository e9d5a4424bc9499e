"""Quantized weights against bfloat16 on the bench model: how often the next-token choice stays the
same (top-1 agreement) and how far the next-token distributions move (KL divergence, nats).

The bench workload's 64 requests (bench/bench_engine.py) get 64 greedy tokens each from the
bfloat16 engine; then the bfloat16 model and each quantized one score the same sequences (prompt
and continuation, teacher-forced), and their distributions are compared at every generated position.
The bench model has random weights, so its distributions are flatter than a trained model's and
small weight errors move its argmax more easily: the float32 row (the same weights, unrounded)
shows how far rounding alone moves it. The demo model's closed accuracy and report F1
(docs/BENCHMARKS.md) are the task-level check.

    python bench/quant_quality.py [--model-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine  # noqa: E402


def continuations(folder: Path, reqs: list, out_tokens: int) -> list[list[int]]:
    from medlava.engine.llm_engine import LLMEngine
    from medlava.engine.sampling import SamplingParams
    from medlava.model.loader import load_model

    engine = LLMEngine(load_model(folder, dtype="bfloat16"), max_num_seqs=len(reqs))
    for i, (ids, pix) in enumerate(reqs):
        engine.add_request(f"r{i}", ids, [pix], SamplingParams(max_tokens=out_tokens, ignore_eos=True))
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o.token_ids for o in engine.step() if o.finished}
    return [done[f"r{i}"] for i in range(len(reqs))]


def compare(folder: Path, n_images: int = 16, out_tokens: int = 64, methods=("float32", "int8", "int4")) -> dict:
    """Per method (a quantization, or float32 weights: how far rounding alone moves the choices)."""
    import torch

    from medlava.model.loader import load_model

    _, reqs, _ = bench_engine.prepared(folder, n_images)
    conts = continuations(folder, reqs, out_tokens)
    models = {m: load_model(folder, dtype="float32" if m == "float32" else "bfloat16",
                            quantization=m if m.startswith("int") else None).model for m in ("bfloat16", *methods)}
    stats = {m: {"positions": 0, "top1_same": 0, "kl_sum": 0.0} for m in methods}
    with torch.inference_mode():
        for (ids, pix), cont in zip(reqs, conts, strict=True):
            seq = torch.tensor([ids + cont[:-1]])  # position len(ids) - 1 + k predicts cont[k]
            where = slice(len(ids) - 1, None)
            ref = torch.log_softmax(models["bfloat16"](seq, pixels=pix[None].bfloat16())[0, where].float(), dim=-1)
            for m in methods:
                pixels = pix[None].float() if m == "float32" else pix[None].bfloat16()
                logq = torch.log_softmax(models[m](seq, pixels=pixels)[0, where].float(), dim=-1)
                s = stats[m]
                s["positions"] += ref.shape[0]
                s["top1_same"] += int((ref.argmax(-1) == logq.argmax(-1)).sum())
                s["kl_sum"] += float((ref.exp() * (ref - logq)).sum())
    return {m: {"positions": s["positions"], "top1_agreement": s["top1_same"] / s["positions"],
                "kl_mean_nats": s["kl_sum"] / s["positions"]} for m, s in stats.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="the benchmark model (built there if absent)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    folder = bench_engine.build_model(Path(args.model_dir or Path(tempfile.gettempdir()) / "medlava-bench-model"))
    result = compare(folder)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print("| weights | positions | top-1 agreement with bf16 | mean KL(bf16 || q), nats |")
    print("|---|---|---|---|")
    for m, r in result.items():
        print(f"| {m} | {r['positions']} | {100 * r['top1_agreement']:.1f} % | {r['kl_mean_nats']:.4f} |")


if __name__ == "__main__":
    main()
