"""The paged KV cache and the attention backend that reads and writes it.

One step's tokens from all sequences arrive packed in a single [1, T] row. For every layer the
backend first writes each new token's K/V into its slot (block id * block_size + offset), then
attends each query causally over its own sequence's cached K/V, found through its block table:

- decode (one new token per sequence): all sequences at once, K/V gathered into a padded
  [B, L] buffer with a length mask, one flash-attention call (on CPU, in groups of sequences
  whose gathered K/V fits in cache, so the copy is read back from cache rather than memory).
  Sequences that share their first KV blocks (questions about one image) attend over those
  blocks together, reading them once, and over the rest of their own; the two parts are merged
  by their log-sum-exps (cascade attention: the same softmax, summed in two pieces);
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
    """K and V for every layer in preallocated [layers, num_blocks, block_size, kv_heads, head_dim] tensors."""

    ZERO_CHUNK = 64  # blocks zeroed at a time

    def __init__(self, cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        shape = (cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.zeroed = 0  # blocks [0, zeroed) hold finite values

    def ensure_zeroed(self, block_id: int) -> None:
        """Zero blocks up to `block_id` before first use. Attention reads unused slots (masked out,
        but they must be finite: 0 * NaN is NaN); zeroing lazily keeps untouched memory unallocated
        (blocks are handed out lowest id first)."""
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


MIN_SHARED_TOKENS = 32  # a shorter shared prefix is not worth its own attention call


def shared_prefixes(tables: list[list[int]], lengths: list[int], block_size: int) -> list[tuple[int, list[int]]]:
    """Groups of decode sequences whose block tables start with the same blocks, as
    (shared blocks, sequence indices): each sequence joins the deepest group of two or more
    that shares its leading blocks (so a system prompt shared by all does not hide the image
    each four of them share). Only full blocks before each one's newest token count (the newest
    token's K/V is written this step); groups share at least MIN_SHARED_TOKENS."""
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
            groups.append((depth, rest))

    split(list(range(len(tables))), 0)
    return groups


@dataclass
class SharedPrefixes:
    """Decode sequences attending over shared leading blocks together (see `shared_prefixes`)."""

    block_ids: torch.Tensor  # [G * max_blocks] each group's shared blocks, padded, flattened
    mask: torch.Tensor  # [G, 1, 1, max_blocks * block_size] True = a shared slot of that group (additive once set)
    group: torch.Tensor  # [S] the group of each sequence that has one
    member: torch.Tensor  # [S] its place in the group
    seq: torch.Tensor  # [S] its place in the batch
    members: int  # the largest group's size


