"""Llama/Mistral decoder: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP.

Attention over past tokens is delegated to an `AttentionBackend` so the same network serves
training (no cache), the reference loop (contiguous cache) and the paged engine.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from medlava import kernels
from medlava.host_memory import huge_page_buffer
from medlava.model.config import TextConfig

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GEMV_ROWS = 3  # up to this many rows a linear runs on medlava's matrix-vector kernel (kernels/csrc/gemv.cpp)


def fused_ops(x: torch.Tensor):
    """medlava's fused CPU ops (medlava/kernels) where they apply to x: inference (no autograd) on
    the CPU in a float dtype they take; None elsewhere, and the plain torch code below runs."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype not in FUSED_DTYPES:
        return None
    return kernels.ops()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x · weightᵀ (+ bias) on medlava's matrix-vector kernel where it applies (inference on the
    CPU, at most GEMV_ROWS rows, a contiguous weight of x's dtype): it reads the plain weights
    front to back at the memory's full speed, where oneDNN's GEMM reaches ~60 % of it at a decode
    step's one row (docs/BENCHMARKS.md). None elsewhere."""
    ops = fused_ops(x)
    if ops is None or x.numel() > GEMV_ROWS * x.shape[-1] or x.dtype != weight.dtype or not weight.is_contiguous():
        return None
    return ops.gemv(x.contiguous(), weight, bias)


class AttentionBackend(Protocol):
    """Stores this step's K/V for `layer` and attends q over everything cached (causally).

    Shapes: q [B, H, T, D]; k, v [B, KVH, T, D]; returns [B, H, T, D].
    """

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def causal_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = attend) for queries that are the last `q_len` of `kv_len` positions."""
    if q_len == kv_len and (window is None or kv_len <= window):
        return None  # plain causal: let SDPA use is_causal
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal grouped-query attention of q (the newest tokens) over k/v (all tokens)."""
    mask = causal_mask(q.shape[-2], k.shape[-2], window, q.device)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


class PackedWeights:
    """A copy of the weights of one or more Linear layers that read the same input, side by side
    (one GEMM instead of several: q/k/v, gate/up), that oneDNN has reordered into its blocked
    layout once rather than on every call, as vLLM does on the CPU: 1.2-2.5x faster at decode
    batch sizes (docs/BENCHMARKS.md). bfloat16 results equal `F.linear`'s bit for bit; float32
    ones differ by rounding (oneDNN's fp32 GEMM is not MKL's). Only inference (no autograd) on
    the CPU uses it, and only while every layer's weight is still the one it was made from. At one
    to three rows `gemv` runs instead, on the plain weights where they lie side by side (`plain`)."""

    def __init__(self, layers: list[Linear]):
        self.layers = layers
        self.sizes = [m.out_features for m in layers]
        self.dtype = layers[0].weight.dtype
        # Each layer's parameter dict, the weight the copy was made from, and that weight's version:
        # checked on every call, so kept to a dict lookup and two comparisons per layer.
        self.sources = [(m._parameters, m.weight, m.weight._version) for m in layers]
        self.plain = side_by_side([m.weight for m in layers])  # for `gemv` at one to three rows
        with torch.no_grad():
            w = torch.cat([m.weight for m in layers]) if len(layers) > 1 else layers[0].weight
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)

    @staticmethod
    def packable(layers: list[Linear]) -> bool:
        """float32 or bfloat16 CPU weights of one dtype (several layers: without biases), oneDNN present."""
        w = layers[0].weight
        return torch.backends.mkldnn.is_available() and w.dtype in (torch.float32, torch.bfloat16) and all(
            m.weight.device.type == "cpu" and m.weight.dtype == w.dtype and (len(layers) == 1 or m.bias is None)
            for m in layers
        )

    def fresh(self) -> bool:
        return all(params["weight"] is w and w._version == version for params, w, version in self.sources)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.layers[0].bias if len(self.layers) == 1 else None
        y = None if self.plain is None else gemv(x, self.plain, bias)
        return y if y is not None else torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [None], "")


