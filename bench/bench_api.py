"""The bench workload through the public API: `medlava.LLM(folder).generate` on text prompts
(rendered with the model's template) and PIL images, against the engine mode (c) of
bench/bench_engine.py, which hands the engine token ids and preprocessed pixels.

    python bench/bench_api.py [--dtype bfloat16] [--model-dir DIR]

Prints output tok/s of both, in one process each (the same model folder as bench_engine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine  # noqa: E402


def run_api(folder: Path, dtype: str, n_images: int = 16, out_tokens: int = 64) -> dict:
    from medlava import LLM, SamplingParams
    from medlava.chat import render_prompt
    from medlava.model.loader import load_model

    lm = load_model(folder, dtype=dtype)
    llm = LLM(lm, max_num_seqs=4 * n_images)
    images = bench_engine.make_images(n_images + 2)

    def request(image: int, question: str) -> dict:
        prompt = render_prompt([{"role": "user", "content": "<image>\n" + question}], lm.conv_mode)
        return {"prompt": prompt, "images": [images[image]]}

    llm.generate([request(n_images, bench_engine.REPORT)], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    requests = [request(image, question) for image, question in bench_engine.workload(n_images)]
    t0 = time.perf_counter()
    outs = llm.generate(requests, SamplingParams(max_tokens=out_tokens, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"mode": "LLM.generate", "tok_per_s": tokens / wall, "requests": len(outs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "medlava-bench-model"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.model_dir)
    if args.worker:
        print(json.dumps(run_api(folder, args.dtype)))
        return
    bench_engine.build_model(folder)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(bench_engine.ROOT / "src"), os.environ.get("PYTHONPATH")])))
    api = subprocess.run([sys.executable, __file__, "--worker", "--dtype", args.dtype, "--model-dir", str(folder)],
                         capture_output=True, text=True, env=env, check=True)
    engine = bench_engine._spawn(dict(mode="c", folder=str(folder), n_images=16, out_tokens=64, dtype=args.dtype,
                                      max_batched=4096, block_size=16), timeout=1800)
    api_tok = json.loads(api.stdout.strip().splitlines()[-1])["tok_per_s"]
    print(f"{args.dtype}: LLM.generate {api_tok:.1f} tok/s, engine (c) {engine['tok_per_s']:.1f} tok/s "
          f"({api_tok / engine['tok_per_s']:.2f}x)")


if __name__ == "__main__":
    main()
