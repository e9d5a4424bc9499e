"""The OpenAI-compatible HTTP API: `create_app(engine)` -> a FastAPI app.

Routes: `POST /v1/chat/completions` (plain and SSE), `POST /v1/reports`, `POST /v1/explain`, `GET /v1/models`,
`GET /health`, `GET /metrics`, and with `ui=True` the web UI at `/ui` (`serve/webui.py`). Reports and
explanations run synchronously in a worker thread on their own `Analyzer` (the same loaded weights, its
own small KV pool), one at a time under a lock, so the engine thread's `LLMEngine` is never called from
two threads.
The model runs in the `AsyncLLMEngine`'s own thread; request handlers only await its outputs, so
the event loop (and `/health`) never waits on a step. Images come as `data:` URLs (PNG, JPEG or
`application/dicom`) and are read here, off the loop, with byte and pixel limits. Errors are
OpenAI's JSON shape `{"error": {"message", "type", "code"}}`. Logs carry request ids, sizes and
timings, never prompt text, image bytes or DICOM identifiers.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlava.analysis.vqa import Analyzer, AnswerStripper
from medlava.chat.images import decode_data_url
from medlava.chat.templates import get_template
from medlava.engine.async_engine import AsyncLLMEngine
from medlava.engine.llm import LLM
from medlava.engine.sampling import SamplingParams
from medlava.engine.sequence import RequestOutput
from medlava.errors import MedlavaError
from medlava.imaging import load_study
from medlava.imaging.study import MAX_PIXELS
from medlava.serve.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorResponse,
    ExplainRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ReportRequest,
    Usage,
)

logger = logging.getLogger("medlava.serve")

IMAGE_MIMES = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "application/dicom": "dicom"}
DEFAULT_MAX_BODY_BYTES = 32 << 20
DEFAULT_MAX_IMAGE_BYTES = 16 << 20
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_TOKENS = 256
DEFAULT_ANALYSIS_KV_MEMORY = 256 << 20  # the analysis engine's own KV pool (bytes), beside the serving one


def log_requests_to_stderr() -> None:
    """medlava's log at INFO on stderr: request ids, sizes, timings and addresses; never prompts,
    images or identifiers. (Under `--replicas` each Ray actor's stderr goes to Ray's log folder.)"""
    log = logging.getLogger("medlava")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


class APIError(Exception):
    """A refusal with its HTTP status, OpenAI error type and code."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.headers = status, message, code, type_, headers


def response_headers(rid: str, replica: str | None) -> dict[str, str]:
    """A response's request id, and the replica that served it where there are several (--replicas)."""
    return {"X-Request-Id": rid} | ({"X-Medlava-Replica": replica} if replica else {})


def error_response(status: int, message: str, code: str | None, type_: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _validation_message(errors: Iterable[dict]) -> str:
    """Pydantic errors -> 'field: problem; ...' (never echoing the input itself)."""
    parts = []
    for e in errors:
        if e.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts[:5]) or "invalid request"


class _Limits:
    def __init__(self, max_body_bytes: int, max_image_bytes: int, max_pixels: int, max_queue: int):
        self.max_body_bytes, self.max_image_bytes = max_body_bytes, max_image_bytes
        self.max_pixels, self.max_queue = max_pixels, max_queue


def _load_image(url: str, limits: _Limits):
    """A data: URL -> a `Study` (runs in a worker thread); every bad input is an APIError."""
    if url.startswith(("http://", "https://")):
        raise APIError(400, "remote image URLs are not fetched (medlava never uses the network): "
                       "send the image as a data:<mime>;base64,... URL", "remote_image_url")
    if not url.startswith("data:"):
        raise APIError(400, "image_url.url must be a data:<mime>;base64,... URL", "invalid_image_url")
    head = url[: min(len(url), 200)].partition(",")[0]
    mime = head[5:].split(";")[0].strip().lower()
    if mime not in IMAGE_MIMES:
        raise APIError(400, f"unsupported image type {mime[:60]!r}: send image/png, image/jpeg or "
                       "application/dicom", "unsupported_image_type")
    check_image_size(len(url) - len(head) - 1, limits)
    try:
        data, _ = decode_data_url(url)
    except ValueError as e:
        raise APIError(400, str(e), "invalid_image_data") from None
    return read_image(data, mime, limits)


def check_image_size(base64_chars: int, limits: _Limits) -> None:
    """413 for an image whose base64 text decodes to more than the per-image byte limit."""
    approx = base64_chars * 3 // 4
    if approx > limits.max_image_bytes:
        raise APIError(413, f"an image is about {approx} bytes, over the {limits.max_image_bytes}-byte "
                       "per-image limit", "image_too_large")


