"""`medlava serve --replicas N`: the OpenAI-compatible API as a Ray Serve application.

- `EngineReplica` (N of them, each with `--num-cpus-per-replica` CPUs or `--num-gpus-per-replica`
  GPUs): a medlava engine (`AsyncLLMEngine`) and the analyzer reports and explanations run on.
- `Ingress` (one, no CPU reserved): the step-6 app itself (`serve.api.create_app`: the same routes,
  auth, limits, metrics and refusals) over `RemoteEngine`/`RemoteAnalyzer`, which forward to the
  replicas through a Ray Serve handle. Images are read here, once; a request's first image
  picks its replica (`serve/routing.py`, in Ray Serve's request-router hook `ImageAffinityRouter`),
  so every question about a study shares one replica's prefix and vision caches.
- A replica that dies is replaced by Ray Serve; a request it had not answered yet (no token
  streamed) is sent again, to a live replica, so a client only sees a failure for a request
  that was under way. Every response names its replica in `x-medlava-replica`.

`--ray-address` joins a running cluster (`ray start --head` on one machine, `ray start --address
HEAD:6379` on the others, each with medlava and the model folder at the same path); without it a
local Ray instance starts. `pip install 'medlava[ray]'` brings Ray Serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import threading
import time
from collections.abc import AsyncIterator

from medlava.engine.llm_engine import EngineMetrics
from medlava.engine.sampling import SamplingParams
from medlava.engine.sequence import RequestOutput
from medlava.errors import MedlavaError
from medlava.serve.routing import DEFAULT_SLACK, image_key, ranked, study_key

logger = logging.getLogger("medlava.serve")

try:
    import ray
    from ray import serve
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
except ImportError:  # serve.api and the CLI say how to get it when --replicas is asked for
    ray = serve = None
    RequestRouter = object

ROUTINGS = ("image", "random")
RETRIES = 3  # sends of a request whose replica died before it answered
ANALYSES_AT_ONCE = 64  # reports/explanations the ingress forwards at once (each replica runs its own one at a time)
MAX_ONGOING = 256  # requests a replica takes before Ray Serve holds more back (its engine batches up to 64)
COALESCE_S = 0.05  # a stream's outputs within this long of the last one sent cross Ray as one


def require_ray() -> None:
    if ray is None:
        raise MedlavaError("--replicas needs Ray Serve: pip install 'medlava[ray]' (or 'ray[serve]')")


# -- replica choice ------------------------------------------------------------------------------


class ImageAffinityRouter(RequestRouter):
    """Ray Serve's request router for `EngineReplica`: a request's `route_key` (its first image's
    hash) ranks the replicas by `routing.ranked`, with the loads Ray Serve's router knows (its
    replicas' queue lengths); `routing="random"` (a baseline) picks uniformly instead."""

    def initialize_state(self, routing: str = "image", slack: float = DEFAULT_SLACK, **kwargs) -> None:
        self.routing, self.slack = routing, slack

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if self.routing == "random":
            return [[random.choice(candidate_replicas)]] if candidate_replicas else []
        key = pending_request.kwargs.get("route_key") if pending_request is not None else None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {i: self._replica_queue_len_cache.get(r.replica_id) or 0 for i, r in by_id.items()}
        ranks = ranked(key, list(by_id), loads, self.slack)
        # The first rank only: given the others, Ray Serve sends a request on to the next rank
        # whenever the first's queue-length probe is slow to answer (a busy machine), away from the
        # replica holding its image's KV blocks; with one rank it asks that replica again.
        return [[by_id[i] for i in ranks[0]]] if ranks else []


# -- the deployments -----------------------------------------------------------------------------


def replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id


