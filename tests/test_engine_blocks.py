"""Block manager and scheduler on their own: paging, reference counts, image-aware prefix hashes, preemption."""

from __future__ import annotations

import platform

import pytest
import torch

from medlava.engine.block_manager import BlockManager
from medlava.engine.image_cache import VisionCache, image_hash
from medlava.engine.sampling import SamplingParams
from medlava.engine.scheduler import Scheduler
from medlava.engine.sequence import ImageRef, Sequence

IMG = 99  # placeholder id
N_IMG = 6  # placeholders per image


def seq(tokens: list[int], images: list[str] = (), max_tokens: int = 8) -> Sequence:
    refs = [ImageRef(h, torch.zeros(3, 2, 2)) for h in images]
    return Sequence(
        "r", tokens, SamplingParams(max_tokens=max_tokens), budget=max_tokens, stop_ids=set(),
        images=refs, image_token_id=IMG, image_tokens=N_IMG,
    )


def image_prompt(question: list[int]) -> list[int]:
    return [1, 5, 6] + [IMG] * N_IMG + question  # image at positions 3..8


def test_same_image_hits_and_other_image_misses():
    bm = BlockManager(num_blocks=32, block_size=4)
    a = seq(image_prompt([20, 21, 22, 23, 24]), ["imgA"])
    bm.allocate(a)
    assert a.num_cached_tokens == 0 and len(a.block_table) == 4
    # Same image, another question: blocks 0 and 1 (positions 0-7, image partly) are shared, the
    # image's last position (the first of block 2) is copied.
    b = seq(image_prompt([30, 31, 32, 33, 34]), ["imgA"])
    bm.allocate(b)
    assert b.num_cached_tokens == 9 and b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    # A different image with the same text: only the block before the image matches.
    c = seq(image_prompt([20, 21, 22, 23, 24]), ["imgB"])
    bm.allocate(c)
    assert c.num_cached_tokens == 3  # block 0 holds position 3, an image position: only the text before is copied
    d = seq([1, 5, 6, 7] + [IMG] * N_IMG + [20], ["imgB"])
    e = seq([1, 5, 6, 7] + [IMG] * N_IMG + [21], ["imgC"])
    bm.allocate(d)
    bm.allocate(e)
    assert e.num_cached_tokens == 4 and e.block_table[0] == d.block_table[0]  # text-only first block


def test_block_hashes_chain_parents_and_image_keys():
    x = seq(image_prompt([20, 21, 22]), ["imgA"])
    y = seq(image_prompt([20, 21, 22]), ["imgB"])
    assert x.block_image_hashes(0, 4) == ("imgA",) and x.block_image_hashes(2, 4) == ("imgA",)
    assert x.block_image_hashes(3, 4) == ()
    bm = BlockManager(8, 4)
    hx, hy = bm._hashes(x, 3), bm._hashes(y, 3)
    assert hx[0] != hy[0] and hx[2] != hy[2]


def test_last_token_is_always_recomputed():
    bm = BlockManager(16, 4)
    a = seq(list(range(1, 9)))  # exactly two full blocks
    bm.allocate(a)
    b = seq(list(range(1, 9)))
    bm.allocate(b)
    # The block holding the last prompt token is not shared; its start is copied, not its last token.
    assert b.num_cached_tokens == 7 and b.kv_copy == (a.block_table[1], b.block_table[1], 3)
    assert b.block_table[1] != a.block_table[1]


def test_partial_block_hit_copies_the_shared_start_of_a_computed_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(image_prompt([20, 21, 22, 23, 24]), ["imgA"])  # image at 3..8, then the question
    bm.allocate(a)
    b = seq(image_prompt([20, 21, 30, 31, 32]), ["imgA"])  # parts from a at position 11
    assert bm.num_cached_tokens(b) == 11  # a's block 2 is computed in this same step, before the copy
    bm.allocate(b)
    assert b.num_cached_tokens == 11 and b.block_table[:2] == a.block_table[:2]
    assert b.kv_copy == (a.block_table[2], b.block_table[2], 3) and b.block_table[2] != a.block_table[2]
    assert bm.blocks[a.block_table[2]].ref_count == 2  # copied from, not shared: held for the step
    bm.step_done()
    assert bm.blocks[a.block_table[2]].ref_count == 1

    # The same image, stopping one token short: the last token is always computed.
    c = seq(image_prompt([20, 21]), ["imgA"])
    bm.allocate(c)
    assert c.num_cached_tokens == 10 and c.kv_copy[2] == 2


def test_partial_block_hit_stops_where_an_image_starts():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = [1, 5, 6, 7, 8] + [IMG] * N_IMG + [20]  # image at 5..10
    a = seq(tokens, ["imgA"])
    bm.allocate(a)
    bm.step_done()
    other = seq(tokens, ["imgB"])  # block 1 is [8, IMG, IMG, IMG]: only the 8 is known
    bm.allocate(other)
    assert other.num_cached_tokens == 5 and other.kv_copy == (a.block_table[1], other.block_table[1], 1)
    bm.step_done()
    same = seq(tokens, ["imgA"])
    bm.allocate(same)
    assert same.num_cached_tokens == len(tokens) - 1