def read_image(data: bytes, mime: str | None, limits: _Limits):
    """Image bytes -> a `Study` within the pixel limit (runs in a worker thread); failures are APIErrors."""
    try:
        return load_study(data, mime=mime, max_pixels=limits.max_pixels)
    except (MedlavaError, ValueError, OSError) as e:
        raise APIError(400, f"could not read the image: {e}", "invalid_image") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes; beyond it an APIError 413."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > 8 * limit:
        raise APIError(413, f"the request body is {declared} bytes, over the {limit}-byte limit",
                       "request_too_large")
    body, size = bytearray(), 0
    async for chunk in request.stream():  # drained (up to 8x) so the client sees the reply
        size += len(chunk)
        if size > 8 * limit:
            break
        if size <= limit:
            body += chunk
    if size > limit:
        raise APIError(413, f"the request body is over the {limit}-byte limit", "request_too_large")
    return bytes(body)


def _engine_messages(req: ChatCompletionRequest, limits: _Limits) -> tuple[list[dict], int]:
    """Request messages -> the engine's OpenAI-shaped dicts with images read to `Study`s."""
    out, n_images = [], 0
    for m in req.messages:
        if m.content is None or isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts = []
        for p in m.content:
            if p.type == "text":
                parts.append({"type": "text", "text": p.text})
            else:
                parts.append({"type": "image", "image": _load_image(p.image_url.url, limits)})
                n_images += 1
        out.append({"role": m.role, "content": parts})
    return out, n_images


def _params(req: ChatCompletionRequest, template_stop: Iterable[str]) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        temperature=0.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        max_tokens=req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
        stop=list(dict.fromkeys([*stop, *template_stop])),
        seed=req.seed,
        ignore_eos=req.ignore_eos,
    )


class SharedAnalyzer(Analyzer):
    """An `Analyzer` on an already loaded model (no second copy of the weights) with its own
    `LLM` engine and KV pool; only ever called by one thread at a time (the app holds a lock)."""

    def __init__(self, lm, **engine_kwargs):  # noqa: D107 - deliberately not Analyzer.__init__
        self.lm = lm
        self.llm = LLM(lm, **engine_kwargs)


class _EngineCollector:
    """Prometheus gauges read from the engine's last-step metrics at scrape time."""

    def __init__(self, engine: AsyncLLMEngine):
        self.engine = engine

    def collect(self):
        m = self.engine.metrics()
        yield GaugeMetricFamily("medlava_num_requests_running", "Requests in the running batch.", value=m.running)
        yield GaugeMetricFamily("medlava_num_requests_waiting", "Requests waiting to be scheduled.", value=m.waiting)
        usage = m.kv_blocks_used / m.kv_blocks_total if m.kv_blocks_total else 0.0
        yield GaugeMetricFamily("medlava_kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", value=usage)
        yield GaugeMetricFamily("medlava_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / "
                                "prompt tokens looked up.", value=m.prefix_cache_hit_rate)