def side_by_side(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The weights as one [sum of rows, K] matrix where they lie one after another in one block of
    memory (`place_weights` puts them so), else None."""
    first = weights[0].detach()
    storage = first.untyped_storage().data_ptr()
    for a, b in zip(weights, weights[1:], strict=False):
        if b.untyped_storage().data_ptr() != storage or b.data_ptr() != a.data_ptr() + a.nbytes:
            return None
    if not all(w.is_contiguous() and w.shape[1:] == first.shape[1:] for w in weights):
        return None
    return first.as_strided((sum(w.shape[0] for w in weights), *first.shape[1:]), first.stride())


def packed_for(owner: nn.Module, attr: str, x: torch.Tensor) -> PackedWeights | None:
    """owner's PackedWeights `attr` where it applies to x (inference, its dtype), else None; a
    copy made from weights that have changed since (a LoRA merge, training) is dropped."""
    packed = getattr(owner, attr)
    if packed is None or torch.is_grad_enabled() or x.dtype != packed.dtype:
        return None
    if not packed.fresh():
        setattr(owner, attr, None)
        return None
    return packed


class Linear(nn.Linear):
    """`nn.Linear` with an optional `PackedWeights` copy for inference (`pack_model`)."""

    packed: PackedWeights | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gemv(x, self.weight, self.bias)
        if y is not None:
            return y
        packed = packed_for(self, "packed", x)
        return packed(x) if packed is not None else F.linear(x, self.weight, self.bias)


def packing_groups(model: nn.Module) -> list[tuple[nn.Module, str, list[Linear]]]:
    """What `pack_model` packs, as (owner, attribute, layers): each attention's q/k/v and each
    MLP's gate/up as one GEMM where they can be, every other decoder.Linear on its own."""
    groups, grouped = [], set()
    for m in model.modules():
        layers = [m.q_proj, m.k_proj, m.v_proj] if isinstance(m, Attention) else (
            [m.gate_proj, m.up_proj] if isinstance(m, SwiGLU) else None
        )
        if layers is not None and all(isinstance(x, Linear) for x in layers) and PackedWeights.packable(layers):
            groups.append((m, "fused", layers))
            grouped.update(id(x) for x in layers)
    groups += [(m, "packed", [m]) for m in model.modules() if isinstance(m, Linear) and id(m) not in grouped]
    return groups


def pack_model(model: nn.Module, budget_bytes: int | None = None) -> bool:
    """Give the model's Linear layers `PackedWeights` copies (see `packing_groups`) where they have
    none up to date, if the new copies fit in `budget_bytes` (None: no limit); returns whether the
    model is packed. The copies sit beside the plain weights, which autograd still uses."""
    groups = [g for g in packing_groups(model) if PackedWeights.packable(g[2])]
    todo = [(owner, attr, layers) for owner, attr, layers in groups
            if getattr(owner, attr) is None or not getattr(owner, attr).fresh()]
    need = sum(m.weight.nbytes for _, _, layers in todo for m in layers)
    if todo and (budget_bytes is None or need <= budget_bytes):
        for owner, attr, layers in todo:
            setattr(owner, attr, PackedWeights(layers))
    return bool(groups) and all(getattr(owner, attr) is not None for owner, attr, _ in groups)


def place_weights(model: nn.Module) -> None:
    """Move the weights of the model's CPU Linear layers into memory on 2 MB pages
    (`host_memory.huge_page_buffer`), each `packing_groups` group's side by side, so that `gemv`
    reads q/k/v (gate/up) as one matrix, front to back. Once per model; one group at a time is
    copied, its old memory freed, so memory grows by one group at most."""
    if getattr(model, "weights_placed", False):
        return
    groups, seen = [], set()
    for _, _, layers in packing_groups(model):
        weights = [m.weight for m in layers if id(m.weight) not in seen]
        seen.update(id(w) for w in weights)
        if weights and all(w.device.type == "cpu" and w.dtype.is_floating_point for w in weights):
            groups.append(weights)
    align = 64  # each group on its own cache line
    sizes = [-(-sum(w.nbytes for w in weights) // align) * align for weights in groups]
    block = huge_page_buffer(sum(sizes))
    offset = 0
    with torch.no_grad():
        for weights, size in zip(groups, sizes, strict=True):
            at = offset
            for w in weights:
                home = block[at : at + w.nbytes].view(w.dtype).view(w.shape)
                home.copy_(w)
                w.data = home
                at += w.nbytes
            offset += size
    model.weights_placed = True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the norm of x + delta, x + delta): a layer's output `delta` joins the residual stream
        `x` first (in one pass with the norm, where the fused ops run)."""
        ops = fused_ops(x)
        if ops is not None and self.weight.dtype == x.dtype:
            return ops.rms_norm(x.contiguous(), self.weight, self.eps, None if delta is None else delta.contiguous())
        if delta is not None:
            x = x + delta
        # Normalise in float32 as the reference implementations do, then scale in the model dtype.
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one fused pass.
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype), x


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin [..., head_dim] of the rotary embedding at `positions` [...], in `dtype`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    fused: PackedWeights | None = None  # q/k/v as one GEMM (pack_model)

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.heads * self.head_dim, d, bias=bias)

    def forward(self, x, cos, sin, backend: AttentionBackend | None) -> torch.Tensor:
        """x [B, T, hidden]; cos, sin [B, T, head_dim]."""
        b, t, _ = x.shape
        fused = packed_for(self, "fused", x)
        if fused is not None:  # views into one GEMM's output
            q, k, v = fused(x).split(fused.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        ops = fused_ops(x)
        if ops is not None and cos.dtype == q.dtype:  # rotated in place, in one pass over q and k
            ops.rotary_(q.view(b * t, self.heads, -1), k.view(b * t, self.kv_heads, -1), cos.view(b * t, -1), sin.view(b * t, -1))
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
            q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        out = attend(q, k, v, self.window) if backend is None else backend(self.layer, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    fused: PackedWeights | None = None  # gate/up as one GEMM (pack_model)

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported decoder activation {cfg.hidden_act!r} (expected silu)")
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused, ops = packed_for(self, "fused", x), fused_ops(x)
        if fused is not None and ops is not None:  # [gate | up] from one GEMM, silu(gate) * up in one pass
            return self.down_proj(ops.silu_and_mul(fused(x)))
        gate, up = fused(x).chunk(2, dim=-1) if fused is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, delta, cos, sin, backend) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream x and the last layer's output delta (None before the first layer) in,
        the stream and this layer's output out: each output joins the stream in the next norm."""
        h, x = self.input_layernorm(x, delta)
        h, x = self.post_attention_layernorm(x, self.self_attn(h, cos, sin, backend))
        return x, self.mlp(h)


class Decoder(nn.Module):
    """Token embeddings, decoder layers and the final norm (the LM head lives in `LlavaModel`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend | None = None
    ) -> torch.Tensor:
        cos, sin = rope_cos_sin(positions.expand(embeds.shape[:2]), self.config.head_dim, self.config.rope_theta, embeds.dtype)
        x, delta = embeds, None
        for layer in self.layers:
            x, delta = layer(x, delta, cos, sin, backend)
        return self.norm(x, delta)[0]
