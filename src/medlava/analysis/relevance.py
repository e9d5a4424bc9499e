"""Chefer et al. 2021 (ICCV) gradient-weighted attention relevance of the image patches for an answer.

Computed in the plain model with explicit-softmax attention that keeps each layer's probabilities
(the decoder's through an `AttentionBackend`, the vision tower's by running its layers here), so
no model code changes. See `grounding` for how the map becomes a peak and a box.
"""

from __future__ import annotations

import numpy as np
import torch

from medlava.model.loader import LoadedModel


class RetainedAttention:
    """Explicit softmax attention (causal, grouped-query, sliding window as `decoder.attend`) that
    keeps each layer's probabilities [B, H, T, T] for the relevance rule."""

    def __init__(self, window: int | None):
        self.window = window
        self.probs: list[torch.Tensor] = []

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1).float(), v.repeat_interleave(groups, dim=1).float()
        scores = q.float() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        pos = torch.arange(q.shape[-2], device=q.device)
        allowed = pos[None, :] <= pos[:, None]
        if self.window is not None:
            allowed &= pos[None, :] > pos[:, None] - self.window
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        probs.retain_grad()  # only read if a caller backpropagates; `relevance_map` asks autograd directly
        self.probs.append(probs)
        return (probs @ v).to(q.dtype)


def _vision_states(tower, pixels: torch.Tensor, layer: int, keep: list[torch.Tensor]) -> torch.Tensor:
    """`VisionTower.features` with explicit attention whose probabilities [B, H, N+1, N+1] go to `keep`."""
    n = len(tower.encoder.layers)
    stop = layer + n + 1 if layer < 0 else layer
    x = tower.pre_layrnorm(tower.embeddings(pixels))
    for block in tower.encoder.layers[:stop]:
        x = x + _vision_attention(block.self_attn, block.layer_norm1(x), keep)
        x = x + block.mlp(block.layer_norm2(x))
    return x


def _vision_attention(attn, x: torch.Tensor, keep: list[torch.Tensor]) -> torch.Tensor:
    b, t, d = x.shape

    def split(proj) -> torch.Tensor:
        return proj(x).view(b, t, attn.heads, d // attn.heads).transpose(1, 2).float()

    q, k, v = split(attn.q_proj), split(attn.k_proj), split(attn.v_proj)
    probs = (q @ k.transpose(-1, -2) * (d // attn.heads) ** -0.5).softmax(-1)
    keep.append(probs)
    return attn.out_proj((probs @ v).to(x.dtype).transpose(1, 2).reshape(b, t, d))


def _self_relevance(probs: list[torch.Tensor], grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Chefer's self-attention rule: R = I, then R += mean_heads((grad * A)^+) @ R per layer."""
    rel = torch.eye(probs[0].shape[-1], device=probs[0].device)
    for a, grad in zip(probs, grads, strict=True):
        rel = rel + (grad * a).clamp(min=0).mean(dim=1)[0] @ rel
    return rel


def _normalised(rel: torch.Tensor) -> torch.Tensor:
    """Chefer's eqs. 8-9 for a modality's self-relevance used by another: rows of R - I summed to 1,
    then I added back, so the mixing the attention did weighs as much as each token's own identity."""
    eye = torch.eye(rel.shape[0], device=rel.device)
    mixed = rel - eye
    return mixed / mixed.sum(-1, keepdim=True).clamp(min=1e-12) + eye


def relevance_map(lm: LoadedModel, prompt_ids: list[int], answer_ids: list[int], pixels: torch.Tensor) -> np.ndarray:
    """Chefer relevance of the image patches for `answer_ids` following `prompt_ids` ([g, g] patch grid).

    The decoder's relevance at the image tokens is carried back through the vision tower's own
    self-attention relevance (the bi-modal rule), since the decoder reads a finding from whichever
    image tokens the tower mixed it into, not only from the finding's own patches.
    """
    model, cfg = lm.model, lm.config
    ids = torch.tensor([prompt_ids + answer_ids], device=model.device)
    n_prompt, n_answer = len(prompt_ids), len(answer_ids)
    is_image = torch.zeros_like(ids, dtype=torch.bool)
    is_image[0, :n_prompt] = ids[0, :n_prompt] == cfg.image_token_id
    backend, vision_probs = RetainedAttention(cfg.text.sliding_window), []
    with torch.enable_grad():
        # Pixels require grad so the graph exists even when the parameters are frozen.
        states = _vision_states(
            model.vision_tower, pixels.to(model.device, model.dtype).requires_grad_(True),
            cfg.vision_feature_layer, vision_probs,
        )
        tokens = states[:, 1:] if cfg.vision_feature_select_strategy == "default" else states
        embeds = model.embed(ids, model.projector(tokens), is_image)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        hidden = model.decoder(embeds, positions, backend)[0, n_prompt - 1 : n_prompt - 1 + n_answer]
        logprobs = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
        score = logprobs.gather(1, ids[0, n_prompt:, None]).sum()
        # Gradients of the kept probabilities only: nothing accumulates in the parameters' .grad.
        grads = torch.autograd.grad(score, backend.probs + vision_probs)
    n_dec = len(backend.probs)
    text_rel = _self_relevance(backend.probs, grads[:n_dec])
    image_rel = _normalised(_self_relevance(vision_probs, grads[n_dec:]))
    rows = text_rel[n_prompt - 1 : n_prompt - 1 + n_answer].sum(0)[is_image[0]]  # at the image tokens
    first = 1 if cfg.vision_feature_select_strategy == "default" else 0  # image token k is tower token k+first
    return _to_grid(rows @ image_rel[first : first + rows.numel(), 1:], cfg)


def _to_grid(values: torch.Tensor, cfg) -> np.ndarray:
    g = cfg.vision.image_size // cfg.vision.patch_size
    if values.numel() != g * g:
        raise ValueError(f"{values.numel()} image tokens do not form the {g}x{g} patch grid")
    return values.detach().float().reshape(g, g).cpu().numpy()