class EngineReplica:
    """One engine of the application, and its analyzer (the same weights, a small KV pool of its own)."""

    def __init__(self, model: str | None, engine_kwargs: dict, threads: int | None):
        import torch

        from medlava.engine.async_engine import AsyncLLMEngine
        from medlava.serve.api import DEFAULT_ANALYSIS_KV_MEMORY, SharedAnalyzer, log_requests_to_stderr

        log_requests_to_stderr()
        if threads:
            torch.set_num_threads(threads)  # the CPUs Ray gave this replica, not the whole machine's
        self.engine = AsyncLLMEngine(model, **engine_kwargs)
        self.analyzer = SharedAnalyzer(self.engine.engine.lm, kv_cache_memory=DEFAULT_ANALYSIS_KV_MEMORY)
        self.analysis_lock = asyncio.Lock()
        self.id = replica_id()

    def info(self) -> dict:
        return {"model_name": self.engine.model_name, "conv_mode": self.engine.conv_mode}

    async def generate(self, rid: str, params: SamplingParams, messages: list[dict], route_key: str | None = None):
        """The engine's outputs for one request, as (replica id, output, engine metrics on the last).
        After the first, an output that comes within COALESCE_S of the last one sent is held and
        goes with the next (their deltas joined; at most one engine step later): each item crossing
        Ray costs the replica's CPU what the engine needs."""
        held, sent = None, 0.0
        async with contextlib.aclosing(self.engine.generate(rid, params=params, messages=messages)) as outputs:
            async for out in outputs:
                if held is not None:
                    out = dataclasses.replace(out, delta_text=held.delta_text + out.delta_text,
                                              new_token_ids=held.new_token_ids + out.new_token_ids)
                if out.finished or not sent or time.perf_counter() - sent >= COALESCE_S:
                    yield self.id, out, self.engine.metrics() if out.finished else None
                    held, sent = None, time.perf_counter()
                else:
                    held = out

    async def analyse(self, method: str, args: tuple, kwargs: dict, route_key: str | None = None):
        """(replica id, `Analyzer.<method>(*args, **kwargs)`), one analysis at a time, off the event loop."""
        async with self.analysis_lock:
            return self.id, await asyncio.to_thread(getattr(self.analyzer, method), *args, **kwargs)


# -- the ingress' view of the replicas -----------------------------------------------------------


class RemoteEngine:
    """What `create_app` needs of an engine (`generate`, `num_unfinished`, `metrics`, the model's
    name and template), answered by the replicas through a Ray Serve handle."""

    def __init__(self, handle, info: dict):
        self.handle = handle
        self.model_name, self.conv_mode = info["model_name"], info["conv_mode"]
        self.in_flight = 0
        self.replica_metrics: dict[str, EngineMetrics] = {}  # each replica's, as of its last finished request

    def num_unfinished(self) -> int:
        return self.in_flight

    def metrics(self) -> EngineMetrics:
        """The replicas' engines as one: counts summed, the prefix-cache hit rate over all their prompts."""
        ms = list(self.replica_metrics.values())
        if not ms:
            return EngineMetrics(0, 0, 0, 0, 0.0, 0.0, 0, 0, 0, 0, 0)
        total = lambda name: sum(getattr(m, name) for m in ms)  # noqa: E731
        prompts = total("prompt_tokens")
        return EngineMetrics(
            running=total("running"), waiting=total("waiting"), kv_blocks_used=total("kv_blocks_used"),
            kv_blocks_total=total("kv_blocks_total"),
            prefix_cache_hit_rate=total("cached_prompt_tokens") / prompts if prompts else 0.0,
            vision_cache_hit_rate=sum(m.vision_cache_hit_rate for m in ms) / len(ms),
            preemptions=total("preemptions"), prompt_tokens=prompts, cached_prompt_tokens=total("cached_prompt_tokens"),
            generation_tokens=total("generation_tokens"), images_encoded=total("images_encoded"),
        )

    async def generate(self, request_id: str, *, params: SamplingParams, messages: list[dict]) -> AsyncIterator[RequestOutput]:
        """The request's outputs from the replica its first image picks, each with `served_by`. A
        replica that dies (or cannot be reached) before its first output is replaced by another (up
        to RETRIES sends, each under its own id); a replica's refusal (a prompt too long) is raised
        as the replica raised it."""
        key = image_key(messages)
        self.in_flight += 1
        try:
            for attempt in range(RETRIES):
                rid = request_id if attempt == 0 else f"{request_id}-{attempt}"
                stream = self.handle.options(stream=True).generate.remote(rid, params, messages, route_key=key)
                replica = None
                try:
                    async for replica, out, metrics in stream:
                        if metrics is not None:
                            self.replica_metrics[replica] = metrics
                        yield dataclasses.replace(out, request_id=request_id, served_by=replica)
                    return
                except ray.exceptions.RayTaskError as e:
                    raise e.cause from None  # not Ray's traceback, which names the replica's host and files
                except ray.exceptions.RayActorError:
                    if replica is not None:  # it died mid-stream: its figures leave the sum
                        self.replica_metrics.pop(replica, None)
                    if replica is not None or attempt == RETRIES - 1:
                        raise
                    logger.info("%s: its replica died before answering; sending it again", request_id)
                finally:
                    stream.cancel()  # a no-op once finished; otherwise the replica aborts the request
        finally:
            self.in_flight -= 1


