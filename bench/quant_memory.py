"""Peak memory while loading a model folder in bfloat16, int8 and int4: the quantized loads should
peak near the quantized model's size, never holding the full-precision model (the loader
quantizes each weight as it reads it).

The folder is a random LLaVA with a 1.2-billion-parameter decoder (TinyLlama's shape: hidden
2048, 22 layers, intermediate 5632, 32k vocabulary), written once in bfloat16 (2.4 GB). Each load
runs in its own process; a thread samples the process's anonymous resident memory (RssAnon:
tensors and heap, not the checkpoint's file pages, which the kernel can drop) every 2 ms.

    python bench/quant_memory.py [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DIMS = dict(
    text_model="llama", hidden_size=2048, layers=22, heads=32, kv_heads=4, intermediate_size=5632,
    vision_hidden=384, vision_layers=12, vision_heads=6, vision_intermediate=1536, image_size=224, patch_size=16,
)


def build(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        import torch

        from medlava.chat.bpe import train_bpe_tokenizer
        from medlava.model.random_init import save_random_llava

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_engine

        tokenizer = train_bpe_tokenizer(bench_engine.corpus(), bench_engine.VOCAB)
        tokenizer.add_tokens([f"<unused{i}>" for i in range(max(0, bench_engine.VOCAB - len(tokenizer)))])
        save_random_llava(folder, tokenizer=tokenizer, widen_init=False, dtype=torch.bfloat16, **DIMS)
    return folder


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(folder: Path, quantization: str | None) -> dict:
    """In this process: load the folder, sampling RssAnon; the figures in MB."""
    import torch

    from medlava.model.loader import load_model
    from medlava.model.quant import int4_tensor_type, weight_bytes

    if quantization == "int4":
        int4_tensor_type()  # torchao's import is not the model's memory
    before, peak, done = rss_anon_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    lm = load_model(folder, dtype="bfloat16", quantization=quantization)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {
        "quantization": quantization or "bf16", "load_s": seconds, "weights_mb": weight_bytes(lm.config, torch.bfloat16, quantization) / 2**20,
        "peak_mb": peak[0] - before, "after_mb": rss_anon_mb() - before,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="where the 1.2B model is (built there if absent)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(Path(args.worker[0]), None if args.worker[1] == "bf16" else args.worker[1])))
        return
    folder = build(Path(args.model_dir or Path(tempfile.gettempdir()) / "medlava-quant-memory-model"))
    print("| weights | load time (s) | weights, counted (MB) | peak during load (MB) | after load (MB) |")
    print("|---|---|---|---|---|")
    for q in ("bf16", "int8", "int4"):
        out = subprocess.run([sys.executable, __file__, "--worker", str(folder), q], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['quantization']} | {r['load_s']:.1f} | {r['weights_mb']:.0f} | {r['peak_mb']:.0f} | {r['after_mb']:.0f} |")


if __name__ == "__main__":
    main()
