"""The engine: requests in (`add_request`), one batched step at a time (`step`), outputs back.

`LLMEngine` is synchronous and single-threaded; `async_engine.AsyncLLMEngine` drives it from a
background thread and streams each request's outputs (what a server needs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medlava.chat.image_processing import preprocess
from medlava.chat.images import ImageInput, open_image
from medlava.chat.messages import render_messages
from medlava.chat.templates import get_template
from medlava.chat.tokenize import tokenize_prompt
from medlava.engine.block_manager import BlockManager
from medlava.engine.image_cache import image_hash
from medlava.engine.model_runner import ModelRunner
from medlava.engine.paged_attention import KVCachePool
from medlava.engine.reference import eos_ids, find_stop
from medlava.engine.sampling import SamplingParams
from medlava.engine.scheduler import Scheduler
from medlava.engine.sequence import ImageRef, RequestOutput, Sequence
from medlava.host_memory import keep_freed_memory
from medlava.model.demo import resolve_model
from medlava.model.loader import LoadedModel, load_model

DEFAULT_CPU_KV_MEMORY = 1 << 30  # bytes; on CUDA the default is a share of free GPU memory
CUDA_KV_FRACTION = 0.8

ImageLike = ImageInput | torch.Tensor  # a tensor is taken as already preprocessed pixels


# -- metrics -------------------------------------------------------------------------------------


@dataclass
class EngineMetrics:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float  # prompt tokens found in the KV cache / prompt tokens looked up
    vision_cache_hit_rate: float  # images served without the vision tower / images needed
    preemptions: int
    prompt_tokens: int
    cached_prompt_tokens: int
    generation_tokens: int
    images_encoded: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# -- the engine ----------------------------------------------------------------------------------


class LLMEngine:
    """Paged-KV, continuously batching LLaVA engine.

    model: a model folder, an already loaded `LoadedModel` (then dtype, device, vision_tower and
    quantization are its own), or None for the shipped demo model. quantization: "int8" or
    "int4" weight-only for the decoder layers (model/quant.py; CPU).
    kv_cache_memory / num_blocks: the KV pool size in bytes or blocks (default: 1 GiB on CPU,
    80 % of free memory on CUDA; memory is touched only as blocks are used).
    max_num_seqs / max_num_batched_tokens: the running batch and a prefill step's token budget
    (a longer prompt still runs, alone). enable_prefix_caching: share KV blocks between prompts
    with the same prefix (images included) and keep the last `vision_cache_size` images' features.
    """

    def __init__(
        self,
        model: str | Path | LoadedModel | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str = "cpu",
        vision_tower: str | Path | None = None,
        quantization: str | None = None,
        conv_mode: str | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 4096,
        enable_prefix_caching: bool = True,
        vision_cache_size: int = 32,
    ):
        if isinstance(model, LoadedModel):
            self.lm = model
        else:  # None: the shipped demo model (a clear ModelLoadError while it is missing)
            path = resolve_model(model)
            self.lm = load_model(path, vision_tower=vision_tower, dtype=dtype, device=device, quantization=quantization)
        if conv_mode is not None:
            get_template(conv_mode)  # fail early on a typo
            self.lm.conv_mode = conv_mode
        self.model = self.lm.model
        if self.model.device.type == "cpu":
            keep_freed_memory()
        self.tokenizer = self.lm.tokenizer
        self.config = self.lm.config
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        n_blocks = self._num_blocks(num_blocks, kv_cache_memory, max_num_seqs)
        self.block_manager = BlockManager(n_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(
            self.model,
            num_blocks=n_blocks,
            block_size=block_size,
            vision_cache_size=vision_cache_size if enable_prefix_caching else 0,
        )
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        self.requests: dict[str, Sequence] = {}
        self.generation_tokens = 0

    def _num_blocks(self, num_blocks: int | None, memory: int | None, max_num_seqs: int) -> int:
        if num_blocks is not None:
            if num_blocks < 1:
                raise ValueError(f"num_blocks must be positive, got {num_blocks}")
            return num_blocks
        per_block = KVCachePool.bytes_per_block(self.config.text, self.block_size, self.model.dtype)
        if memory is None:
            device = self.model.device
            if device.type == "cuda":
                memory = int(torch.cuda.mem_get_info(device)[0] * CUDA_KV_FRACTION)
            else:
                memory = DEFAULT_CPU_KV_MEMORY
        n = memory // per_block
        if n < 1:
            raise ValueError(f"kv_cache_memory of {memory} bytes holds no KV block ({per_block} bytes each)")
        # Never more than every sequence at full context could use.
        ceiling = max_num_seqs * -(-self.config.text.max_position_embeddings // self.block_size)
        return min(n, ceiling)

    # -- requests --------------------------------------------------------------------------------

    def pixels_of(self, image: ImageLike) -> torch.Tensor:
        """Preprocessed [3, H, W] pixels (tensors are taken as already preprocessed)."""
        if isinstance(image, torch.Tensor):
            pixels = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
            if pixels.dim() != 3:
                raise ValueError(f"pixel tensors must be [3, H, W], got {tuple(image.shape)}")
            return pixels
        return preprocess(open_image(image)[0], self.lm.image_processing)

    def make_sequence(
        self,
        request_id: str,
        prompt: str | list[int] | None = None,
        images: list[ImageLike] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
    ) -> Sequence:
        """Everything about a request that needs no engine state: images read and hashed, prompt tokenized."""
        params = params or SamplingParams()
        images = list(images or [])
        cfg = self.config
        if messages is not None:
            if prompt is not None or images:
                raise ValueError("a request with messages takes its images from them: give no prompt or images")
            prompt, images = render_messages(messages, get_template(self.lm.conv_mode))
        if prompt is None:
            raise ValueError("a request needs a prompt (text or token ids) or messages")
        if isinstance(prompt, str):
            ids = tokenize_prompt(self.tokenizer, prompt, cfg.image_token_id, cfg.image_tokens)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        slots = sum(1 for t in ids if t == cfg.image_token_id)
        if slots != len(images) * cfg.image_tokens:
            raise ValueError(
                f"prompt has {slots} image-token positions but {len(images)} image(s) give "
                f"{len(images) * cfg.image_tokens} (each <image> expands to {cfg.image_tokens})"
            )
        refs = []
        for image in images:
            pixels = self.pixels_of(image)
            key = image_hash(pixels, self.lm.image_processing)  # on the host, before the copy to the device
            refs.append(ImageRef(key, pixels.to(self.model.device)))
        max_len = cfg.text.max_position_embeddings
        budget = min(params.max_tokens, max_len - len(ids))
        if budget < 1:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the {max_len}-token context")
        need = -(-(len(ids) + budget - 1) // self.block_size)
        if need > self.block_manager.num_blocks:
            raise ValueError(
                f"request {request_id!r} needs up to {need} KV blocks ({len(ids)} prompt + {budget} new tokens) "
                f"but the cache holds {self.block_manager.num_blocks}: raise kv_cache_memory (--kv-cache-memory) or lower max_tokens"
            )
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        return Sequence(
            request_id,
            ids,
            params,
            budget=budget,
            stop_ids=stop_ids,
            images=refs,
            image_token_id=cfg.image_token_id,
            image_tokens=cfg.image_tokens,
            generator=params.generator(self.model.device),
        )

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | None = None,
        images: list[ImageLike] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
    ) -> None:
        """Queue a request: prompt text (with `<image>` per image), prompt token ids (placeholders
        already expanded), or OpenAI-style `messages`."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.add_sequence(self.make_sequence(request_id, prompt, images, params, messages=messages))

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it is unknown or already finished."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- stepping --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch (a prefill or a decode) and report every request it advanced."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        try:
            tokens = self.runner.run(seqs, is_prefill)
        except BaseException:
            # Nothing of this step can be trusted: its sequences start over, no cached block is reused.
            self.block_manager.reset_prefix_cache()
            for seq in reversed(seqs):
                self.scheduler.preempt(seq)
            raise
        finally:
            self.block_manager.step_done()
        now = time.perf_counter()
        outputs = []
        for seq, token in zip(seqs, tokens, strict=True):
            self._append(seq, token, now)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq, seq.finish_reason)
                self.requests.pop(seq.request_id, None)
            outputs.append(self._output(seq, token))
        self.generation_tokens += len(seqs)
        return outputs

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        """Add a sampled token and apply the reference loop's stopping rules."""
        seq.append_token(token)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        out = seq.output_ids
        if token in seq.stop_ids:
            seq.text = self.tokenizer.decode(out[:-1], skip_special_tokens=True)
            seq.finish_reason = "stop"
            return
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        cut = find_stop(text, seq.params.stop)
        if cut is not None:
            text, seq.finish_reason = text[:cut], "stop"
        elif len(out) >= seq.budget:
            seq.finish_reason = "length"
        seq.text = text

    def _output(self, seq: Sequence, token: int) -> RequestOutput:
        text = seq.text
        end = len(text)
        finished = seq.finish_reason is not None
        if not finished:
            # Hold back a trailing partial character and anything that may be the start of a stop string.
            while end > seq.emitted_chars and text[end - 1] == "\ufffd":
                end -= 1
            hold = max(
                (k for s in seq.params.stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0
            )
            end -= hold
        delta = text[seq.emitted_chars : end] if end > seq.emitted_chars else ""
        seq.emitted_chars = max(seq.emitted_chars, end)
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=seq.output_ids,
            delta_text=delta,
            new_token_ids=[token],
            finished=finished,
            finish_reason=seq.finish_reason,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens] if finished else [],
            metrics=seq.metrics,
            prompt_logprobs=seq.prompt_logprobs,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
        )

    # -- metrics ---------------------------------------------------------------------------------

    def metrics(self) -> EngineMetrics:
        bm, stats = self.block_manager, self.runner.stats
        return EngineMetrics(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            prefix_cache_hit_rate=bm.prefix_hit_rate,
            vision_cache_hit_rate=stats.vision_hits / stats.vision_lookups if stats.vision_lookups else 0.0,
            preemptions=self.scheduler.num_preemptions,
            prompt_tokens=bm.queried_tokens,
            cached_prompt_tokens=bm.hit_tokens,
            generation_tokens=self.generation_tokens,
            images_encoded=stats.images_encoded,
        )