def test_evicted_blocks_leave_no_partial_candidates():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(1, 10)))
    bm.allocate(a)
    bm.step_done()
    bm.deallocate(a)
    filler = seq(list(range(50, 66)))  # takes every block, evicting a's
    bm.allocate(filler)
    assert {b for blocks in bm.children.values() for b in blocks} == set(filler.block_table)
    bm.deallocate(filler)
    assert bm.num_cached_tokens(seq(list(range(1, 8)))) == 0


def test_ref_counts_free_and_lru_eviction():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    cached = list(a.block_table[:2])  # two full blocks, hashed
    bm.deallocate(a)
    assert bm.all_free() and bm.num_free_blocks == 6
    # Freed blocks with hashes stay findable...
    b = seq([1, 2, 3, 4, 9])
    assert bm.num_cached_tokens(b) == 4
    bm.allocate(b)
    assert b.block_table[:2] == cached and b.num_cached_tokens == 4
    bm.deallocate(b)
    # ...until new data needs their space: unhashed free blocks go first, then the least recently freed.
    c = seq(list(range(20, 31)))  # 6 blocks: everything
    assert bm.can_allocate(c)
    bm.allocate(c)
    assert bm.num_free_blocks == 0
    assert bm.num_cached_tokens(seq([1, 2, 3, 4, 5])) == 0
    bm.deallocate(c)
    assert bm.all_free()


def test_can_allocate_counts_cached_free_blocks_as_consumed():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    bm.deallocate(a)
    b = seq([1, 2, 3, 4, 6])  # 2 hits (both free) + 1 new = all 3 blocks
    assert bm.can_allocate(b)
    c = seq([1, 2, 3, 4, 6, 7, 8])  # 2 hits + 2 new > 3
    assert not bm.can_allocate(c)


def test_append_takes_a_block_only_when_one_starts_and_registers_full_blocks():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3])
    bm.allocate(a)
    assert len(a.block_table) == 2
    a.append_token(4)
    bm.may_append(a)  # position 3 fits block 1, which this step fills
    assert len(a.block_table) == 2 and bm.blocks[a.block_table[1]].hash is not None
    a.append_token(5)
    assert bm.can_append(a)
    bm.may_append(a)
    assert len(a.block_table) == 3


def test_no_prefix_caching_means_no_sharing():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a, b = seq([1, 2, 3, 4, 5]), seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)


def test_scheduler_limits_and_preempts_newest():
    bm = BlockManager(num_blocks=6, block_size=2)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [seq([10 + i, 20 + i, 30 + i]) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch, prefill = sched.schedule()
    assert prefill and batch == seqs[:2]  # max_num_seqs
    for s in batch:
        s.append_token(1)
    batch, prefill = sched.schedule()
    assert not prefill and batch == seqs[:2]  # a full batch decodes; the third waits
    for s in batch:
        s.append_token(2)
    # Position 4 starts a third block for each; 6 blocks, 4 used: both fit.
    batch, _ = sched.schedule()
    assert len(batch) == 2 and bm.num_free_blocks == 0
    for s in batch:
        s.append_token(3)
    batch, _ = sched.schedule()  # position 5: same block
    for s in batch:
        s.append_token(4)
    # Position 6 needs a fourth block each and none is free: the newest is preempted to make room.
    batch, prefill = sched.schedule()
    assert not prefill and batch == [seqs[0]]
    assert sched.num_preemptions == 1 and sched.waiting[0] is seqs[1] and not seqs[1].block_table


def test_scheduler_token_budget_admits_at_least_one():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    big, small = seq(list(range(1, 30))), seq([1, 2, 3])
    sched.add(big)
    sched.add(small)
    batch, prefill = sched.schedule()
    assert prefill and batch == [big]


def test_image_hash_depends_on_pixels_and_settings():
    p = torch.rand(3, 8, 8)
    assert image_hash(p, "pad") == image_hash(p.clone(), "pad")
    assert image_hash(p, "pad") != image_hash(p, "crop")
    q = p.clone()
    q[0, 0, 0] += 1e-3
    assert image_hash(p, "pad") != image_hash(q, "pad")


def test_vision_cache_is_lru_and_bounded():
    cache = VisionCache(2)
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.zeros(1))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", torch.zeros(1))
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    with pytest.raises(ValueError):
        VisionCache(0)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_engine_keeps_freed_memory_with_glibc():
    from medlava.host_memory import keep_freed_memory

    assert keep_freed_memory() is True and keep_freed_memory() is True  # once, then a no-op
