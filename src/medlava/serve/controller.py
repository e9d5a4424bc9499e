"""The LLaVA controller: a table of workers kept by their heartbeats, and requests dispatched to them.

`create_controller_app(Controller(dispatch))`. LLaVA's routes keep its wire format, so its CLI and
Gradio server work unchanged: `POST /register_worker`, `/refresh_all_workers`, `/list_models`,
`/get_worker_address` (`{"address": ""}` when none), `/receive_heart_beat` (`{"exist": bool}`),
`/worker_generate_stream` (proxied to a worker) and `/worker_get_status`. The OpenAI API is routed by
the body's `model` to a worker of that model (`serve/worker.py` serves it too): `GET /v1/models`,
`POST /v1/...` with SSE passed through.

What LLaVA's controller gets wrong and this one does not: with no worker it sends one frame with
error_code 2 and stops (LLaVA goes on to a code-3 frame); a request that fails before its first frame
(connection refused, the worker gone) is retried on another worker; a worker that fails or misses its
heartbeats is dropped from the table, and the streams it was serving end with a code-3 frame (an SSE
error event for `/v1`) instead of hanging. The table lives on the event loop: no locks, and no route
waits on a worker except to proxy to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from medlava.serve.api import DEFAULT_MAX_BODY_BYTES, APIError, _validation_message, error_response, read_body
from medlava.serve.protocol import (
    CONTROLLER_HEART_BEAT_EXPIRATION,
    NO_WORKER,
    SERVER_ERROR_MSG,
    WORKER_ERROR,
    WORKER_UNREACHABLE,
    ErrorBody,
    ErrorResponse,
    HeartBeat,
    ModelCard,
    ModelList,
    RegisterWorker,
    WorkerStatus,
    frame,
)

logger = logging.getLogger("medlava.serve.controller")

DISPATCH_METHODS = ("shortest_queue", "lottery")
EXPIRATION_ENV = "MEDLAVA_CONTROLLER_HEART_BEAT_EXPIRATION"
DEFAULT_WORKER_TIMEOUT = 600.0  # seconds a worker may stay silent mid-request before it is taken as hung
FRAME_MEDIA_TYPE = "application/octet-stream"
FORWARD_HEADERS = ("authorization", "content-type", "accept")  # what a /v1 request carries on to the worker
REPLY_HEADERS = ("content-type", "x-request-id", "retry-after", "cache-control")  # and what comes back
MID_STREAM_FAILURE = "data: {}\n\n".format(ErrorResponse(error=ErrorBody(
    message="the worker serving this request failed mid-stream", type="server_error", code="worker_failed",
)).model_dump_json()).encode()  # the SSE event that ends a /v1 stream whose worker died


def resolve_expiration(value: float | None = None) -> float:
    """`value`, else $MEDLAVA_CONTROLLER_HEART_BEAT_EXPIRATION, else LLaVA's 30 s."""
    if value is None:
        value = float(os.environ.get(EXPIRATION_ENV, CONTROLLER_HEART_BEAT_EXPIRATION))
    if value <= 0:
        raise ValueError(f"the heartbeat expiration must be positive, got {value}")
    return value


@dataclass
class WorkerInfo:
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float  # time.monotonic()
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set when dropped: its streams end


class WorkerGone(Exception):
    """The worker was dropped, or stayed silent too long, while serving a request."""


