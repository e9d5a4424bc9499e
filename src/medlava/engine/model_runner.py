"""Runs one engine step: packs the scheduled sequences into one row, runs the model, samples.

Image placeholders are filled from the vision cache where it has the image, from one batched
vision-tower call for the rest. A sequence whose prefix came from the KV cache gets only the
rows of its image features that its uncached positions need.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from medlava import kernels
from medlava.engine.image_cache import VisionCache
from medlava.engine.paged_attention import (
    KernelPlan,
    KVCachePool,
    PagedAttention,
    PrefillSeq,
    StepContext,
    shared_prefixes,
)
from medlava.engine.sampling import sample_batch
from medlava.engine.sequence import Sequence
from medlava.host_memory import available_bytes
from medlava.model.decoder import pack_model, place_weights
from medlava.model.llava import LlavaModel


@dataclass
class RunnerStats:
    """Work done and time spent, for the engine's metrics and the benchmark's rooflines."""

    prefill_steps: int = 0
    prefill_tokens: int = 0  # tokens computed in prefill steps (cache hits excluded)
    prefill_attn_pairs: int = 0  # (query, key) pairs attended in prefill steps
    prefill_time: float = 0.0  # includes vision encoding
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_attn_pairs: int = 0
    decode_time: float = 0.0
    images_encoded: int = 0
    vision_time: float = 0.0
    vision_lookups: int = 0
    vision_hits: int = 0


PACK_MEMORY_FRACTION = 0.5  # packed copies may take at most this share of the memory still available


def pack_linears(model: LlavaModel) -> bool:
    """Ready the model's Linear layers for inference on the CPU: their plain weights moved onto
    2 MB pages, grouped (`decoder.place_weights`, for the one-to-three-row kernel), and oneDNN-packed
    copies for more rows (`decoder.pack_model`: faster, bfloat16 bit-identical). The copies sit
    beside the plain weights, which autograd and the embedding still use, so packing happens only
    where they fit in half the memory still available: a model that barely fits in memory once is
    left unpacked. Returns whether the model is packed."""
    if model.device.type == "cpu":
        place_weights(model)
    available = available_bytes()
    return pack_model(model, None if available is None else int(PACK_MEMORY_FRACTION * available))


class ModelRunner:
    def __init__(
        self,
        model: LlavaModel,
        *,
        num_blocks: int,
        block_size: int,
        vision_cache_size: int = 0,
    ):
        cfg = model.config
        self.model = model
        self.packed_weights = pack_linears(model)
        self.device = model.device
        self.block_size = block_size
        self.kernels = kernels.ops() if self.device.type == "cpu" else None
        self.pool = KVCachePool(
            cfg.text, num_blocks, block_size, model.dtype, model.device, head_major=self.kernels is not None
        )
        self.attn = PagedAttention(
            self.pool, cfg.text.num_attention_heads, cfg.text.sliding_window, kernels=self.kernels
        )
        self.window = cfg.text.sliding_window
        self.vision_cache = VisionCache(vision_cache_size) if vision_cache_size > 0 else None
        self.stats = RunnerStats()

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    # -- images ----------------------------------------------------------------------------------

    def _image_features(self, wanted: list) -> dict[str, torch.Tensor]:
        """Features of the wanted ImageRefs by hash: cached ones looked up, the rest encoded together."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, torch.Tensor] = {}
        for ref in wanted:
            self.stats.vision_lookups += 1
            if ref.hash in found or ref.hash in missing:
                self.stats.vision_hits += 1  # shared within this step
                continue
            feats = self.vision_cache.get(ref.hash) if self.vision_cache is not None else None
            if feats is not None:
                self.stats.vision_hits += 1
                found[ref.hash] = feats
            else:
                missing[ref.hash] = ref.pixels
        if missing:
            t0 = time.perf_counter()
            encoded = self.model.encode_images(torch.stack(list(missing.values())))
            for key, feats in zip(missing, encoded, strict=True):
                found[key] = feats
                if self.vision_cache is not None:
                    self.vision_cache.put(key, feats)
            self.stats.images_encoded += len(missing)
            self.stats.vision_time += time.perf_counter() - t0
        return found

    # -- steps -----------------------------------------------------------------------------------

    def _prepare_prefill(self, seqs: list[Sequence]):
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        plan: list[PrefillSeq] = []
        slices: list[tuple[Sequence, list[tuple[int, int, int]]]] = []
        placeholders: list[int] = []  # packed indices of prompt image positions (generated ids never are)
        for seq in seqs:
            start, end = seq.num_cached_tokens, len(seq)
            q_start = len(ids)
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            last.append(len(ids) - 1)
            plan.append(PrefillSeq(q_start, end - start, end, self._tensor(table) if start else None))
            if seq.images:
                needed = seq.feature_slices(start, end)
                if needed:
                    slices.append((seq, needed))
                    lo, hi = seq.placeholder_range(start, end)
                    placeholders += [q_start + p - start for p in seq.image_positions[lo:hi]]
            self.stats.prefill_attn_pairs += self._attn_pairs(start, end)
            self.stats.prefill_tokens += end - start
        feats = None
        if slices:
            wanted = [seq.images[k] for seq, needed in slices for k, _, _ in needed]
            by_hash = self._image_features(wanted)
            parts = [by_hash[seq.images[k].hash][lo:hi] for seq, needed in slices for k, lo, hi in needed]
            feats = torch.cat(parts).unsqueeze(0)
        mask = torch.zeros(1, len(ids), dtype=torch.bool, device=self.device)
        if placeholders:
            mask[0, self._tensor(placeholders)] = True
        copies = [seq.kv_copy for seq in seqs if seq.kv_copy is not None]  # done by the attention, layer by layer
        for seq in seqs:
            seq.kv_copy = None
        ctx = StepContext(slot_mapping=self._tensor(slots), copies=copies, prefill=plan)
        if self.kernels is not None:
            ctx.kernel = KernelPlan.build(
                [s.block_table for s in seqs], [p.kv_len for p in plan], [p.q_len for p in plan], [], bs, self.device,
                copies,
            )
        return self._tensor([ids]), self._tensor([positions]), self._tensor(last), feats, mask, ctx

    def _attn_pairs(self, start: int, end: int) -> int:
        """(query, key) pairs for queries at positions [start, end) attending causally (windowed)."""
        total = (end * (end + 1) - start * (start + 1)) // 2
        if self.window is not None and end > self.window:
            over = [max(0, p + 1 - self.window) for p in range(start, end)]
            total -= sum(over)
        return total

    def _prepare_decode(self, seqs: list[Sequence]):
        bs = self.block_size
        b = len(seqs)
        lens = [len(s) for s in seqs]
        positions = [n - 1 for n in lens]
        tables = [s.block_table for s in seqs]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
        windowed = self.window is not None and max(lens) > self.window
        self.stats.decode_attn_pairs += sum(min(n, self.window) for n in lens) if windowed else sum(lens)
        self.stats.decode_tokens += b
        ctx = StepContext(slot_mapping=self._tensor(slots))
        if self.kernels is not None:
            # Shared leading blocks are read once per group; a window cutting into the contexts
            # would make most of them unseen, so then there are no groups.
            groups = [] if windowed else shared_prefixes(tables, lens, bs)
            ctx.kernel = KernelPlan.build(tables, lens, [1] * b, groups, bs, self.device)
        else:
            width = max(len(t) for t in tables)
            ctx.block_ids = self._tensor([t + [0] * (width - len(t)) for t in tables]).flatten()
            k_pos = torch.arange(width * bs, device=self.device)[None, :]
            mask = k_pos < self._tensor(lens)[:, None]
            if windowed:
                mask &= k_pos > (self._tensor(lens) - 1 - self.window)[:, None]
            ctx.mask = mask[:, None, None, :]
        ids = self._tensor([[s.last_token for s in seqs]])
        no_images = torch.zeros(1, b, dtype=torch.bool, device=self.device)  # generated ids are never placeholders
        return ids, self._tensor([positions]), None, None, no_images, ctx

    def _prompt_logprobs(self, hidden: torch.Tensor, seqs: list[Sequence], plan: list[PrefillSeq]) -> None:
        """Log-probability of each prompt token given the ones before it, for sequences that asked.

        Such sequences never start from the prefix cache, so their whole prompt is in this step's row.
        A recomputation after preemption keeps the values of the first prefill.
        """
        for seq, where in zip(seqs, plan, strict=True):
            if not seq.wants_prompt_logprobs or seq.prompt_logprobs is not None:
                continue
            assert seq.num_cached_tokens == 0, "a prompt-logprobs sequence never reuses cached KV"
            n = seq.num_prompt_tokens
            rows = hidden[where.q_start : where.q_start + n - 1]  # row i predicts prompt token i + 1
            logprobs = torch.log_softmax(self.model.lm_head(rows).float(), dim=-1)
            targets = self._tensor(seq.token_ids[1:n])
            seq.prompt_logprobs = [None, *logprobs.gather(1, targets[:, None])[:, 0].tolist()]

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        """One forward over the scheduled sequences; returns the next token of each."""
        t0 = time.perf_counter()
        if self.kernels is None:  # the torch path reads unused slots (masked): they must be finite
            self.pool.ensure_zeroed(max(max(s.block_table) for s in seqs))
        prepare = self._prepare_prefill if is_prefill else self._prepare_decode
        ids, positions, logits_at, feats, image_mask, ctx = prepare(seqs)
        self.attn.set_context(ctx)
        try:
            model = self.model
            hidden = model.decoder(model.embed(ids, feats, image_mask), positions, self.attn)[0]
            logits = model.lm_head(hidden if logits_at is None else hidden[logits_at])
            if is_prefill:
                self._prompt_logprobs(hidden, seqs, ctx.prefill)
        finally:
            self.attn.set_context(None)
        tokens = sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs])
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if wanted:  # the sampled token's log-probability under the raw distribution, as vLLM reports it
            rows = torch.log_softmax(logits[wanted].float(), dim=-1)
            picked = rows.gather(1, self._tensor([tokens[i] for i in wanted])[:, None])[:, 0].tolist()
            for i, value in zip(wanted, picked, strict=True):
                seqs[i].logprobs.append(value)
        for seq in seqs:
            seq.num_computed_tokens = len(seq)
        elapsed = time.perf_counter() - t0
        if is_prefill:
            self.stats.prefill_steps += 1
            self.stats.prefill_time += elapsed
        else:
            self.stats.decode_steps += 1
            self.stats.decode_time += elapsed
        return tokens
