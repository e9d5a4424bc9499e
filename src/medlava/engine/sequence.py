"""One request as the engine tracks it: tokens so far, its KV blocks, its images and its timings."""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from medlava.engine.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class ImageRef:
    """One image of a prompt: its content hash and its pixels (features come from the vision cache)."""

    hash: str
    pixels: torch.Tensor  # [3, H, W], preprocessed


@dataclass
class RequestMetrics:
    """Per-request timings (seconds, `time.perf_counter` clock) and token counts."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prefix-cache hit on the request's first prefill
    output_tokens: int = 0
    preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_time(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    def to_dict(self) -> dict:
        return {
            "queue_time": self.queue_time,
            "time_to_first_token": self.time_to_first_token,
            "e2e_time": self.e2e_time,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "output_tokens": self.output_tokens,
            "preemptions": self.preemptions,
        }


_counter = itertools.count()


class Sequence:
    """Prompt plus generated tokens of one request.

    `images[k]` fills the k-th run of `image_tokens` placeholder positions of the prompt.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        budget: int,
        stop_ids: set[int],
        images: list[ImageRef] = (),
        image_token_id: int | None = None,
        image_tokens: int = 0,
        generator: torch.Generator | None = None,
    ):
        self.request_id = request_id
        self.seq_id = next(_counter)
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.budget = budget
        self.stop_ids = stop_ids
        self.images = list(images)
        self.image_tokens = image_tokens
        self.image_positions = (
            [i for i, t in enumerate(prompt_ids) if t == image_token_id] if self.images else []
        )
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # prefix-cache hashes of the full blocks, memoised
        self.num_cached_tokens = 0  # tokens whose K/V came from the prefix cache at the last allocation
        self.num_computed_tokens = 0  # tokens whose K/V is in the cache
        # (cached block, own block, n): the first n slots to copy in its next step (a partial prefix-cache hit)
        self.kv_copy: tuple[int, int, int] | None = None
        self.text = ""
        self.emitted_chars = 0
        self.finish_reason: str | None = None
        # Filled by the first prefill when params.prompt_logprobs is set (such sequences skip the prefix cache).
        self.prompt_logprobs: list[float | None] | None = None
        self.logprobs: list[float] = []  # one per generated token, when params.logprobs is set
        self.metrics = RequestMetrics(arrival_time=time.perf_counter(), prompt_tokens=len(prompt_ids))

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size

    def block_token_ids(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size : (i + 1) * block_size]

    def placeholder_range(self, start: int, end: int) -> tuple[int, int]:
        """Ordinals [lo, hi) of the image placeholders among token positions [start, end)."""
        pos = self.image_positions
        return bisect.bisect_left(pos, start), bisect.bisect_left(pos, end)

    def first_image_start(self, start: int, end: int) -> int | None:
        """The position of the first placeholder of the first image that starts in [start, end), or None."""
        lo, hi = self.placeholder_range(start, end)
        first = -(-lo // self.image_tokens) * self.image_tokens if self.image_tokens else hi
        return self.image_positions[first] if first < hi else None

    def block_image_hashes(self, i: int, block_size: int) -> tuple[str, ...]:
        """Content hashes of the images whose placeholders overlap block i (its prefix-cache extra keys)."""
        if not self.images:
            return ()
        lo, hi = self.placeholder_range(i * block_size, (i + 1) * block_size)
        if lo == hi:
            return ()
        n = self.image_tokens
        return tuple(self.images[k].hash for k in range(lo // n, (hi - 1) // n + 1))

    def feature_slices(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(image index, first row, end row) of the image features that fill positions [start, end)."""
        lo, hi = self.placeholder_range(start, end)
        n, out = self.image_tokens, []
        while lo < hi:
            k = lo // n
            stop = min(hi, (k + 1) * n)
            out.append((k, lo - k * n, stop - k * n))
            lo = stop
        return out

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)
        self.metrics.output_tokens = self.num_output_tokens

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, len={len(self)}, prompt={self.num_prompt_tokens}, "
            f"status={self.status.name}, blocks={len(self.block_table)})"
        )


@dataclass
class RequestOutput:
    """What `LLMEngine.step` reports for one request: the whole answer so far and what is new."""

    request_id: str
    text: str
    token_ids: list[int]
    delta_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    prompt_token_ids: list[int] = field(default_factory=list)
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[float | None] | None = None  # with SamplingParams.prompt_logprobs: one per prompt token
    logprobs: list[float] | None = None  # with SamplingParams.logprobs: one per generated token
    served_by: str | None = None  # the engine replica that produced it, where there are several (serve/cluster.py)
