"""A LLaVA model worker on medlava's engine: `create_worker_app(engine, controller_url=..., worker_address=...)`.

The app is `serve/api.create_app`'s OpenAI API (so the controller can route `/v1/*` here) plus LLaVA's
worker routes, `POST /worker_generate_stream` and `POST /worker_get_status`, and a heartbeat task that
registers with the controller and reports the queue length every `heart_beat_interval` seconds and
soon after a request starts or ends. LLaVA's worker runs one request at a time under a semaphore; here
requests are batched by the engine, and `limit_model_concurrency` bounds how many LLaVA requests are in
it at once. Frames are NUL-terminated JSON `{"text", "error_code"}` whose text is the prompt plus the
output so far, as LLaVA's worker sends; a refusal is one frame with error_code 1 and a 4xx status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from medlava.chat.templates import IMAGE_PLACEHOLDER, get_template
from medlava.engine.async_engine import AsyncLLMEngine
from medlava.engine.sampling import SamplingParams
from medlava.engine.sequence import RequestOutput
from medlava.errors import MedlavaError
from medlava.serve.api import (
    APIError,
    _validation_message,
    check_image_size,
    create_app,
    read_body,
    read_image,
)
from medlava.serve.protocol import (
    SERVER_ERROR_MSG,
    WORKER_ERROR,
    WORKER_HEART_BEAT_INTERVAL,
    WorkerGenerateRequest,
    frame,
)

logger = logging.getLogger("medlava.serve.worker")

HEART_BEAT_ENV = "MEDLAVA_WORKER_HEART_BEAT_INTERVAL"
FRAME_MEDIA_TYPE = "application/octet-stream"  # NUL-separated JSON: not one JSON document
GREEDY_BELOW = 0.001  # LLaVA's worker samples only above this temperature
LISTEN_WAIT = 10.0  # seconds to wait for our own address to answer before registering anyway


def resolve_heart_beat_interval(value: float | None = None) -> float:
    """`value`, else $MEDLAVA_WORKER_HEART_BEAT_INTERVAL, else LLaVA's 15 s."""
    if value is None:
        value = float(os.environ.get(HEART_BEAT_ENV, WORKER_HEART_BEAT_INTERVAL))
    if value <= 0:
        raise ValueError(f"the heartbeat interval must be positive, got {value}")
    return value


def frame_response(message: str, status: int, error_code: int = WORKER_ERROR) -> Response:
    return Response(frame(message, error_code), status_code=status, media_type=FRAME_MEDIA_TYPE)


def parse_request(body: bytes) -> WorkerGenerateRequest:
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
    try:
        return WorkerGenerateRequest.model_validate(raw)
    except ValidationError as e:
        raise APIError(400, _validation_message(e.errors()), "invalid_request") from None


def sampling_params(req: WorkerGenerateRequest, template_stop: Iterable[str]) -> SamplingParams:
    greedy = req.temperature <= GREEDY_BELOW or req.top_p == 0
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        temperature=0.0 if greedy else req.temperature,
        top_p=1.0 if greedy else req.top_p,
        max_tokens=req.max_new_tokens,
        stop=[s for s in dict.fromkeys([*stop, *template_stop]) if s],  # "" would end every answer at once
        ignore_eos=req.ignore_eos,
    )


def read_images(payloads: list[str], limits) -> list:
    """LLaVA's base64 image strings -> `Study`s, with api.py's byte and pixel limits (in a worker thread)."""
    studies = []
    for i, payload in enumerate(payloads):
        try:
            check_image_size(len(payload), limits)
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, "the image holds invalid base64", "invalid_image_data") from None
            studies.append(read_image(data, None, limits))
        except APIError as e:
            raise APIError(e.status, f"images[{i}]: {e.message}", e.code) from None
    return studies


class Registration:
    """Registers this worker with the controller, then sends heartbeats: every `interval` seconds and
    soon after `poke()` (a request started or ended), so shortest-queue dispatch sees fresh queues."""

    def __init__(self, controller_url: str, worker_address: str, status: Callable[[], dict], interval: float):
        self.controller, self.address = controller_url.rstrip("/"), worker_address.rstrip("/")
        self.status, self.interval = status, interval
        self.changed = asyncio.Event()

    def poke(self) -> None:
        self.changed.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:  # no proxy between us
            await self._wait_until_listening(client)
            registered = False
            while True:
                self.changed.clear()  # a change while we send sets it again: one more beat follows
                try:
                    if registered:
                        r = await client.post(self.controller + "/receive_heart_beat", json={
                            "worker_name": self.address, "queue_length": self.status()["queue_length"]})
                        r.raise_for_status()
                        registered = bool(r.json().get("exist"))
                        if not registered:  # the controller restarted or dropped us: register again now
                            logger.info("the controller does not know this worker: registering again")
                            continue
                    else:
                        r = await client.post(self.controller + "/register_worker", json={
                            "worker_name": self.address, "check_heart_beat": True, "worker_status": self.status()})
                        r.raise_for_status()
                        registered = True
                        logger.info("registered %s with the controller at %s", self.address, self.controller)
                except (httpx.HTTPError, ValueError, AttributeError) as e:  # down, or answered no JSON object
                    logger.warning("the controller at %s did not answer (%s): retrying in %.1fs",
                                   self.controller, type(e).__name__, self.interval)
                    await asyncio.sleep(self.interval)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), self.interval)

    async def _wait_until_listening(self, client: httpx.AsyncClient) -> None:
        """The controller dispatches as soon as we register: first see our own address answer."""
        deadline = time.monotonic() + LISTEN_WAIT
        while time.monotonic() < deadline:
            try:
                await client.get(self.address + "/health", timeout=1)
                return
            except httpx.HTTPError:
                await asyncio.sleep(0.05)
        logger.warning("%s does not answer from here: is --worker-address this worker's reachable URL?", self.address)


