"""The offline API: `LLM(model).generate(requests, params)` runs a whole list through the engine.

A request is a prompt string, `{"prompt": str, "images": [...]}` (the prompt holds one `<image>`
per image), `{"prompt_token_ids": [...], "images": [...]}` (placeholders already expanded) or
`{"messages": [...]}` in the OpenAI chat shape (rendered with the model's conversation template).
Images are paths (DICOM, NIfTI, PNG, JPEG), data URLs, PIL images or `medlava.imaging.Study`s.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from medlava.engine.llm_engine import EngineMetrics, LLMEngine
from medlava.engine.sampling import SamplingParams
from medlava.engine.sequence import RequestOutput
from medlava.model.loader import LoadedModel

_ids = itertools.count()


def request_args(request: str | dict) -> dict:
    """A request in any accepted form -> keyword arguments of `LLMEngine.add_request`."""
    if isinstance(request, str):
        return {"prompt": request}
    if not isinstance(request, dict):
        raise ValueError(f"a request must be a prompt string or a dict, got {type(request).__name__}")
    unknown = set(request) - {"prompt", "prompt_token_ids", "images", "messages"}
    if unknown:
        raise ValueError(f"unknown request keys: {sorted(unknown)}")
    images = request.get("images") or []
    if not isinstance(images, list | tuple):
        images = [images]
    # Which combinations make a request is `LLMEngine.make_sequence`'s to check.
    return {
        "prompt": request.get("prompt", request.get("prompt_token_ids")),
        "images": list(images),
        "messages": request.get("messages"),
    }


class LLM:
    """Loads a model once and generates for batches of requests with the paged engine.

    `model=None` means the shipped demo model; engine options (`dtype`, `device`,
    `kv_cache_memory`, `enable_prefix_caching`, ...) are those of `LLMEngine`.
    """

    def __init__(self, model: str | Path | LoadedModel | None = None, **engine_kwargs):
        self.engine = LLMEngine(model, **engine_kwargs)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def metrics(self) -> EngineMetrics:
        return self.engine.metrics()

    def generate(
        self,
        requests: str | dict | list[str | dict],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Finished outputs (`.text`, `.token_ids`, `.finish_reason`, `.metrics`) in request order."""
        batch = [requests] if isinstance(requests, str | dict) else list(requests)
        if isinstance(params, list):
            if len(params) != len(batch):
                raise ValueError(f"{len(params)} SamplingParams for {len(batch)} requests")
            plist = params
        else:
            plist = [params or SamplingParams()] * len(batch)
        engine = self.engine
        ids: list[str] = []
        try:
            for request, p in zip(batch, plist, strict=True):
                rid = f"llm-{next(_ids)}"
                engine.add_request(rid, params=p, **request_args(request))
                ids.append(rid)
        except Exception:
            for rid in ids:
                engine.abort(rid)
            raise
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        try:
            while len(done) < len(ids) and engine.has_unfinished():
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[rid] for rid in ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """`generate` for one conversation (a list of messages) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([{"messages": m} for m in convs], params, use_tqdm)


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        return None
    return tqdm(total=total, desc="generating", unit="req", leave=False)
