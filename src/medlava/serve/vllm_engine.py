"""`medlava serve --backend vllm`: the serving surface `create_app` needs, on vLLM's async engine.

vLLM runs the model (its CPU build, one GPU, or several with tensor and pipeline parallelism);
medlava keeps everything around it. Images are read by medlava's loader (DICOM, NIfTI, PNG/JPEG,
identifiers never kept), the conversation is rendered in the model's LLaVA-Med template and
tokenized by medlava, and vLLM gets those token ids (one placeholder per image, which its llava
model expands) with each image padded to square as LLaVA pads it. vLLM never applies a chat
template of its own, so the prompt is exactly the one medlava's engine would run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from medlava.chat.image_processing import ImageProcessing, pad_to_square
from medlava.chat.images import open_image
from medlava.chat.messages import render_messages
from medlava.chat.templates import get_template
from medlava.chat.tokenize import tokenize_prompt
from medlava.engine.llm_engine import DEFAULT_CPU_KV_MEMORY, EngineMetrics
from medlava.engine.sampling import SamplingParams
from medlava.engine.sequence import RequestMetrics, RequestOutput
from medlava.errors import MedlavaError
from medlava.model.loader import (
    aspect_ratio,
    bound_context,
    default_conv_mode,
    detect_layout,
    hf_config,
    load_tokenizer,
    read_json,
)

logger = logging.getLogger("medlava.serve")

INSTALL_HINT = ("--backend vllm needs vLLM: pip install 'medlava[vllm]' on a CUDA machine, or "
                "bash bench/peers/setup_vllm.sh --with-medlava for vLLM's CPU build")
MAX_IMAGES = 8  # images per request vLLM makes room for (its limit_mm_per_prompt)


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise MedlavaError(INSTALL_HINT) from None


def check_folder(folder: Path) -> dict:
    """The folder's config; a clear error unless it is a Hugging Face Llava folder vLLM can load."""
    raw = read_json(folder / "config.json")
    if detect_layout(raw) != "hf":
        raise MedlavaError(f"{folder} is an original LLaVA-Med folder: --backend vllm serves Hugging Face Llava "
                           f"folders; write one with: medlava convert {folder} OUT")
    from safetensors import safe_open

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            if any(k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") for k in f.keys()):
                raise MedlavaError(f"{folder} keeps its vision tower as vision_tower.* (as transformers 5 saves it), "
                                   f"which vLLM cannot load: rewrite it with medlava convert {folder} OUT")
    return raw


def vllm_sampling(params: SamplingParams):
    """medlava's sampling settings as vLLM's, its outputs as deltas."""
    from vllm import SamplingParams as VParams
    from vllm.sampling_params import RequestOutputKind

    return VParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1,
        seed=params.seed, max_tokens=params.max_tokens, stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None, ignore_eos=params.ignore_eos,
        logprobs=params.logprobs, output_kind=RequestOutputKind.DELTA,
    )