def create_worker_app(
    engine: AsyncLLMEngine,
    *,
    controller_url: str | None,
    worker_address: str,
    limit_model_concurrency: int = 5,
    heart_beat_interval: float | None = None,
    speed: float = 1.0,
    **app_kwargs,
) -> FastAPI:
    """`create_app(engine, **app_kwargs)` plus LLaVA's worker routes; registers with `controller_url`
    (None: no controller, e.g. a worker that clients call directly) as `worker_address`.

    speed: what the controller weighs this worker by (LLaVA's workers all say 1).
    heart_beat_interval: seconds between heartbeats (default $MEDLAVA_WORKER_HEART_BEAT_INTERVAL or 15).
    """
    if limit_model_concurrency < 1:
        raise ValueError(f"limit_model_concurrency must be at least 1, got {limit_model_concurrency}")
    app = create_app(engine, **app_kwargs)
    name, limits = app.state.model_name, app.state.limits
    template_stop = tuple(get_template(engine.conv_mode).stop)
    semaphore = asyncio.Semaphore(limit_model_concurrency)
    waiting = 0  # LLaVA requests admitted and not yet in the engine (reading images, or on the semaphore)

    def status() -> dict:
        return {"model_names": [name], "speed": speed, "queue_length": waiting + engine.num_unfinished()}

    interval = resolve_heart_beat_interval(heart_beat_interval)
    beats = Registration(controller_url, worker_address, status, interval) if controller_url else None
    poke = beats.poke if beats else (lambda: None)

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI):
        async with inner(a) as state:  # its exit shuts the engine down, after the heartbeats stop
            task = asyncio.create_task(beats.run()) if beats else None
            try:
                yield state
            finally:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    app.router.lifespan_context = lifespan
    app.state.worker_status = status
    app.state.heart_beat_interval = interval

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict:
        return status()

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        nonlocal waiting
        rid = f"llava-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        waiting += 1
        counted = True
        poke()
        try:
            try:
                body = await read_body(request, limits.max_body_bytes)
                req = parse_request(body)
                if req.model is not None and req.model != name:
                    raise APIError(404, f"model {req.model[:100]!r} is not served here: this worker serves "
                                   f"{name!r}", "model_not_found")
                payloads = req.images or []
                placeholders = req.prompt.count(IMAGE_PLACEHOLDER)
                if placeholders != len(payloads):
                    raise APIError(400, f"the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
                                   f"{len(payloads)} image(s) came with it", "image_count_mismatch")
                params = sampling_params(req, template_stop)
                images = await asyncio.to_thread(read_images, payloads, limits)
                logger.info("%s: %d body bytes, %d image(s), max_new_tokens=%d", rid, len(body), len(images),
                            params.max_tokens)
                await semaphore.acquire()
                try:
                    gen = engine.generate(rid, req.prompt, images, params)
                    waiting, counted = waiting - 1, False  # from here the engine counts it
                    try:
                        first = await anext(gen)
                    except (ValueError, MedlavaError) as e:  # the prompt's length, the images
                        await gen.aclose()
                        raise APIError(400, str(e), "invalid_prompt") from None
                except BaseException:
                    semaphore.release()
                    raise
            except APIError as e:
                logger.info("%s: refused %d %s", rid, e.status, e.code)
                return frame_response(e.message, e.status)
            except Exception as e:  # the server's fault: LLaVA's error frame, never a traceback
                logger.error("%s: failed: %s", rid, type(e).__name__, exc_info=e)
                return frame_response(SERVER_ERROR_MSG, 500)
        finally:
            if counted:
                waiting -= 1
            poke()
        stream = _frames(rid, req.prompt, first, gen, t0)
        await anext(stream)  # enter its try: the semaphore is released even if it is never iterated
        return StreamingResponse(stream, media_type=FRAME_MEDIA_TYPE)

    async def _frames(rid: str, prompt: str, first: RequestOutput, gen: AsyncIterator[RequestOutput],
                      t0: float) -> AsyncIterator[bytes]:
        finished = False
        try:
            yield b""
            text, sent, out = prompt, False, first
            while True:
                text += out.delta_text  # deltas hold back a possible stop string's start; text does not
                if out.delta_text or (out.finished and not sent):
                    sent = True
                    yield frame(text)
                if out.finished:
                    finished = True
                    break
                out = await anext(gen)
            logger.info("%s: done, %d tokens, finish=%s, e2e=%.3fs", rid, len(out.token_ids), out.finish_reason,
                        time.perf_counter() - t0)
        except Exception as e:  # the engine failed mid-stream: say so in the stream, then end it
            finished = True
            logger.error("%s: failed mid-stream: %s", rid, type(e).__name__)
            yield frame(SERVER_ERROR_MSG, WORKER_ERROR)
        finally:
            if not finished:
                logger.info("%s: stream ended early (client gone); request aborted", rid)
            await gen.aclose()
            semaphore.release()
            poke()

    return app