@dataclass
class StepContext:
    slot_mapping: torch.Tensor  # [T] slot of each packed token
    prefill: list[PrefillSeq] | None = None
    # decode only; with `shared`, block_ids and mask cover each sequence's blocks after its shared ones
    block_ids: torch.Tensor | None = None  # [B * max_blocks] padded block tables, flattened
    mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] True = attend (additive once set)
    batch: int = 0
    shared: SharedPrefixes | None = None


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as the additive one (0 / -inf) the CPU flash kernel takes."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class PagedAttention:
    """An `AttentionBackend` over a `KVCachePool`; `set_context` before each forward."""

    def __init__(self, pool: KVCachePool, num_heads: int, window: int | None, decode_chunk_bytes: int | None = None):
        self.pool = pool
        self.num_heads = num_heads
        self.window = window
        if decode_chunk_bytes is None:  # CPU: keep each group's gathered K/V within the last-level cache
            decode_chunk_bytes = 4 << 20 if pool.k.device.type == "cpu" else 1 << 62
        self.decode_chunk_bytes = decode_chunk_bytes
        self.ctx: StepContext | None = None
        self._buf_k: torch.Tensor | None = None
        self._buf_v: torch.Tensor | None = None

    def set_context(self, ctx: StepContext | None) -> None:
        if ctx is not None and ctx.mask is not None:  # decode: additive masks, built once per step, not per layer
            ctx.mask = additive_mask(ctx.mask, self.pool.k.dtype)
            if ctx.shared is not None:
                ctx.shared.mask = additive_mask(ctx.shared.mask, self.pool.k.dtype)
        self.ctx = ctx

    def _gather_buffers(self, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reused gather buffers of at least n_blocks blocks (grown, never shrunk)."""
        if self._buf_k is None or self._buf_k.shape[0] < n_blocks:
            shape = (n_blocks, *self.pool.k.shape[2:])
            self._buf_k = torch.empty(shape, dtype=self.pool.k.dtype, device=self.pool.k.device)
            self._buf_v = torch.empty_like(self._buf_k)
        return self._buf_k[:n_blocks], self._buf_v[:n_blocks]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        pool = self.pool
        kh, hd = pool.kv_heads, pool.head_dim
        k_pool, v_pool = pool.k[layer], pool.v[layer]
        # q [1, H, T, D]; k, v [1, KVH, T, D] -> slots [T, KVH, D]
        k_pool.view(-1, kh, hd).index_copy_(0, ctx.slot_mapping, k[0].transpose(0, 1))
        v_pool.view(-1, kh, hd).index_copy_(0, ctx.slot_mapping, v[0].transpose(0, 1))
        if ctx.prefill is None:
            return self._decode(q, k_pool, v_pool)
        outs = []
        for s in ctx.prefill:
            q_i = q[:, :, s.q_start : s.q_start + s.q_len]
            if s.block_table is None:  # nothing cached before: attend over its own fresh K/V
                k_i = k[:, :, s.q_start : s.q_start + s.q_len]
                v_i = v[:, :, s.q_start : s.q_start + s.q_len]
            else:
                k_i = k_pool.index_select(0, s.block_table).flatten(0, 1)[: s.kv_len].transpose(0, 1)[None]
                v_i = v_pool.index_select(0, s.block_table).flatten(0, 1)[: s.kv_len].transpose(0, 1)[None]
            outs.append(attend(q_i, k_i, v_i, self.window))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _decode(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        b, h = ctx.batch, self.num_heads
        kh, hd = self.pool.kv_heads, self.pool.head_dim
        rows = h // kh
        # Grouped-query attention without repeating K/V: the H/KVH query heads sharing a KV head
        # become that head's "queries" (all at the same position, so the same mask row).
        qg = q[0].transpose(0, 1).reshape(b, kh, rows, hd)
        out, lse = self._paged(qg, k_pool, v_pool, ctx.block_ids, ctx.mask)
        sp = ctx.shared
        if sp is not None:  # the shared blocks, once per group, with all its members' queries
            n_groups = sp.mask.shape[0]
            qs = qg.new_zeros(n_groups, sp.members, kh, rows, hd)
            qs[sp.group, sp.member] = qg[sp.seq]
            qs = qs.transpose(1, 2).reshape(n_groups, kh, sp.members * rows, hd)
            o_s, lse_s = self._paged(qs, k_pool, v_pool, sp.block_ids, sp.mask)
            o_s = o_s.view(n_groups, kh, sp.members, rows, hd).transpose(1, 2)[sp.group, sp.member]
            lse_s = lse_s.view(n_groups, kh, sp.members, rows).transpose(1, 2)[sp.group, sp.member]
            o_own, lse_own = out[sp.seq], lse[sp.seq]
            top = torch.maximum(lse_s, lse_own)
            w_s, w_own = (lse_s - top).exp().unsqueeze(-1), (lse_own - top).exp().unsqueeze(-1)
            out[sp.seq] = ((o_s.float() * w_s + o_own.float() * w_own) / (w_s + w_own)).to(out.dtype)
        return out.reshape(b, h, hd).transpose(0, 1).unsqueeze(0)  # [1, H, B, D]

    def _paged(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q [n, KVH, rows, D] over the blocks of each of the n block tables
        (block_ids [n * width]), masked by the additive mask [n, 1, 1, width * block_size]; returns the output
        [n, KVH, rows, D] and its log-sum-exp [n, KVH, rows] (float32; None off the CPU)."""
        n = q.shape[0]
        kh, hd = self.pool.kv_heads, self.pool.head_dim
        width = block_ids.shape[0] // n  # blocks per (padded) table
        per_seq = 2 * k_pool[0].nbytes * width
        group = max(1, min(n, self.decode_chunk_bytes // per_seq))
        buf_k, buf_v = self._gather_buffers(group * width)
        outs, lses = [], []
        for s in range(0, n, group):
            e = min(n, s + group)
            ids = block_ids[s * width : e * width]
            bk, bv = buf_k[: (e - s) * width], buf_v[: (e - s) * width]
            torch.index_select(k_pool, 0, ids, out=bk)
            torch.index_select(v_pool, 0, ids, out=bv)
            keys = bk.view(e - s, -1, kh, hd).transpose(1, 2)  # [n, KVH, L, D]
            values = bv.view(e - s, -1, kh, hd).transpose(1, 2)
            if q.device.type == "cpu":  # what scaled_dot_product_attention runs, with the log-sum-exp it drops
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q[s:e], keys, values, 0.0, False, attn_mask=mask[s:e]
                )[:2]
            else:  # no shared prefixes off the CPU (ModelRunner): the log-sum-exp is not needed
                out, lse = F.scaled_dot_product_attention(q[s:e], keys, values, attn_mask=mask[s:e]), None
            outs.append(out)
            lses.append(lse)
        if len(outs) == 1:
            return outs[0], lses[0]
        return torch.cat(outs), (None if lses[0] is None else torch.cat(lses))
