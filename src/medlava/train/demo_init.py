"""The starting point of the demo model: a tokenizer trained on the world's text and random weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from medlava.chat.bpe import train_bpe_tokenizer
from medlava.model.random_init import save_random_llava

# medlava-tiny: small enough to train on 2 CPU cores in one session and ship in the package.
DEMO_DIMS = dict(
    text_model="mistral",
    hidden_size=256,
    layers=4,
    heads=4,
    kv_heads=2,
    intermediate_size=704,
    vision_hidden=192,
    vision_layers=4,
    vision_heads=3,
    vision_intermediate=768,
    image_size=160,
    patch_size=16,
    tie_word_embeddings=True,
)


def world_texts(world: Path) -> Iterator[str]:
    """Every sentence the model will read or write: instructions, captions and reports."""
    for name in ("instruct.json", "captions.json"):
        for record in json.loads((world / name).read_text()):
            for turn in record["conversations"]:
                yield turn["value"].replace("<image>", "")
    for line in (world / "reports.jsonl").read_text().splitlines():
        if line.strip():
            report = json.loads(line)
            yield f"Findings: {report['findings']} Impression: {report['impression']}"


def init_demo_model(world: Path, out: Path, vocab_size: int = 1024, seed: int = 0, **dims) -> Path:
    tokenizer = train_bpe_tokenizer(world_texts(world), vocab_size)
    return save_random_llava(
        out,
        **{**DEMO_DIMS, **dims},
        tokenizer=tokenizer,
        widen_init=False,
        seed=seed,
        extra_config={"conv_mode": "mistral_instruct", "image_aspect_ratio": "pad"},
    )
