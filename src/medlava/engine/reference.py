"""The reference generation loop: one request, a contiguous KV cache, nothing clever.

The paged engine is tested token-for-token against this loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medlava.engine.sampling import SamplingParams, sample
from medlava.model.config import TextConfig
from medlava.model.decoder import attend
from medlava.model.llava import LlavaModel


class ContiguousKVCache:
    """K/V for one batch in preallocated [layers, B, KVH, max_len, D] tensors."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.window = cfg.sliding_window
        self.length = 0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return attend(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], self.window)

    def advance(self, n: int) -> None:
        self.length += n


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def eos_ids(model: LlavaModel, tokenizer) -> set[int]:
    ids = model.config.text.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts, if any."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


@torch.inference_mode()
def generate_reference(
    model: LlavaModel,
    tokenizer,
    input_ids: list[int],
    params: SamplingParams,
    pixels: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
) -> Generation:
    """Generate for one prompt whose image placeholders are filled from `pixels` or `image_features`."""
    max_len = model.config.text.max_position_embeddings
    budget = min(params.max_tokens, max_len - len(input_ids))
    if budget < 1:
        raise ValueError(f"prompt of {len(input_ids)} tokens leaves no room in the {max_len}-token context")
    device = model.device
    cache = ContiguousKVCache(model.config.text, 1, len(input_ids) + budget, model.dtype, device)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids(model, tokenizer))
    generator = params.generator(device)

    ids = torch.tensor([input_ids], device=device)
    logits = model(ids, pixels=pixels, image_features=image_features, backend=cache, last_only=True)
    cache.advance(len(input_ids))
    out: list[int] = []
    while True:
        token = sample(logits[0, -1], params, generator)
        out.append(token)
        if token in stop_ids:
            return Generation(out, tokenizer.decode(out[:-1], skip_special_tokens=True), "stop")
        text = tokenizer.decode(out, skip_special_tokens=True)
        cut = find_stop(text, params.stop)
        if cut is not None:
            return Generation(out, text[:cut], "stop")
        if len(out) >= budget:
            return Generation(out, text, "length")
        position = torch.tensor([[cache.length]], device=device)
        logits = model(torch.tensor([[token]], device=device), position, backend=cache)
        cache.advance(1)
