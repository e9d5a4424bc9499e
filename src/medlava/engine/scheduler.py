"""Continuous batching: which sequences run in the next step, and whether it is a prefill or a decode.

Waiting sequences are admitted (prefilled) as soon as there is room in the batch, the token
budget and the KV blocks; otherwise every running sequence decodes one token. When a decode
needs a block and none is free, the newest running sequence is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed (prompt plus what it generated so
far) when there is room again.
"""

from __future__ import annotations

import time
from collections import deque

from medlava.engine.block_manager import BlockManager
from medlava.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The next step's sequences and whether the step is a prefill."""
        scheduled: list[Sequence] = []
        tokens = 0
        bm = self.block_manager
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = len(seq) - bm.num_cached_tokens(seq)
            # The first sequence of a step is always admitted, however long its prompt.
            if scheduled and tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not bm.can_allocate(seq):
                break
            bm.allocate(seq)
            tokens += new_tokens
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.perf_counter()
                seq.metrics.cached_prompt_tokens = seq.num_cached_tokens
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
        if scheduled:
            return scheduled, True

        while self.running:
            seq = self.running.popleft()
            while not bm.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())  # the newest gives way
                else:
                    self.preempt(seq)
                    break
            else:
                bm.may_append(seq)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled, False

    def preempt(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        seq.metrics.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire seq (finished or aborted) and free its blocks at once."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.metrics.finished_time = time.perf_counter()
        self.block_manager.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