class Controller:
    """The worker table and dispatch. `dispatch`: "shortest_queue" (queue_length / speed, as reported
    by heartbeats and counted up on each dispatch) or "lottery" (random, weighted by speed).

    heart_beat_expiration: seconds without a heartbeat before a worker is dropped (default
    $MEDLAVA_CONTROLLER_HEART_BEAT_EXPIRATION or 30). worker_timeout: seconds a worker may send
    nothing mid-request before it is taken as hung and dropped.
    """

    def __init__(self, dispatch: str = "shortest_queue", *, heart_beat_expiration: float | None = None,
                 worker_timeout: float = DEFAULT_WORKER_TIMEOUT, seed: int | None = None):
        if dispatch not in DISPATCH_METHODS:
            raise ValueError(f"unknown dispatch method {dispatch!r}: use shortest_queue or lottery")
        self.dispatch = dispatch
        self.expiration = resolve_expiration(heart_beat_expiration)
        self.worker_timeout = worker_timeout
        self.workers: dict[str, WorkerInfo] = {}
        self.rng = random.Random(seed)
        self.client: httpx.AsyncClient | None = None  # opened by the app's lifespan

    # -- the table ---------------------------------------------------------------------------------

    async def register_worker(self, name: str, check_heart_beat: bool, status: WorkerStatus | None) -> bool:
        name = name.rstrip("/")
        status = status or await self.get_worker_status(name)
        if status is None:
            return False
        old = self.workers.get(name)
        info = WorkerInfo(status.model_names, status.speed, status.queue_length, check_heart_beat, time.monotonic())
        if old is not None:
            info.gone = old.gone  # the same worker again: its streams go on
        self.workers[name] = info
        logger.info("%s worker %s: models %s, speed %g", "re-registered" if old else "registered", name,
                    status.model_names, status.speed)
        return True

    async def get_worker_status(self, name: str) -> WorkerStatus | None:
        try:
            r = await self.client.post(name + "/worker_get_status", timeout=5)
            r.raise_for_status()
            return WorkerStatus.model_validate(r.json())
        except (httpx.HTTPError, ValueError, ValidationError) as e:
            logger.warning("worker %s gave no status: %s", name, type(e).__name__)
            return None

    def remove_worker(self, name: str, why: str, info: WorkerInfo | None = None) -> None:
        """Drop `name` (only if it is still `info`, when given: it may have registered again since)."""
        current = self.workers.get(name)
        if current is None or (info is not None and current.gone is not info.gone):
            return
        del self.workers[name]
        current.gone.set()
        logger.warning("dropped worker %s: %s", name, why)

    def remove_expired(self) -> None:
        cutoff = time.monotonic() - self.expiration
        for name, info in list(self.workers.items()):
            if info.check_heart_beat and info.last_heart_beat < cutoff:
                self.remove_worker(name, f"no heartbeat for {self.expiration:g}s", info)

    async def refresh_all_workers(self) -> None:
        """Ask every worker for its status again; those that do not answer are dropped."""
        names = list(self.workers)
        statuses = await asyncio.gather(*(self.get_worker_status(n) for n in names))
        for name, status in zip(names, statuses, strict=True):
            info = self.workers.get(name)
            if info is None:
                continue
            if status is None:
                self.remove_worker(name, "no status on refresh", info)
            else:
                info.model_names, info.speed, info.queue_length = status.model_names, status.speed, status.queue_length
                info.last_heart_beat = time.monotonic()

    def receive_heart_beat(self, name: str, queue_length: int) -> bool:
        info = self.workers.get(name.rstrip("/"))
        if info is None:
            return False  # the worker registers again
        info.queue_length, info.last_heart_beat = queue_length, time.monotonic()
        return True

    def list_models(self) -> list[str]:
        self.remove_expired()
        return sorted({m for info in self.workers.values() for m in info.model_names})

    def get_worker_address(self, model: str, exclude: Iterable[str] = ()) -> str:
        """A worker of `model` chosen by the dispatch method, or "" when there is none."""
        self.remove_expired()
        skip = set(exclude)
        names = [n for n, w in self.workers.items() if model in w.model_names and w.speed > 0 and n not in skip]
        if not names:
            return ""
        if self.dispatch == "lottery":
            return self.rng.choices(names, weights=[self.workers[n].speed for n in names])[0]
        name = min(names, key=lambda n: self.workers[n].queue_length / self.workers[n].speed)
        self.workers[name].queue_length += 1  # until its next heartbeat says otherwise
        return name

    def status(self) -> dict:
        """The controller as one big worker (LLaVA's hierarchical mode), from the table."""
        self.remove_expired()
        infos = list(self.workers.values())
        return {"model_names": self.list_models(), "speed": sum(w.speed for w in infos),
                "queue_length": sum(w.queue_length for w in infos)}

    # -- proxying ----------------------------------------------------------------------------------

    async def open(self, name: str, path: str, body: bytes, headers: dict[str, str]) -> Upstream:
        """POST `body` to worker `name` and wait for its response headers (WorkerGone if dropped first)."""
        info = self.workers[name]
        gone = asyncio.ensure_future(info.gone.wait())
        try:
            request = self.client.build_request("POST", name + path, content=body, headers=headers)
            response = await _race(self.client.send(request, stream=True), gone)
        except BaseException:
            gone.cancel()
            raise
        return Upstream(response, gone, info)


