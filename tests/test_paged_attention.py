"""Paged attention, the CPU kernel and the portable torch path, against `decoder.attend` over the
same K/V laid out contiguously: prefill with and without a cached prefix, decode, shared prefixes,
sliding windows, grouped-query heads, float32 and bfloat16, odd head and block sizes."""

from __future__ import annotations

import pytest
import torch

from medlava.engine.paged_attention import KernelPlan, KVCachePool, PagedAttention, PrefillSeq, StepContext
from medlava.model.config import TextConfig
from medlava.model.decoder import attend


def make_case(dtype, heads, kv_heads, head_dim, block_size, seqs, *, head_major, groups=(), seed=0):
    """A pool holding random K/V for sequences given as (kv_len, q_len): the first kv_len - q_len
    tokens cached, the last q_len new this step. Sequences in a group share their first blocks."""
    g = torch.Generator().manual_seed(seed)
    cfg = TextConfig(num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    n_blocks = sum(-(-n // block_size) for n, _ in seqs) + 4
    pool = KVCachePool(cfg, n_blocks, block_size, dtype, "cpu", head_major=head_major)
    pool.ensure_zeroed(n_blocks - 1)
    free = torch.randperm(n_blocks, generator=g).tolist()  # scattered blocks, as after some churn
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n, _ in seqs]
    ks = [torch.randn(kv_heads, n, head_dim, generator=g).to(dtype) for n, _ in seqs]
    vs = [torch.randn(kv_heads, n, head_dim, generator=g).to(dtype) for n, _ in seqs]
    for shared, members in groups:  # members share the first member's leading blocks and K/V
        for m in members[1:]:
            tables[m][: shared // block_size] = tables[members[0]][: shared // block_size]
            ks[m][:, :shared], vs[m][:, :shared] = ks[members[0]][:, :shared], vs[members[0]][:, :shared]
    for table, k, v, (n, q_len) in zip(tables, ks, vs, seqs, strict=True):  # the cached part goes in directly
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n - q_len)], dtype=torch.long)
        pool.write(0, slots, k[:, : n - q_len].transpose(0, 1), v[:, : n - q_len].transpose(0, 1))
    q = torch.randn(1, heads, sum(q_len for _, q_len in seqs), head_dim, generator=g).to(dtype)
    new_k = torch.cat([k[:, n - q_len :] for k, (n, q_len) in zip(ks, seqs, strict=True)], dim=1)[None]
    new_v = torch.cat([v[:, n - q_len :] for v, (n, q_len) in zip(vs, seqs, strict=True)], dim=1)[None]
    slots = torch.tensor([
        t[p // block_size] * block_size + p % block_size for t, (n, q_len) in zip(tables, seqs, strict=True)
        for p in range(n - q_len, n)
    ])
    return pool, tables, ks, vs, q, new_k, new_v, slots


def check(out, q, ks, vs, seqs, window, dtype):
    start = 0
    for k, v, (_, q_len) in zip(ks, vs, seqs, strict=True):
        q_i = q[:, :, start : start + q_len].float()
        want = attend(q_i, k[None].float(), v[None].float(), window)
        got = out[:, :, start : start + q_len].float()
        tol = 2e-6 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got, want, atol=tol, rtol=tol), (seqs, (got - want).abs().max())
        start += q_len


