"""Paged KV blocks: allocation, reference counts and the prefix cache.

A full block is named by a hash chaining its parent block's hash, its token ids and its extra
keys: the content hashes of the images whose placeholders it covers (placeholder ids are the
same for every image, so without them two studies would share a cache entry). Blocks with a
known hash stay reusable after their sequence frees them, until they are taken for new data in
least-recently-freed order.

A prompt's first block past its cached full blocks may still begin like a cached block (a
follow-up question on the same image: the image ends mid-block, the new question follows). That
block's first matching positions are copied into the sequence's own new block (`Sequence.kv_copy`),
so only what differs is computed. The attention copies them in each layer right after the step's
new K/V are written, so the source may be a block computed in that very step (the first question
on an image, prefilled together with its follow-ups); it is held until the step has run
(`step_done`), so that nothing else takes it meanwhile.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict

from medlava.engine.sequence import Sequence


def block_hash(parent: bytes | None, token_ids: list[int], extra_keys: tuple[str, ...] = ()) -> bytes:
    h = hashlib.sha256()
    if parent is not None:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    for key in extra_keys:
        h.update(b"\x00image:" + key.encode())
    return h.digest()


def common_length(a: list[int], b: list[int]) -> int:
    """How many leading ids a and b share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


PARTIAL_CANDIDATES = 16  # cached blocks after one parent compared for a partial match, newest first


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "parent", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.parent: bytes | None = None  # the hash of the block before it (None: the first block)
        self.token_ids: list[int] = []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one KV block of at least one token (got {num_blocks} x {block_size})")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, oldest first: taken from the front, so cached blocks freed long ago go first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.children: dict[bytes | None, dict[int, None]] = {}  # parent hash -> cached blocks after it, oldest first
        self.held: list[int] = []  # sources of this step's partial hits, released by step_done
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached-but-free blocks count as free)."""
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self.free)

    @property
    def prefix_hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    # -- hashing ---------------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, n_full: int) -> list[bytes]:
        """Hashes of seq's first `n_full` blocks (memoised on the sequence: full blocks never change)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < n_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(block_hash(parent, seq.block_token_ids(i, bs), seq.block_image_hashes(i, bs)))
        return hashes

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding seq's longest cached prefix. The block with the last token never counts:
        it is recomputed so the step has that token's logits (and a shared block is never rewritten).
        A sequence that wants prompt logprobs reuses nothing: cached positions have no logits (as in vLLM)."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []
        bs = self.block_size
        eligible = (len(seq) - 1) // bs
        hits = []
        for i, h in enumerate(self._hashes(seq, eligible)):
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != seq.block_token_ids(i, bs):
                break
            hits.append(bid)
        return hits

    def _partial_hit(self, seq: Sequence, hits: list[int]) -> tuple[int, int] | None:
        """(cached block, n): the block after `hits` whose first n > 0 positions hold what seq's
        next n tokens need, the longest such; None where there is none. The match stops before the
        last token (always computed) and before an image that starts in the block: its placeholder
        ids are the same for every image, and the parent chain names only the images before."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return None
        start = len(hits) * self.block_size
        end = min(start + self.block_size, len(seq) - 1)
        image = seq.first_image_start(start, end)
        want = seq.token_ids[start : end if image is None else image]
        parent = seq.block_hashes[len(hits) - 1] if hits else None
        best = None
        for bid in itertools.islice(reversed(self.children.get(parent, {})), PARTIAL_CANDIDATES):
            n = common_length(self.blocks[bid].token_ids, want)
            if n > 0 and (best is None or n > best[1]):
                best = (bid, n)
        return best

    # -- allocation ------------------------------------------------------------------------------

    def num_cached_tokens(self, seq: Sequence) -> int:
        """Tokens of seq that `allocate` would find in the prefix cache now."""
        hits = self._cached_prefix(seq)
        partial = self._partial_hit(seq, hits)
        return len(hits) * self.block_size + (partial[1] if partial else 0)

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        partial = self._partial_hit(seq, hits)
        hits_now_free = sum(1 for b in hits + ([partial[0]] if partial else []) if self.blocks[b].ref_count == 0)
        return seq.num_blocks(self.block_size) - len(hits) <= len(self.free) - hits_now_free

    def _take_free(self) -> int:
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:  # evict its old contents from the prefix cache
            if self.hash_to_block.get(block.hash) == bid:
                del self.hash_to_block[block.hash]
            siblings = self.children[block.parent]
            del siblings[bid]
            if not siblings:
                del self.children[block.parent]
            block.hash, block.parent, block.token_ids = None, None, []
        block.ref_count = 1
        return bid

    def _register(self, bid: int, seq: Sequence, i: int) -> None:
        """Name block `bid` as seq's full block i in the prefix cache (its K/V is computed this step)."""
        block = self.blocks[bid]
        block.hash, block.token_ids = seq.block_hashes[i], seq.block_token_ids(i, self.block_size)
        block.parent = seq.block_hashes[i - 1] if i else None
        self.hash_to_block[block.hash] = bid
        self.children.setdefault(block.parent, {})[bid] = None

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its tokens, reusing cached ones; sets `seq.num_cached_tokens`."""
        assert not seq.block_table, "sequence already holds blocks"
        bs = self.block_size
        hits = self._cached_prefix(seq)
        partial = self._partial_hit(seq, hits)
        for bid in hits:
            self._hold(bid)
            seq.block_table.append(bid)
        if partial is not None:  # held before new blocks are taken: none of them can be the source
            self._hold(partial[0])
            self.held.append(partial[0])
        n_full = len(self._hashes(seq, len(seq) // bs)) if self.enable_prefix_caching else 0
        for i in range(len(hits), seq.num_blocks(bs)):
            bid = self._take_free()
            if i < n_full:  # full: its K/V is written this step, before anyone can read it
                self._register(bid, seq, i)
            seq.block_table.append(bid)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * bs
        if partial is not None:
            seq.kv_copy = (partial[0], seq.block_table[len(hits)], partial[1])
            seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * bs + partial[1]
        if self.enable_prefix_caching:
            self.queried_tokens += len(seq)
            self.hit_tokens += seq.num_cached_tokens

    def _hold(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self.free[bid]
        block.ref_count += 1

    def _release(self, bid: int) -> None:
        """Drop one reference; a block nobody holds becomes free (a hashed one stays findable)."""
        block = self.blocks[bid]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[bid] = None
            if block.hash is None:  # nothing worth keeping: reuse it before cached blocks
                self.free.move_to_end(bid, last=False)

    def deallocate(self, seq: Sequence) -> None:
        """Drop seq's references (see `_release`)."""
        for bid in reversed(seq.block_table):
            self._release(bid)
        seq.block_table, seq.kv_copy = [], None
        seq.num_cached_tokens = seq.num_computed_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Whether seq's newest token has a slot (a new block is needed when it starts one)."""
        return len(seq.block_table) >= seq.num_blocks(self.block_size) or len(self.free) > 0

    def may_append(self, seq: Sequence) -> None:
        """Make room for seq's newest token; register the last block once this step fills it."""
        bs = self.block_size
        if len(seq.block_table) < seq.num_blocks(bs):
            seq.block_table.append(self._take_free())
        if self.enable_prefix_caching and len(seq) % bs == 0:
            i = len(seq) // bs - 1
            self._hashes(seq, i + 1)
            self._register(seq.block_table[i], seq, i)

    def step_done(self) -> None:
        """The scheduled step has run (or failed): its partial hits' sources are released."""
        for bid in self.held:
            self._release(bid)
        self.held.clear()

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (after a failed step, when blocks may hold half-written K/V)."""
        self.hash_to_block.clear()
        self.children.clear()
        for block in self.blocks:
            block.hash, block.parent, block.token_ids = None, None, []

    def all_free(self) -> bool:
        return len(self.free) == len(self.blocks) and all(b.ref_count == 0 for b in self.blocks)