class VLLMEngine:
    """vLLM's `AsyncLLM` behind the methods `create_app` calls: `generate`, `num_unfinished`,
    `metrics`, `shutdown`, `model_name` and `conv_mode`."""

    def __init__(
        self,
        folder: str | Path,
        *,
        dtype: str | None = None,
        conv_mode: str | None = None,
        kv_cache_memory: int | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        ray: bool = False,
    ):
        require_vllm()
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        folder = Path(folder)
        raw = check_folder(folder)
        cfg = hf_config(folder, raw)
        bound_context(cfg, raw)
        self.model_name = folder.name
        self.conv_mode = conv_mode or default_conv_mode(raw, "hf", cfg)
        self.template = get_template(self.conv_mode)  # an unknown name fails here, before vLLM loads
        self.tokenizer = load_tokenizer(folder)
        self.image_token_id = cfg.image_token_id
        self.processing = ImageProcessing.from_file(folder / "preprocessor_config.json", aspect_ratio(raw),
                                                    cfg.vision.image_size)
        if current_platform.is_cpu():
            if ray:
                raise MedlavaError("vLLM's CPU build runs no Ray workers: --ray-address with --backend vllm needs GPUs")
            if kv_cache_memory is None:
                kv_cache_memory = DEFAULT_CPU_KV_MEMORY  # as medlava's engine; vLLM's own CPU default takes most of RAM
        args = AsyncEngineArgs(
            model=str(folder), dtype=dtype or "auto", seed=0, max_model_len=cfg.text.max_position_embeddings,
            enable_prefix_caching=True, limit_mm_per_prompt={"image": MAX_IMAGES},
            tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            kv_cache_memory_bytes=kv_cache_memory, distributed_executor_backend="ray" if ray else None,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.in_flight = 0
        self.totals = {"prompt": 0, "cached": 0, "generated": 0, "images": 0}

    def num_unfinished(self) -> int:
        return self.in_flight

    def metrics(self) -> EngineMetrics:
        """What medlava counts of the requests it sent (vLLM keeps its KV figures to itself)."""
        t = self.totals
        return EngineMetrics(
            running=self.in_flight, waiting=0, kv_blocks_used=0, kv_blocks_total=0,
            prefix_cache_hit_rate=t["cached"] / t["prompt"] if t["prompt"] else 0.0, vision_cache_hit_rate=0.0,
            preemptions=0, prompt_tokens=t["prompt"], cached_prompt_tokens=t["cached"],
            generation_tokens=t["generated"], images_encoded=t["images"],
        )

    def prompt(self, messages: list[dict]) -> dict:
        """The vLLM prompt for OpenAI-style `messages`: medlava's token ids, one placeholder per
        image, and the images padded as LLaVA pads them (vLLM's CLIP processor resizes and crops)."""
        text, images = render_messages(messages, self.template)
        if len(images) > MAX_IMAGES:
            raise ValueError(f"{len(images)} images in one request: the vLLM backend takes at most {MAX_IMAGES}")
        ids = tokenize_prompt(self.tokenizer, text, self.image_token_id, 1)
        pictures = [open_image(image)[0].convert("RGB") for image in images]
        if self.processing.aspect == "pad":
            pictures = [pad_to_square(p, self.processing.mean) for p in pictures]
        return {"prompt_token_ids": ids} | ({"multi_modal_data": {"image": pictures}} if pictures else {})

    async def generate(self, request_id: str, *, params: SamplingParams, messages: list[dict]
                       ) -> AsyncIterator[RequestOutput]:
        """vLLM's outputs for one request as medlava's `RequestOutput`s (closing the generator aborts
        it); vLLM's refusals of a request (too long, bad settings) as the ValueError `create_app`
        answers with a 400."""
        from vllm.exceptions import VLLMClientError

        metrics = RequestMetrics(arrival_time=time.perf_counter())
        self.in_flight += 1  # from the start: create_app's admission counts it once it is handed over
        text, token_ids = "", []
        try:
            prompt = await asyncio.get_running_loop().run_in_executor(None, self.prompt, messages)
            outputs = self.engine.generate(prompt, vllm_sampling(params), request_id)
            async with contextlib.aclosing(outputs):  # leaving early aborts the request in vLLM
                async for out in outputs:
                    done = out.outputs[0]
                    delta, new = done.text, list(done.token_ids)
                    text, token_ids = text + delta, token_ids + new
                    if metrics.first_token_time is None and new:
                        metrics.first_token_time = metrics.first_scheduled_time = time.perf_counter()
                    metrics.prompt_tokens, metrics.output_tokens = len(out.prompt_token_ids), len(token_ids)
                    metrics.cached_prompt_tokens = out.num_cached_tokens or 0
                    if out.finished:
                        metrics.finished_time = time.perf_counter()
                        self.count(metrics, len(prompt.get("multi_modal_data", {}).get("image", ())))
                    yield RequestOutput(request_id, text, token_ids, delta_text=delta, new_token_ids=new,
                                        finished=out.finished,
                                        finish_reason=done.finish_reason if out.finished else None,
                                        prompt_token_ids=list(out.prompt_token_ids), metrics=metrics)
        except VLLMClientError as e:
            raise ValueError(str(e)) from None
        finally:
            self.in_flight -= 1

    def count(self, m: RequestMetrics, images: int) -> None:
        """A finished request's tokens and images, into the totals `metrics` reports."""
        t = self.totals
        t["prompt"], t["cached"] = t["prompt"] + m.prompt_tokens, t["cached"] + m.cached_prompt_tokens
        t["generated"], t["images"] = t["generated"] + m.output_tokens, t["images"] + images

    def shutdown(self) -> None:
        self.engine.shutdown()


class FolderAnalyzer:
    """/v1/reports and /v1/explain beside vLLM: localisation needs the model's attention and
    occlusion passes, which vLLM does not expose, so they run on medlava's own engine over the
    same folder, loaded on the first call (a server that never drafts a report never loads it)."""

    def __init__(self, folder: str | Path, **analyzer_kwargs):
        self.folder, self.kwargs = folder, analyzer_kwargs
        self._analyzer = None

    def _get(self):
        if self._analyzer is None:  # `create_app` calls one analysis at a time
            from medlava.analysis.vqa import Analyzer

            logger.info("loading medlava's engine for reports and localisation")
            try:
                self._analyzer = Analyzer(self.folder, **self.kwargs)
            except MedlavaError as e:  # the server's fault, not the request's: a 500, logged
                raise RuntimeError(f"reports and localisation are unavailable: {e}") from None
        return self._analyzer

    def report(self, study, params: SamplingParams | None = None, grounding: str | None = "occlusion"):
        return self._get().report(study, params, grounding=grounding)

    def explain(self, study, question: str, method: str = "relevance"):
        return self._get().explain(study, question, method)

