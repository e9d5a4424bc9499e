"""The paged KV cache and the attention backend that reads and writes it.

One step's tokens from all sequences arrive packed in a single [1, T] row. For every layer the
backend first writes each new token's K/V into its slot (block id * block_size + offset), then
attends each query causally over its own sequence's cached K/V, found through its block table.

On the CPU that is one call of medlava's kernel (csrc/paged_attention.cpp) per layer, for prefill
and decode alike: it reads K/V straight out of the pool, and decode sequences that share their
first KV blocks (questions about one image) read those blocks once, together (cascade attention).
Elsewhere (CUDA, or a CPU without a C++ compiler) the portable torch path runs:

- decode (one new token per sequence): all sequences at once, K/V gathered into a padded
  [B, L] buffer with a length mask, one `scaled_dot_product_attention` call;
- prefill: sequence by sequence; a sequence with no cached prefix attends over its own fresh
  K/V exactly as `decoder.attend` does, one with a cache hit over its gathered context.

Sliding windows (Mistral) are masked as `decoder.attend` masks them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medlava.model.config import TextConfig
from medlava.model.decoder import attend


class KVCachePool:
    """K and V for every layer in preallocated tensors, in one of two layouts:

    - token-major (the portable torch path): K and V [layers, blocks, block_size, kv_heads, head_dim];
    - head-major (the CPU kernel): K [layers, blocks, kv_heads, head_dim, block_size] and
      V [layers, blocks, kv_heads, block_size, head_dim], so that one KV head's keys in a block
      are a [head_dim, block_size] tile (tokens are the vector lanes of q.k) and its values a
      [block_size, head_dim] tile.
    """

    ZERO_CHUNK = 64  # blocks zeroed at a time

    def __init__(
        self, cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device, head_major: bool = False
    ):
        layers, kh, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        if head_major:
            k_shape, v_shape = (layers, num_blocks, kh, hd, block_size), (layers, num_blocks, kh, block_size, hd)
        else:
            k_shape = v_shape = (layers, num_blocks, block_size, kh, hd)
        self.k = torch.empty(k_shape, dtype=dtype, device=device)
        self.v = torch.empty(v_shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size, self.head_major = num_blocks, block_size, head_major
        self.kv_heads, self.head_dim = kh, hd
        self.zeroed = 0  # blocks [0, zeroed) hold finite values

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one step's K and V ([T, kv_heads, head_dim]) of `layer` in their slots (block * block_size + offset)."""
        if self.head_major:
            blocks, offsets = slots // self.block_size, slots % self.block_size
            self.k[layer].permute(0, 3, 1, 2).index_put_((blocks, offsets), k)
            self.v[layer].transpose(1, 2).index_put_((blocks, offsets), v)
        else:
            self.k[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, k)
            self.v[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, v)

    def copy_prefix(self, layer: int, src: int, dst: int, n: int) -> None:
        """Copy the K/V of block src's first n slots into block dst (`layer`'s)."""
        k, v = self.k[layer], self.v[layer]
        if self.head_major:
            k[dst, :, :, :n] = k[src, :, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        else:
            k[dst, :n] = k[src, :n]
            v[dst, :n] = v[src, :n]

    def ensure_zeroed(self, block_id: int) -> None:
        """Zero blocks up to `block_id` before first use. The torch path's attention reads unused
        slots (masked out, but they must be finite: 0 * NaN is NaN; the CPU kernel masks the
        scores of the ones it reads); zeroing lazily keeps untouched memory unallocated (blocks are handed out lowest id first)."""
        if block_id >= self.zeroed:
            end = min(self.num_blocks, max(block_id + 1, self.zeroed + self.ZERO_CHUNK))
            self.k[:, self.zeroed : end].zero_()
            self.v[:, self.zeroed : end].zero_()
            self.zeroed = end

    @staticmethod
    def bytes_per_block(cfg: TextConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class PrefillSeq:
    """Where one sequence's new tokens sit in the packed row, and what it attends over."""

    q_start: int  # first of its tokens in the packed row
    q_len: int  # tokens computed this step
    kv_len: int  # its tokens cached after this step (cached prefix + q_len)
    block_table: torch.Tensor | None  # [n_blocks] when it has a cached prefix, else None


MIN_SHARED_TOKENS = 32  # a shorter shared prefix saves too little reading to be worth a group
MAX_GROUP = 16  # members per group: larger groups are split, so that a prefix shared by all still spreads over threads


def shared_prefixes(tables: list[list[int]], lengths: list[int], block_size: int) -> list[tuple[int, list[int]]]:
    """Groups of decode sequences whose block tables start with the same blocks, as
    (shared blocks, sequence indices): each sequence joins the deepest group of two or more
    that shares its leading blocks (so a system prompt shared by all does not hide the image
    each four of them share). Only full blocks before each one's newest token count (the newest
    token's K/V is written this step); groups share at least MIN_SHARED_TOKENS and have at most
    MAX_GROUP members."""
    limits = [(n - 1) // block_size for n in lengths]
    groups: list[tuple[int, list[int]]] = []

    def split(members: list[int], depth: int) -> None:  # members share blocks [0, depth)
        deeper = defaultdict(list)
        for i in members:
            if limits[i] > depth:
                deeper[tables[i][depth]].append(i)
        went = set()
        for sub in deeper.values():
            if len(sub) > 1:
                split(sub, depth + 1)
                went.update(sub)
        rest = [i for i in members if i not in went]
        if len(rest) > 1 and depth * block_size >= MIN_SHARED_TOKENS:
            n_parts = -(-len(rest) // MAX_GROUP)
            groups.extend((depth, rest[k::n_parts]) for k in range(n_parts) if len(rest[k::n_parts]) > 1)

    split(list(range(len(tables))), 0)
    return groups


@dataclass
class KernelPlan:
    """A step's sequences as the CPU kernel reads them (int32 tensors): block tables [S, width],
    tokens cached after the step [S], where each one's queries start in the packed row [S + 1],
    groups: the sequences order[group_starts[g]:group_starts[g + 1]] share their first
    shared_lens[g] tokens (whole blocks), and the step's partial prefix-cache hits as rows of
    (source block, block, slots) [C, 3]."""

    block_tables: torch.Tensor
    kv_lens: torch.Tensor
    q_starts: torch.Tensor
    order: torch.Tensor
    group_starts: torch.Tensor
    shared_lens: torch.Tensor
    copies: torch.Tensor

    @classmethod
    def build(
        cls, tables: list[list[int]], kv_lens: list[int], q_lens: list[int], groups: list[tuple[int, list[int]]],
        block_size: int, device, copies: list[tuple[int, int, int]] = (),
    ) -> KernelPlan:
        """`groups` as `shared_prefixes` gives them; every other sequence is a group of its own."""
        width = max(len(t) for t in tables)
        grouped = {i for _, members in groups for i in members}
        parts = [(n * block_size, members) for n, members in groups]
        parts += [(0, [i]) for i in range(len(tables)) if i not in grouped]
        starts = [0]
        for _, members in parts:
            starts.append(starts[-1] + len(members))
        q_starts = [0]
        for n in q_lens:
            q_starts.append(q_starts[-1] + n)

        def int32(data) -> torch.Tensor:
            return torch.tensor(data, dtype=torch.int32, device=device)

        return cls(
            int32([t + [0] * (width - len(t)) for t in tables]), int32(kv_lens), int32(q_starts),
            int32([i for _, members in parts for i in members]), int32(starts), int32([n for n, _ in parts]),
            int32(list(copies)).view(-1, 3),
        )


@dataclass
class StepContext:
    slot_mapping: torch.Tensor  # [T] slot of each packed token
    copies: list[tuple[int, int, int]] = ()  # partial prefix-cache hits: (source block, block, slots)
    kernel: KernelPlan | None = None  # set: the CPU kernel attends (prefill and decode alike)
    prefill: list[PrefillSeq] | None = None
    # the torch path's decode: padded block tables and the mask of each sequence's slots
    block_ids: torch.Tensor | None = None  # [B * max_blocks] padded block tables, flattened
    mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] True = attend


class PagedAttention:
    """An `AttentionBackend` over a `KVCachePool`; `set_context` before each forward. A context
    with a `KernelPlan` is attended by `kernels.paged_attention` (medlava/kernels), one without
    by the portable torch path."""

    def __init__(self, pool: KVCachePool, num_heads: int, window: int | None, kernels=None):
        self.pool = pool
        self.num_heads = num_heads
        self.window = window
        self.kernels = kernels
        self.ctx: StepContext | None = None

    def set_context(self, ctx: StepContext | None) -> None:
        self.ctx = ctx

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx, pool = self.ctx, self.pool
        kh, hd = pool.kv_heads, pool.head_dim
        k_pool, v_pool = pool.k[layer], pool.v[layer]
        # q [1, H, T, D]; k, v [1, KVH, T, D] -> [T, KVH, D], stored in the pool at their slots
        k, v = k[0].transpose(0, 1), v[0].transpose(0, 1)
        if ctx.kernel is not None:  # the kernel stores them, then attends
            p = ctx.kernel
            out = self.kernels.paged_attention(
                q[0].transpose(0, 1), k, v, ctx.slot_mapping, k_pool, v_pool, p.copies, p.block_tables, p.kv_lens,
                p.q_starts, p.order, p.group_starts, p.shared_lens, self.window or 0, hd**-0.5,
            )
            return out.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        pool.write(layer, ctx.slot_mapping, k, v)
        for copy in ctx.copies:  # after the writes: a source may be computed in this very step
            pool.copy_prefix(layer, *copy)
        if ctx.prefill is None:  # decode: each sequence's one query over its gathered K/V
            b, rows = q.shape[2], self.num_heads // kh
            # Grouped-query attention without repeating K/V: the H/KVH query heads sharing a KV head
            # become that head's "queries" (all at the same position, so the same mask row).
            qg = q[0].transpose(0, 1).reshape(b, kh, rows, hd)
            keys = k_pool.index_select(0, ctx.block_ids).view(b, -1, kh, hd).transpose(1, 2)
            values = v_pool.index_select(0, ctx.block_ids).view(b, -1, kh, hd).transpose(1, 2)
            out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=ctx.mask)
            return out.reshape(b, self.num_heads, hd).transpose(0, 1).unsqueeze(0)  # [1, H, B, D]
        outs = []
        for s in ctx.prefill:
            q_i = q[:, :, s.q_start : s.q_start + s.q_len]
            if s.block_table is None:  # nothing cached before: attend over its own fresh K/V
                k_i = k[s.q_start : s.q_start + s.q_len].transpose(0, 1)[None]
                v_i = v[s.q_start : s.q_start + s.q_len].transpose(0, 1)[None]
            else:
                k_i = k_pool.index_select(0, s.block_table).flatten(0, 1)[: s.kv_len].transpose(0, 1)[None]
                v_i = v_pool.index_select(0, s.block_table).flatten(0, 1)[: s.kv_len].transpose(0, 1)[None]
            outs.append(attend(q_i, k_i, v_i, self.window))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
