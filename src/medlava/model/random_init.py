"""Random-weight model folders in the Hugging Face Llava layout, built by transformers itself.

For tests, benchmarks and trying the pipeline before real weights are at hand: the folder is a
genuine `LlavaForConditionalGeneration` checkpoint with a small byte-level BPE tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medlava.chat.bpe import train_bpe_tokenizer
from medlava.chat.image_processing import ImageProcessing
from medlava.model.convert import to_llava_hf_layout

TOKENIZER_TEXT = [
    "What modality is this? This is a chest radiograph. Is there a nodule in the right lung?",
    "Yes. No. The CT scan of the head shows no abnormality. MRI of the brain with a mass on the left.",
    "Findings: the lungs are clear. Impression: normal study. Pleural effusion, cardiomegaly, pneumothorax.",
]


def save_random_llava(
    out: str | Path,
    *,
    text_model: str = "llama",
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 320,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_intermediate: int = 64,
    image_size: int = 28,
    patch_size: int = 14,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer=None,
    widen_init: bool = True,
    extra_config: dict | None = None,
) -> Path:
    """Write a random LLaVA model folder and return its path.

    `tokenizer` (default: a small BPE trained here) sets the vocabulary; `widen_init` scales the
    weights up so a random model's outputs depend visibly on its input (tests), while training
    from scratch wants transformers' own small init; `extra_config` adds medlava's config keys
    (`conv_mode`, `image_aspect_ratio`).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration, MistralConfig
    from transformers import LlavaConfig as HFLlavaConfig

    out = Path(out)
    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(TOKENIZER_TEXT, vocab_size)
    vocab_size = len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig}[text_model]
    text = text_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_theta=10000.0 if text_model == "llama" else 1e6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=tie_word_embeddings,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    cfg = HFLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=vision_feature_layer,
        image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    if widen_init:  # transformers' init is tiny (std 0.02); widen it so outputs vary with input
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 2.0 / p.shape[-1] ** 0.5)
    if projector == "linear":
        # transformers has no single-layer projector: save linear_1 only and mark it for medlava.
        model.model.multi_modal_projector.linear_2 = None
    elif projector != "mlp2x_gelu":
        raise ValueError(f"unknown projector {projector!r}")
    model.to(dtype).save_pretrained(out)
    to_llava_hf_layout(out)  # the key layout of published llava-hf folders, which every engine loads
    tokenizer.save_pretrained(out)
    extra = dict(extra_config or {})
    if projector == "linear":
        extra["projector_type"] = "linear"
    if extra:
        cfg_path = out / "config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **extra}, indent=2))
    aspect = extra.get("image_aspect_ratio", "crop")
    proc = ImageProcessing(shortest_edge=image_size, crop=(image_size, image_size), aspect=aspect)
    (out / "preprocessor_config.json").write_text(json.dumps(proc.to_json(), indent=2))
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random-weight LLaVA model folder.")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--text-model", choices=["llama", "mistral"], default="mistral")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    args = parser.parse_args()
    path = save_random_llava(
        args.out, text_model=args.text_model, image_size=args.image_size, patch_size=args.patch_size
    )
    print(f"wrote a random {args.text_model} LLaVA model to {path}")