CASES = {  # heads, kv_heads, head_dim, block_size, (kv_len, q_len) per sequence, window, groups
    "decode": (4, 2, 8, 4, [(5, 1), (11, 1), (8, 1), (3, 1), (9, 1)], None, []),
    "prefill": (12, 4, 64, 16, [(240, 240), (250, 48), (30, 30), (17, 1)], None, []),
    "shared-prefix decode": (12, 4, 64, 16, [(240, 1), (250, 1), (260, 1), (100, 1), (208, 1)], None, [(192, [0, 1, 2])]),
    "window, multi-head": (8, 8, 16, 4, [(40, 40), (45, 5), (30, 1)], 12, []),
    "window, one kv head": (4, 1, 24, 8, [(40, 40), (45, 5), (30, 1)], 7, []),
    "odd sizes, groups": (6, 3, 40, 5, [(23, 23), (45, 5), (30, 1), (31, 1)], None, [(30, [2, 3])]),
    "head_dim 128, long": (8, 2, 128, 32, [(300, 300), (345, 45), (270, 1), (271, 1)], None, [(256, [2, 3])]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_cpu_kernel_equals_contiguous_attention(cpu_kernels, case, dtype):
    heads, kv_heads, head_dim, bs, seqs, window, groups = CASES[case]
    pool, tables, ks, vs, q, new_k, new_v, slots = make_case(
        dtype, heads, kv_heads, head_dim, bs, seqs, head_major=True, groups=groups
    )
    attn = PagedAttention(pool, heads, window, kernels=cpu_kernels)
    group_blocks = [(shared // bs, members) for shared, members in groups]
    plan = KernelPlan.build(tables, [n for n, _ in seqs], [q_len for _, q_len in seqs], group_blocks, bs, "cpu")
    attn.set_context(StepContext(slot_mapping=slots, kernel=plan))
    check(attn(0, q, new_k, new_v), q, ks, vs, seqs, window, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["decode", "window, one kv head", "odd sizes, groups"])
def test_torch_path_equals_contiguous_attention(case, dtype):
    heads, kv_heads, head_dim, bs, seqs, window, _ = CASES[case]
    pool, tables, ks, vs, q, new_k, new_v, slots = make_case(dtype, heads, kv_heads, head_dim, bs, seqs, head_major=False)
    attn = PagedAttention(pool, heads, window)
    for phase in ("prefill", "decode"):  # the torch path takes one kind of step at a time
        if phase == "decode" and any(q_len != 1 for _, q_len in seqs):
            continue
        if phase == "decode":
            width = max(len(t) for t in tables)
            k_pos = torch.arange(width * bs)[None, :]
            lens = torch.tensor([n for n, _ in seqs])[:, None]
            mask = (k_pos < lens) & (k_pos > lens - 1 - window if window else True)
            ctx = StepContext(
                slot_mapping=slots, block_ids=torch.tensor([b for t in tables for b in t + [0] * (width - len(t))]),
                mask=mask[:, None, None, :],
            )
        else:
            starts = torch.tensor([0] + [q_len for _, q_len in seqs]).cumsum(0).tolist()
            ctx = StepContext(slot_mapping=slots, prefill=[
                PrefillSeq(starts[i], q_len, n, torch.tensor(t) if n > q_len else None)
                for i, (t, (n, q_len)) in enumerate(zip(tables, seqs, strict=True))
            ])
        attn.set_context(ctx)
        check(attn(0, q, new_k, new_v), q, ks, vs, seqs, window, dtype)


@pytest.mark.parametrize("case", ["odd sizes, groups", "shared-prefix decode", "head_dim 128, long"])
def test_unused_slots_change_nothing(cpu_kernels, case):
    """Unused slots may hold anything (a block is reused without being cleared): NaN there changes
    nothing, though float32 keys are read in place a vector of tokens at a time, past a sequence's end."""
    heads, kv_heads, head_dim, bs, seqs, window, groups = CASES[case]
    pool, tables, ks, vs, q, new_k, new_v, slots = make_case(
        torch.float32, heads, kv_heads, head_dim, bs, seqs, head_major=True, groups=groups
    )
    used = {t[p // bs] * bs + p % bs for t, (n, _) in zip(tables, seqs, strict=True) for p in range(n)}
    for slot in set(range(pool.num_blocks * bs)) - used:
        pool.k[0, slot // bs, :, :, slot % bs] = float("nan")
        pool.v[0, slot // bs, :, slot % bs] = float("nan")
    attn = PagedAttention(pool, heads, window, kernels=cpu_kernels)
    plan = KernelPlan.build(tables, [n for n, _ in seqs], [q for _, q in seqs], [(s // bs, m) for s, m in groups], bs, "cpu")
    attn.set_context(StepContext(slot_mapping=slots, kernel=plan))
    check(attn(0, q, new_k, new_v), q, ks, vs, seqs, window, torch.float32)


def test_shared_prefixes_group_decode_sequences_by_their_common_full_blocks(monkeypatch):
    from medlava.engine import paged_attention
    from medlava.engine.paged_attention import shared_prefixes

    monkeypatch.setattr(paged_attention, "MIN_SHARED_TOKENS", 8)
    tables = [[7, 8, 9, 20], [7, 8, 9, 21], [7, 8, 22], [3, 4, 5], [7, 8, 9, 23], [30, 31]]
    lengths = [15, 16, 12, 10, 13, 8]
    # 0, 1 and 4 share blocks 7, 8, 9; 2 shares only 7, 8 with them and is left alone, as are 3 and 5.
    assert shared_prefixes(tables, lengths, 4) == [(3, [0, 1, 4])]
    # A block all share (a system prompt) does not hide the deeper groups (two images).
    system = [[1, 10, 11, 50], [1, 10, 11, 51], [1, 20, 21, 52], [1, 20, 21, 53], [1, 60, 61]]
    assert sorted(shared_prefixes(system, [16, 16, 16, 16, 12], 4)) == [(3, [0, 1]), (3, [2, 3])]
    # A block holding a sequence's newest token is never shared: 2's newest (position 8) is in block 22,
    # 0's would be in block 9 at length 9, which caps the group at its first two blocks as well.
    assert shared_prefixes([[7, 8, 9], [7, 8, 9, 4]], [9, 16], 4) == [(2, [0, 1])]
    assert shared_prefixes([[7, 8, 9], [7, 8, 9, 4]], [5, 16], 4) == []  # one block: under 8 tokens
    # A prefix shared by more than MAX_GROUP sequences is split into groups of at most MAX_GROUP.
    monkeypatch.setattr(paged_attention, "MAX_GROUP", 3)
    many = [[7, 8, 9, 40 + i] for i in range(7)]
    groups = shared_prefixes(many, [16] * 7, 4)
    assert sorted(sorted(m) for _, m in groups) == [[0, 3, 6], [1, 4], [2, 5]] and {n for n, _ in groups} == {3}