class RemoteAnalyzer:
    """`Analyzer.report`/`.explain` on the replica the study's image picks (blocking: `create_app`
    calls it from worker threads, several at once); `served_by` is the replica of this thread's
    last call."""

    def __init__(self, handle):
        self.handle = handle
        self.local = threading.local()

    @property
    def served_by(self) -> str | None:
        return getattr(self.local, "served_by", None)

    def _call(self, method: str, study, *args, **kwargs):
        for attempt in range(RETRIES):
            try:
                self.local.served_by, result = self.handle.analyse.remote(
                    method, (study, *args), kwargs, route_key=study_key(study)).result()
                return result
            except ray.exceptions.RayTaskError as e:
                raise e.cause from None  # the replica's own error (nothing to localise, a bad image), not Ray's
            except ray.exceptions.RayActorError:
                if attempt == RETRIES - 1:
                    raise

    def report(self, study, params: SamplingParams | None = None, grounding: str | None = "occlusion"):
        return self._call("report", study, params, grounding=grounding)

    def explain(self, study, question: str, method: str = "relevance"):
        return self._call("explain", study, question, method)


class Ingress:
    """The HTTP front: `create_app` over the replicas (`__serve_build_asgi_app__`, after `__init__`)."""

    def __init__(self, replicas, app_options: dict):
        self.replicas, self.app_options = replicas, app_options

    async def __serve_build_asgi_app__(self):
        from medlava.serve.api import create_app, log_requests_to_stderr

        log_requests_to_stderr()
        info = await self.replicas.info.remote()
        return create_app(RemoteEngine(self.replicas, info), analyzer=RemoteAnalyzer(self.replicas),
                          shutdown_engine=False, analysis_concurrency=ANALYSES_AT_ONCE, **self.app_options)


# -- the application -----------------------------------------------------------------------------


def build_application(
    model: str | None, engine_kwargs: dict, app_options: dict, *, replicas: int, max_replicas: int | None = None,
    num_cpus: float = 1, num_gpus: float = 0, routing: str = "image",
):
    """The bound Ray Serve application: `replicas` engines (autoscaled up to `max_replicas`) behind the ingress."""
    require_ray()
    if routing not in ROUTINGS:
        raise MedlavaError(f"unknown routing {routing!r}: use {' or '.join(ROUTINGS)}")
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise MedlavaError("--replicas must be at least 1 and --max-replicas at least --replicas")
    scaling = {"num_replicas": replicas} if not max_replicas or max_replicas == replicas else {
        "autoscaling_config": AutoscalingConfig(min_replicas=replicas, max_replicas=max_replicas,
                                                target_ongoing_requests=32),
    }
    engine = serve.deployment(
        EngineReplica, name="EngineReplica", max_ongoing_requests=MAX_ONGOING,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        request_router_config=RequestRouterConfig(
            request_router_class=ImageAffinityRouter, request_router_kwargs={"routing": routing},
        ),
        **scaling,
    )
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=10_000)
    threads = max(1, int(num_cpus)) if not num_gpus else None
    return ingress.bind(engine.bind(model, engine_kwargs, threads), app_options)


APP_NAME = "medlava"


def run(application, *, host: str, port: int, ray_address: str | None) -> None:
    """Start (or join) Ray, deploy `application` at host:port and serve until SIGINT or SIGTERM;
    then the application is deleted (and a Ray instance started here is stopped)."""
    require_ray()
    ray.init(address=ray_address, log_to_driver=False, include_dashboard=False if ray_address is None else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        if not serve.status().applications:
            serve.shutdown()  # an idle Serve left by an earlier run would keep that run's HTTP port
        serve.start(http_options={"host": host, "port": port, "location": "HeadOnly"})
        serve.run(application, name=APP_NAME, route_prefix="/")
        logger.info("application %r ready", APP_NAME)
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        if ray_address is None or not serve.status().applications:
            serve.shutdown()  # and its HTTP proxy, so that the next run can choose its port
        ray.shutdown()
