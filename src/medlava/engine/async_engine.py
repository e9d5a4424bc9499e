"""`AsyncLLMEngine`: a background thread steps the shared `LLMEngine`; each request streams to an `async for`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from medlava.engine.llm_engine import EngineMetrics, ImageLike, LLMEngine
from medlava.engine.sampling import SamplingParams
from medlava.engine.sequence import RequestOutput
from medlava.model.loader import LoadedModel


class AsyncLLMEngine:
    """Streams outputs per request while a background thread steps the shared `LLMEngine`.

    `async for out in engine.generate(...)` yields one `RequestOutput` per new token, the last
    with `finished=True`. Leaving the loop early (or cancelling the task) aborts the request.
    """

    def __init__(self, engine: LLMEngine | str | Path | LoadedModel | None, **engine_kwargs):
        self.engine = engine if isinstance(engine, LLMEngine) else LLMEngine(engine, **engine_kwargs)
        self._cv = threading.Condition()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="medlava-engine", daemon=True)
            self._thread.start()

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.engine.has_unfinished():
                    self._cv.wait()
                if self._stopping:
                    return
                try:
                    outputs = self.engine.step()
                except Exception as e:  # the step failed: fail every request rather than hang them
                    for rid in list(self.engine.requests):
                        self.engine.abort(rid)
                        self._deliver(rid, e)
                    continue
            for out in outputs:
                self._deliver(out.request_id, out)

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int] | None = None,
        images: list[ImageLike] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        # Reading and hashing images is slow: keep it off the event loop and outside the engine lock.
        seq = await loop.run_in_executor(
            None, lambda: self.engine.make_sequence(request_id, prompt, images, params, messages=messages)
        )
        queue: asyncio.Queue = asyncio.Queue()
        with self._cv:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.engine.add_sequence(seq)
            self._streams[request_id] = (loop, queue)
            self._ensure_thread()
            self._cv.notify()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._cv:
                self._streams.pop(request_id, None)
                if not finished:
                    self.engine.abort(request_id)

    async def abort(self, request_id: str) -> bool:
        """Stop a request; its stream ends with a finished output whose finish_reason is "abort"."""
        with self._cv:
            seq = self.engine.requests.get(request_id)
            if seq is None or not self.engine.abort(request_id):
                return False
            final = RequestOutput(
                request_id, seq.text, seq.output_ids, finished=True, finish_reason="abort", metrics=seq.metrics
            )
            self._deliver(request_id, final)
        return True

    def metrics(self) -> EngineMetrics:
        with self._cv:
            return self.engine.metrics()

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