async def _race(aw: Awaitable, gone: asyncio.Future):
    """`await aw`, unless `gone` (the worker dropped) comes first: then WorkerGone."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nobody awaits it any more
    raise WorkerGone("the worker was dropped")


class Upstream:
    """A worker's streamed response, read chunk by chunk unless the worker is dropped meanwhile."""

    def __init__(self, response: httpx.Response, gone: asyncio.Future, info: WorkerInfo):
        self.response, self.gone, self.info = response, gone, info
        self._chunks = response.aiter_bytes()

    async def next_chunk(self) -> bytes | None:
        return await _race(anext(self._chunks, None), self.gone)

    async def split(self, sep: bytes) -> AsyncIterator[bytes]:
        """Complete `sep`-terminated pieces (without `sep`), then what is left at the end."""
        buf = b""
        while (chunk := await self.next_chunk()) is not None:
            *pieces, buf = (buf + chunk).split(sep)
            for piece in pieces:
                if piece:
                    yield piece
        if buf:
            yield buf

    async def read(self) -> bytes:
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def reply_headers(self) -> dict[str, str]:
        return {k: v for k, v in self.response.headers.items() if k.lower() in REPLY_HEADERS}

    async def aclose(self) -> None:
        self.gone.cancel()
        await self.response.aclose()


def _model_of(body: bytes) -> str:
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, str) or not model:
        raise APIError(400, "the request names no model: add \"model\"", "invalid_request")
    return model


def _failure(e: Exception) -> str:
    return str(e) if isinstance(e, WorkerGone) else f"{type(e).__name__} talking to it"


