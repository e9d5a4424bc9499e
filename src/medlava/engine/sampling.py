"""Sampling parameters (vLLM's field names, so habits carry over) and the sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens. Unlike vLLM, the default is greedy: the same study should get the same answer."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # vLLM's field: when set, the output's `prompt_logprobs` holds each prompt token's log-probability
    # (None for the first). Only the prompt token's own value is returned, whatever the number.
    prompt_logprobs: int | None = None
    # vLLM's field: when set, the output's `logprobs` holds each generated token's log-probability
    # under the model's own distribution (before temperature or top-p); only the sampled token's.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("prompt_logprobs", "logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be None or >= 0, got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from a [V] logits row."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token id per row of [N, V] logits; greedy rows in one argmax, the others row by row.

    Each sampled row uses its own generator, so a seeded request draws the same tokens whatever
    else shares its batch.
    """
    greedy = [i for i, p in enumerate(params) if p.greedy]
    # max(...).indices is argmax (first maximum on ties), faster on CPU for bfloat16 rows.
    if len(greedy) == len(params):
        return logits.max(dim=-1).indices.tolist()
    out = [0] * len(params)
    if greedy:
        for i, token in zip(greedy, logits[greedy].max(dim=-1).indices.tolist(), strict=True):
            out[i] = token
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample(logits[i], p, generators[i])
    return out
