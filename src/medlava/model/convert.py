"""Write a loaded model in the Hugging Face Llava layout (what `transformers.LlavaForConditionalGeneration` reads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medlava.chat.templates import IMAGE_PLACEHOLDER
from medlava.model.config import LlavaConfig
from medlava.model.loader import LoadedModel, load_model

SHARD_BYTES = 4 << 30


def hf_key(name: str) -> str:
    """medlava module path -> its key in the layout of published llava-hf checkpoints."""
    head, _, rest = name.partition(".")
    if head == "decoder":
        return f"language_model.model.{rest}"
    if head == "lm_head":
        return f"language_model.lm_head.{rest}"
    if head == "vision_tower":
        return f"vision_tower.vision_model.{rest}"
    _, index, param = rest.split(".")  # projector.layers.N.param
    return f"multi_modal_projector.linear_{int(index) + 1}.{param}"


def to_llava_hf_layout(folder: str | Path) -> None:
    """Rename a Llava folder's CLIP keys in place to the layout of published llava-hf checkpoints.

    transformers 5's save_pretrained writes the tower as `vision_tower.*`; published llava-hf
    folders (and what vLLM 0.32 loads) have `vision_tower.vision_model.*`. medlava and
    transformers load either.
    """
    folder = Path(folder)
    weight_map = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            metadata = f.metadata()
            tensors = {_llava_hf_key(key): f.get_tensor(key) for key in f.keys()}
        partial = shard.with_suffix(".partial")
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, shard)  # never a half-written shard
        weight_map |= dict.fromkeys(tensors, shard.name)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        meta = json.loads(index.read_text())
        index.write_text(json.dumps(meta | {"weight_map": weight_map}, indent=2))


def _llava_hf_key(key: str) -> str:
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key.removeprefix("vision_tower.")
    return key


def add_image_token(lm: LoadedModel) -> int:
    """Give the tokenizer an `<image>` token and the vocabulary a row for it, as llava-hf checkpoints have.

    The new rows are the means of the existing ones, so the token's logit is the mean logit:
    never the greedy choice, and every other logit is unchanged.
    """
    tok, model = lm.tokenizer, lm.model
    if tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER) in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    old = model.config.text.vocab_size
    if image_id >= old:
        grow = image_id + 1 - old
        embed, head = model.decoder.embed_tokens.weight.data, model.lm_head.weight.data
        model.decoder.embed_tokens.weight.data = torch.cat([embed, embed.mean(0, keepdim=True).expand(grow, -1)])
        if model.lm_head.weight is not model.decoder.embed_tokens.weight:
            model.lm_head.weight.data = torch.cat([head, head.mean(0, keepdim=True).expand(grow, -1)])
        model.config.text.vocab_size = image_id + 1
    model.config.image_token_id = image_id
    return image_id


def hf_config_json(cfg: LlavaConfig, conv_mode: str) -> dict:
    t, v = cfg.text, cfg.vision
    text = {
        "model_type": t.model_type,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "max_position_embeddings": t.max_position_embeddings,
        "hidden_act": t.hidden_act,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
    }
    if t.model_type == "mistral":
        text["sliding_window"] = t.sliding_window
    else:
        text["attention_bias"] = t.attention_bias
    out = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": v.num_channels,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": v.hidden_act,
        },
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.image_tokens,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": cfg.projector_bias,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "tie_word_embeddings": t.tie_word_embeddings,
        "dtype": cfg.dtype,
        "torch_dtype": cfg.dtype,
        # medlava's own keys (transformers ignores them): how this model expects to be prompted.
        "image_aspect_ratio": cfg.image_aspect_ratio,
        "conv_mode": conv_mode,
    }
    if cfg.projector_type != "mlp2x_gelu":
        out["projector_type"] = cfg.projector_type  # transformers cannot load these
    return out


def save_hf(lm: LoadedModel, dst: str | Path) -> Path:
    """Save `lm` as a Hugging Face Llava folder (sharded safetensors, config, tokenizer, preprocessor)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    add_image_token(lm)
    state = lm.model.state_dict()
    if lm.config.text.tie_word_embeddings:
        state.pop("lm_head.weight")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][hf_key(name)] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], dst / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, dst / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        index = {"metadata": {}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dst / "config.json").write_text(json.dumps(hf_config_json(lm.config, lm.conv_mode), indent=2))
    (dst / "preprocessor_config.json").write_text(json.dumps(lm.image_processing.to_json(), indent=2))
    lm.tokenizer.save_pretrained(dst)
    return dst


def convert(
    src: str | Path, dst: str | Path, vision_tower: str | Path | None = None, dtype: str | None = None
) -> Path:
    """Original LLaVA-Med folder (or any loadable folder) -> Hugging Face Llava folder, optionally recast."""
    return save_hf(load_model(src, vision_tower=vision_tower, dtype=dtype), dst)
