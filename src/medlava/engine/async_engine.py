"""`AsyncLLMEngine`: the engine loop runs in its own thread; each request streams to an `async for`.

The event loop never waits on the model: requests are added and aborted through a thread-safe
command queue that the engine thread drains between steps, and outputs come back with
`loop.call_soon_threadsafe` into one asyncio queue per request. Only the engine thread touches
the `LLMEngine`'s state once the loop has started.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from pathlib import Path

from medlava.engine.llm_engine import EngineMetrics, ImageLike, LLMEngine
from medlava.engine.sampling import SamplingParams
from medlava.engine.sequence import RequestOutput, Sequence
from medlava.model.loader import LoadedModel

_STOP = object()


class AsyncLLMEngine:
    """Streams outputs per request while a background thread steps the shared `LLMEngine`.

    `async for out in engine.generate(...)` yields one `RequestOutput` per new token, the last
    with `finished=True`. Leaving the loop early (or cancelling the task) aborts the request.
    """

    def __init__(self, engine: LLMEngine | str | Path | LoadedModel | None, **engine_kwargs):
        self.engine = engine if isinstance(engine, LLMEngine) else LLMEngine(engine, **engine_kwargs)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self._ids: set[str] = set()  # request ids in use, guarded by _ids_lock
        self._ids_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._snapshot: EngineMetrics = self.engine.metrics()

    # -- the engine thread -----------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="medlava-engine", daemon=True)
                self._thread.start()

    def _deliver(self, request_id: str, item, *, last: bool = False) -> None:
        stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass

    def _handle(self, command) -> bool:
        """Apply one command; False on the stop command."""
        if command is _STOP:
            return False
        kind, *args = command
        if kind == "add":
            seq, loop, q = args
            self._streams[seq.request_id] = (loop, q)
            try:
                self.engine.add_sequence(seq)
            except Exception as e:
                self._deliver(seq.request_id, e, last=True)
        elif kind == "abort":
            request_id, done = args
            seq = self.engine.requests.get(request_id)
            aborted = seq is not None and self.engine.abort(request_id)
            if aborted:
                final = RequestOutput(
                    request_id, seq.text, seq.output_ids, finished=True, finish_reason="abort",
                    prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens], metrics=seq.metrics,
                )
                self._deliver(request_id, final, last=True)
            else:
                self._streams.pop(request_id, None)
            if done is not None:
                done.set_result(aborted)
        return True

    def _loop(self) -> None:
        running = True
        while running:
            # Block for work only when there is nothing to step; otherwise just drain what came in.
            try:
                command = self._commands.get(block=not self.engine.has_unfinished())
            except queue.Empty:
                command = None
            while command is not None:
                running = self._handle(command) and running
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if running and self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception as e:  # the step failed: fail every request rather than hang them
                    for rid in list(self.engine.requests):
                        self.engine.abort(rid)
                        self._deliver(rid, e, last=True)
                    outputs = []
                for out in outputs:
                    self._deliver(out.request_id, out, last=out.finished)
            self._snapshot = self.engine.metrics()

    # -- the asyncio side ------------------------------------------------------------------------

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
        with self._ids_lock:
            if request_id in self._ids:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._ids.add(request_id)
        finished = added = False
        try:
            # Reading and hashing images is slow: keep it off the event loop and off the engine thread.
            seq: Sequence = await loop.run_in_executor(
                None, lambda: self.engine.make_sequence(request_id, prompt, images, params, messages=messages)
            )
            q: asyncio.Queue = asyncio.Queue()
            self._ensure_thread()
            self._commands.put(("add", seq, loop, q))
            added = True
            while not finished:
                item = await q.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if added and not finished:
                self._commands.put(("abort", request_id, None))
            with self._ids_lock:
                self._ids.discard(request_id)

    async def abort(self, request_id: str) -> bool:
        """Stop a request; its stream ends with a finished output whose finish_reason is "abort"."""
        if self._thread is None or not self._thread.is_alive():
            return False
        done: Future = Future()
        self._commands.put(("abort", request_id, done))
        return await asyncio.wrap_future(done)

    @property
    def model_name(self) -> str:
        return self.engine.lm.name

    @property
    def conv_mode(self) -> str:
        return self.engine.lm.conv_mode

    def num_unfinished(self) -> int:
        """Requests accepted by `generate` and not yet finished (cheap; never waits on the engine)."""
        with self._ids_lock:
            return len(self._ids)

    def metrics(self) -> EngineMetrics:
        """The engine's metrics as of its last step (never waits on a step while the loop runs)."""
        if self._thread is None or not self._thread.is_alive():
            return self.engine.metrics()
        return self._snapshot

    def shutdown(self) -> None:
        """Finish the pending commands (aborts included), then stop the engine thread."""
        with self._thread_lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._commands.put(_STOP)
            thread.join()