def create_app(
    engine: AsyncLLMEngine,  # or anything with its serving surface (serve/cluster.py's RemoteEngine)
    *,
    model_name: str | None = None,
    api_keys: Iterable[str] = (),
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = MAX_PIXELS,
    shutdown_engine: bool = True,
    analyzer: Analyzer | None = None,
    analysis_kv_memory: int = DEFAULT_ANALYSIS_KV_MEMORY,
    analysis_concurrency: int = 1,
    ui: bool = False,
) -> FastAPI:
    """The API over `engine`; `model_name` defaults to the model folder's name (`LoadedModel.name`).

    api_keys: when given, every `/v1` route needs `Authorization: Bearer <one of them>`.
    max_queue: requests in flight (queued or running) before new ones get 429.
    analyzer: what `/v1/reports` and `/v1/explain` run on; default a `SharedAnalyzer` on the
    engine's model with an `analysis_kv_memory`-byte KV pool of its own.
    analysis_concurrency: analyses run at once (1 for one analyzer; more where `analyzer` spreads
    them over replicas, whose `served_by` each call's thread reads back).
    ui: also mount the Gradio web UI at `/ui` (`serve/webui.py`), on the same engine and analyzer.
    """
    name = model_name or engine.model_name
    keys = [k.encode() for k in api_keys]
    limits = _Limits(max_body_bytes, max_image_bytes, max_pixels, max_queue)
    template_stop = tuple(get_template(engine.conv_mode).stop)
    created = int(time.time())
    pending = 0  # requests admitted whose images are still being read (not yet counted by the engine)
    analyzer = analyzer or SharedAnalyzer(engine.engine.lm, kv_cache_memory=analysis_kv_memory)
    analysis_slots = asyncio.Semaphore(analysis_concurrency)  # an Analyzer's engine is single-threaded
    analyses = 0  # analyses admitted (waiting for a slot or running); they count against max_queue
    # Images are decoded one at a time: every extra thread holding the GIL slows the event loop's
    # replies (a burst of 32 DICOMs on the default pool held /health for 200+ ms).
    readers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medlava-images")

    registry = CollectorRegistry()
    registry.register(_EngineCollector(engine))
    prompt_tokens = Counter("medlava_prompt_tokens", "Prompt tokens of finished requests.", registry=registry)
    generation_tokens = Counter("medlava_generation_tokens", "Generated tokens of finished requests.",
                                registry=registry)
    buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
    ttft = Histogram("medlava_time_to_first_token_seconds", "Time to first token.", buckets=buckets,
                     registry=registry)
    e2e = Histogram("medlava_e2e_request_latency_seconds", "End-to-end request latency.", buckets=buckets,
                    registry=registry)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        readers.shutdown(wait=False, cancel_futures=True)
        if shutdown_engine:
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="medlava", lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = name
    app.state.limits = limits

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError):
        return error_response(e.status, e.message, e.code, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError):
        return error_response(400, _validation_message(e.errors()), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(e.status_code, str(e.detail), code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, e: Exception):
        logger.error("internal error: %s", type(e).__name__, exc_info=e)
        return error_response(500, "internal server error", "internal_error", "server_error")

    def check_auth(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        ok = False
        for key in keys:  # every key compared, in constant time
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not ok:
            raise APIError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                           "invalid_api_key", "authentication_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_auth(request)
        return ModelList(data=[ModelCard(id=name, created=created)]).model_dump()

    async def parse(request: Request, model_cls):
        body = await read_body(request, limits.max_body_bytes)
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
        try:
            req = model_cls.model_validate(raw)
        except ValidationError as e:
            raise APIError(400, _validation_message(e.errors()), "invalid_request") from None
        if req.model != name:
            raise APIError(404, f"model {req.model[:100]!r} does not exist: this server serves {name!r}",
                           "model_not_found")
        return req, len(body)

    def admit() -> None:
        """429 once `max_queue` requests are in flight (being read, queued, running or analysing)."""
        if pending + analyses + engine.num_unfinished() >= limits.max_queue:
            raise APIError(429, f"the server is busy ({limits.max_queue} requests in flight): retry shortly",
                           "queue_full", "rate_limit_error", headers={"Retry-After": "1"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        nonlocal pending
        check_auth(request)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        try:
            req, body_bytes = await parse(request, ChatCompletionRequest)
            if req.n != 1:
                raise APIError(400, f"n must be 1 (got {req.n}): ask again for another answer", "unsupported_n")
            params = _params(req, template_stop)
            admit()
            pending += 1
            try:
                messages, n_images = await asyncio.get_running_loop().run_in_executor(
                    readers, _engine_messages, req, limits)
                logger.info("%s: %d body bytes, %d message(s), %d image(s), max_tokens=%d, stream=%s",
                            rid, body_bytes, len(req.messages), n_images, params.max_tokens, req.stream)
                gen = engine.generate(rid, params=params, messages=messages)
            finally:
                pending -= 1
            try:
                first = await anext(gen)
            except (ValueError, MedlavaError) as e:  # the messages, the prompt's length, the images
                await gen.aclose()
                raise APIError(400, str(e), "invalid_prompt") from None
        except APIError as e:
            logger.info("%s: refused %d %s", rid, e.status, e.code)
            raise

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        headers = response_headers(rid, first.served_by)
        if req.stream:
            return StreamingResponse(
                _stream(rid, first, gen, include_usage, t0),
                media_type="text/event-stream",
                headers=headers | {"Cache-Control": "no-cache"},
            )
        last = first
        try:
            async for out in gen:
                last = out
        finally:
            await gen.aclose()
        usage = _finish(rid, last, t0)
        resp = ChatCompletionResponse(
            id=rid, model=name, usage=usage,
            choices=[Choice(message=AssistantMessage(content=last.text.strip()), finish_reason=last.finish_reason)],
        )
        return JSONResponse(resp.model_dump(), headers=headers)

    async def analyse(rid: str, work, *args):
        """Run `work(*args)` in a worker thread, `analysis_concurrency` at a time; the loop stays free."""
        nonlocal analyses
        admit()
        analyses += 1
        t0 = time.perf_counter()
        try:
            async with analysis_slots:
                return await asyncio.to_thread(work, *args)
        finally:
            analyses -= 1
            logger.info("%s: done in %.3fs", rid, time.perf_counter() - t0)

    async def analysis_route(request: Request, prefix: str, model_cls, describe: str, work):
        """The shape /v1/reports and /v1/explain share: auth, body, the image (on the reader thread),
        then `work(req, study)` through `analyse`; refusals are logged by request id."""
        check_auth(request)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        try:
            req, size = await parse(request, model_cls)
            study = await asyncio.get_running_loop().run_in_executor(readers, _load_image, req.image, limits)
            logger.info("%s: %d body bytes, %s", rid, size, describe.format(req=req))

            def work_and_replica(*args):  # served_by is read in the thread that made the call
                return work(*args), getattr(analyzer, "served_by", None)

            out, replica = await analyse(rid, work_and_replica, req, study)
        except APIError as e:
            logger.info("%s: refused %d %s", rid, e.status, e.code)
            raise
        return JSONResponse(out, headers=response_headers(rid, replica))

    def draft_report(req: ReportRequest, study) -> dict:
        params = SamplingParams(max_tokens=req.max_tokens or 512)
        try:
            report = analyzer.report(study, params, grounding=None if req.grounding == "none" else req.grounding)
        except (ValueError, MedlavaError) as e:
            raise APIError(400, str(e), "invalid_prompt") from None
        if req.format == "fhir":
            from medlava.analysis.fhir import report_bundle

            return json.loads(report_bundle(report).model_dump_json(exclude_none=True))
        return report.model_dump()

    def show_evidence(req: ExplainRequest, study) -> dict:
        from medlava.analysis.grounding import NothingToLocalize
        from medlava.analysis.overlay import overlay_image

        try:
            ex = analyzer.explain(study, req.question, req.method)
        except NothingToLocalize as e:
            raise APIError(422, str(e), "nothing_to_localize") from None
        except (ValueError, MedlavaError) as e:
            raise APIError(400, str(e), "invalid_prompt") from None
        buf = io.BytesIO()
        overlay_image(ex.image, ex.heat, ex.peak, ex.box).save(buf, format="PNG")
        return {**ex.to_dict(), "overlay": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}

    @app.post("/v1/reports")
    async def reports(request: Request):
        return await analysis_route(request, "report", ReportRequest,
                                    "format={req.format}, grounding={req.grounding}", draft_report)

    @app.post("/v1/explain")
    async def explain(request: Request):
        return await analysis_route(request, "explain", ExplainRequest, "method={req.method}", show_evidence)

    # The web UI takes the same paths: admission for chat on `engine`, `analyse` on `analyzer` for the rest.
    app.state.admit, app.state.analyse, app.state.analyzer = admit, analyse, analyzer

    def _finish(rid: str, out: RequestOutput, t0: float) -> Usage:
        m = out.metrics
        n_prompt = m.prompt_tokens if m else len(out.prompt_token_ids)
        usage = Usage(prompt_tokens=n_prompt, completion_tokens=len(out.token_ids),
                      total_tokens=n_prompt + len(out.token_ids),
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=m.cached_prompt_tokens) if m else None)
        prompt_tokens.inc(usage.prompt_tokens)
        generation_tokens.inc(usage.completion_tokens)
        first = m.time_to_first_token if m else None
        if first is not None:
            ttft.observe(first)
        total = time.perf_counter() - t0
        e2e.observe(total)
        logger.info("%s: done, %d prompt + %d completion tokens, finish=%s, ttft=%s, e2e=%.3fs", rid,
                    usage.prompt_tokens, usage.completion_tokens, out.finish_reason,
                    "-" if first is None else f"{first:.3f}s", total)
        return usage

    async def _stream(rid: str, first: RequestOutput, gen: AsyncIterator[RequestOutput], include_usage: bool,
                      t0: float) -> AsyncIterator[str]:
        stamp = int(time.time())

        def chunk(delta: Delta, finish: str | None = None, usage: Usage | None = None, choices=True) -> str:
            c = ChatCompletionChunk(
                id=rid, created=stamp, model=name, usage=usage,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [],
            )
            return f"data: {c.model_dump_json()}\n\n"

        finished = False
        try:
            yield chunk(Delta(role="assistant", content=""))
            out, strip = first, AnswerStripper()  # the answer is stripped, as `Analyzer.ask` strips it
            while True:
                if body := strip.feed(out.delta_text):
                    yield chunk(Delta(content=body))
                if out.finished:
                    finished = True
                    break
                out = await anext(gen)
            usage = _finish(rid, out, t0)
            yield chunk(Delta(), out.finish_reason)
            if include_usage:
                yield chunk(Delta(), usage=usage, choices=False)
            yield "data: [DONE]\n\n"
        except Exception as e:  # the engine failed mid-stream: say so in the stream, then end it
            finished = True
            logger.error("%s: failed mid-stream: %s", rid, type(e).__name__)
            err = ErrorResponse(error=ErrorBody(message="internal server error", type="server_error",
                                                code="internal_error"))
            yield f"data: {err.model_dump_json()}\n\n"
        finally:
            if not finished:
                logger.info("%s: stream ended early (client gone); request aborted", rid)
            await gen.aclose()

    if ui:
        from medlava.serve.webui import mount_ui

        mount_ui(app, api_keys=keys)
    return app