def create_controller_app(controller: Controller, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """LLaVA's controller routes and the OpenAI API routed to workers, over `controller`'s table."""
    created = int(time.time())

    async def expire_forever():
        while True:
            await asyncio.sleep(max(controller.expiration / 3, 0.05))
            controller.remove_expired()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(controller.worker_timeout, connect=5)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
            controller.client = client
            task = asyncio.create_task(expire_forever())
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                controller.client = None

    app = FastAPI(title="medlava controller", lifespan=lifespan)
    app.state.controller = controller

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError):
        return error_response(e.status, e.message, e.code, e.type, e.headers)

    async def parse(request: Request, model_cls):
        body = await read_body(request, 1 << 20)
        try:
            return model_cls.model_validate(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
        except ValidationError as e:
            raise APIError(400, _validation_message(e.errors()), "invalid_request") from None

    # -- LLaVA's routes --------------------------------------------------------------------------------

    @app.post("/register_worker")
    async def register_worker(request: Request):
        req = await parse(request, RegisterWorker)
        if not await controller.register_worker(req.worker_name, req.check_heart_beat, req.worker_status):
            raise APIError(400, f"worker {req.worker_name[:200]!r} did not answer /worker_get_status: "
                           "is its address reachable from the controller?", "worker_unreachable")
        return None

    @app.post("/refresh_all_workers")
    async def refresh_all_workers():
        await controller.refresh_all_workers()
        return None

    @app.post("/list_models")
    async def list_models() -> dict:
        return {"models": controller.list_models()}

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request) -> dict:
        body = await read_body(request, 1 << 20)
        return {"address": controller.get_worker_address(_model_of(body))}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request) -> dict:
        req = await parse(request, HeartBeat)
        return {"exist": controller.receive_heart_beat(req.worker_name, req.queue_length)}

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict:
        return controller.status()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        try:
            body = await read_body(request, max_body_bytes)
            model = _model_of(body)
        except APIError as e:
            return Response(frame(e.message, WORKER_ERROR), status_code=e.status, media_type=FRAME_MEDIA_TYPE)
        tried: list[str] = []
        while name := controller.get_worker_address(model, exclude=tried):
            tried.append(name)
            up = None
            try:
                up = await controller.open(name, "/worker_generate_stream", body, {"content-type": "application/json"})
                frames = up.split(b"\0")
                first = await anext(frames, None)
                if first is None:
                    raise WorkerGone("the worker answered nothing")
            except (httpx.HTTPError, WorkerGone) as e:  # nothing has reached the client: try another worker
                if up is not None:
                    await up.aclose()
                controller.remove_worker(name, _failure(e) + " before the first frame", up.info if up else None)
                continue
            stream = relay(name, up, first, frames, b"\0", frame(SERVER_ERROR_MSG, WORKER_UNREACHABLE))
            await anext(stream)  # enter its try: the worker's response is closed even if it is never iterated
            return StreamingResponse(stream, status_code=up.response.status_code, media_type=FRAME_MEDIA_TYPE)
        if not tried:
            logger.info("no worker serves the requested model")
            return Response(frame(SERVER_ERROR_MSG, NO_WORKER), status_code=404, media_type=FRAME_MEDIA_TYPE)
        return Response(frame(SERVER_ERROR_MSG, WORKER_UNREACHABLE), status_code=503, media_type=FRAME_MEDIA_TYPE)

    async def relay(name: str, up: Upstream, first: bytes, pieces: AsyncIterator[bytes], sep: bytes,
                    failure: bytes):
        """The worker's stream piece by piece (LLaVA frames or SSE events, each ended by `sep`); a worker
        that dies mid-stream is dropped and `failure` ends the stream instead of a hang."""
        try:
            yield b""
            yield first + sep
            async for piece in pieces:
                yield piece + sep
        except (httpx.HTTPError, WorkerGone) as e:
            controller.remove_worker(name, _failure(e) + " mid-stream", up.info)
            yield failure
        finally:
            await up.aclose()

    # -- the OpenAI API, routed by model ------------------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> dict:
        return ModelList(data=[ModelCard(id=m, created=created) for m in controller.list_models()]).model_dump()

    @app.post("/v1/{path:path}")
    async def openai_route(path: str, request: Request):
        body = await read_body(request, max_body_bytes)
        model = _model_of(body)
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_HEADERS}
        tried: list[str] = []
        while name := controller.get_worker_address(model, exclude=tried):
            tried.append(name)
            up = None
            try:
                up = await controller.open(name, "/v1/" + path, body, headers)
                if not up.response.headers.get("content-type", "").startswith("text/event-stream"):
                    content = await up.read()  # one JSON answer: a failure while reading it can still be retried
                    await up.aclose()
                    return Response(content, status_code=up.response.status_code, headers=up.reply_headers())
                events = up.split(b"\n\n")
                first = await anext(events, None)
                if first is None:
                    raise WorkerGone("the worker answered nothing")
            except (httpx.HTTPError, WorkerGone) as e:
                if up is not None:
                    await up.aclose()
                controller.remove_worker(name, _failure(e) + " before the first event", up.info if up else None)
                continue
            stream = relay(name, up, first, events, b"\n\n", MID_STREAM_FAILURE)
            await anext(stream)
            return StreamingResponse(stream, status_code=up.response.status_code, headers=up.reply_headers())
        if not tried:
            raise APIError(404, f"model {model[:100]!r} does not exist: the controller's workers serve "
                           f"{controller.list_models()}", "model_not_found")
        raise APIError(503, f"every worker of model {model[:100]!r} failed: retry shortly", "worker_unavailable",
                       "server_error")

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, e: Exception):
        logger.error("internal error: %s", type(e).__name__, exc_info=e)
        return error_response(500, "internal server error", "internal_error", "server_error")

    return app

