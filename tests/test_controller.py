"""The LLaVA controller/worker cluster on loopback: a controller and a worker as uvicorn servers in
threads, a second worker as a real `medlava worker` process (so it can be killed), a tiny random model."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from medlava import Analyzer, SamplingParams
from medlava.chat.messages import question_messages, render_prompt
from medlava.engine.async_engine import AsyncLLMEngine
from medlava.serve.controller import Controller, WorkerInfo, create_controller_app
from medlava.serve.protocol import NO_WORKER, OK, SERVER_ERROR_MSG, WORKER_ERROR, WORKER_UNREACHABLE
from medlava.serve.worker import create_worker_app

PNG = Path(__file__).resolve().parent.parent / "samples" / "chest_xray.png"
QUESTION = "Is there a pleural effusion on this film?"
BEAT, EXPIRY = 0.3, 3.0  # seconds: heartbeats and their expiry, short so that a test can wait one out
SMALL_KV = 16 << 20  # bytes: the analysis pool each worker app reserves (no /v1/reports here)


def png_b64() -> str:
    return base64.b64encode(PNG.read_bytes()).decode()


def nul_frames(response: httpx.Response) -> list[dict]:
    """What LLaVA's clients do: `iter_lines(delimiter=b"\\0")`, JSON-decoding each non-empty piece."""
    out, buf = [], b""
    for chunk in response.iter_bytes():
        *pieces, buf = (buf + chunk).split(b"\0")
        out += [json.loads(p) for p in pieces if p]
    assert buf == b"", "a frame without its NUL terminator"
    return out


def post_frames(url: str, payload, timeout: float = 60) -> tuple[int, list[dict]]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with httpx.stream("POST", url + "/worker_generate_stream", content=body, timeout=timeout,
                      headers={"User-Agent": "LLaVA-Med Client"}) as r:
        return r.status_code, nul_frames(r)


def bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serving(app, sock: socket.socket):
    """A uvicorn serving `app` on `sock` in a thread; `.should_exit` on the yielded server stops it."""
    srv = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.started
    try:
        yield srv
    finally:
        srv.should_exit = True
        thread.join(15)
        sock.close()


def url_of(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    folder = model_dir("mistral-mlp2x-l2")
    capture = Capture()
    log = logging.getLogger("medlava")
    saved_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(capture)
    controller = Controller("shortest_queue", heart_beat_expiration=EXPIRY)
    ctl_sock, a_sock = bound_socket(), bound_socket()
    ctl_url, a_url = url_of(ctl_sock), url_of(a_sock)
    with socket.socket() as probe:  # a free port for the worker process
        probe.bind(("127.0.0.1", 0))
        b_port = probe.getsockname()[1]
    b_url = f"http://127.0.0.1:{b_port}"
    b_log = tmp_path_factory.mktemp("worker-b") / "worker.log"
    env = {**os.environ, "MEDLAVA_WORKER_HEART_BEAT_INTERVAL": str(BEAT)}
    with open(b_log, "wb") as out:
        worker_b = subprocess.Popen(
            [sys.executable, "-m", "medlava", "worker", "--controller", ctl_url, "--port", str(b_port),
             "--model", str(folder), "--limit-model-concurrency", "2"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    engine = AsyncLLMEngine(folder)
    app_a = create_worker_app(engine, controller_url=ctl_url, worker_address=a_url, heart_beat_interval=BEAT,
                              limit_model_concurrency=16, analysis_kv_memory=SMALL_KV)
    try:
        with serving(create_controller_app(controller), ctl_sock), serving(app_a, a_sock):
            try:
                wait_for(lambda: {a_url, b_url} <= set(controller.workers) or worker_b.poll() is not None,
                         90, "both workers to register")
            finally:
                assert worker_b.poll() is None, b_log.read_text()[-3000:]
            yield {"controller": controller, "url": ctl_url, "a": a_url, "b": b_url, "worker_b": worker_b,
                   "engine": engine, "name": app_a.state.model_name, "folder": folder, "logs": capture}
    finally:
        if worker_b.poll() is None:
            worker_b.send_signal(signal.SIGTERM)
            worker_b.wait(20)
        log.removeHandler(capture)
        log.setLevel(saved_level)


@pytest.fixture(scope="module")
def analyzer(cluster):
    return Analyzer(cluster["folder"])


def llava_payload(cluster, **extra) -> dict:
    """What LLaVA-Med's Gradio server posts: the rendered prompt, base64 PNGs, sampling settings."""
    conv_mode = cluster["engine"].engine.lm.conv_mode
    prompt = render_prompt(question_messages(QUESTION), conv_mode)
    return {"model": cluster["name"], "prompt": prompt, "temperature": 0.0, "top_p": 0.7,
            "max_new_tokens": 48, "images": [png_b64()], **extra}


# -- dispatch, without servers ---------------------------------------------------------------------


def _info(queue_length: int, speed: float, models=("m",), age: float = 0.0, check: bool = True) -> WorkerInfo:
    return WorkerInfo(list(models), speed, queue_length, check, time.monotonic() - age)


def test_shortest_queue_and_lottery_dispatch():
    c = Controller("shortest_queue", heart_beat_expiration=EXPIRY)
    c.workers = {"a": _info(3, 1), "b": _info(1, 1), "c": _info(2, 4), "z": _info(0, 0), "o": _info(0, 1, ["other"])}
    # queue/speed: a 3, b 1, c 0.5 -> c; c counts its new request (0.75) -> c; then c 1.0 ties b 1.0 -> b (first)
    assert [c.get_worker_address("m") for _ in range(3)] == ["c", "c", "b"]
    assert c.get_worker_address("m", exclude=["b", "c"]) == "a"
    assert c.get_worker_address("m", exclude=["a", "b", "c"]) == ""  # a speed-0 worker is never picked
    assert c.get_worker_address("nobody") == ""
    assert c.list_models() == ["m", "other"]

    lottery = Controller("lottery", heart_beat_expiration=EXPIRY, seed=0)
    lottery.workers = {"slow": _info(0, 1), "fast": _info(9, 3), "off": _info(0, 0)}
    picks = [lottery.get_worker_address("m") for _ in range(4000)]
    assert "off" not in picks
    assert 0.72 < picks.count("fast") / len(picks) < 0.78  # weighted by speed, whatever the queues

    with pytest.raises(ValueError, match="shortest_queue or lottery"):
        Controller("round_robin")


def test_workers_without_heartbeats_expire():
    c = Controller(heart_beat_expiration=EXPIRY)
    c.workers = {"old": _info(0, 1, age=EXPIRY + 1), "fresh": _info(0, 1, ["f"]),
                 "manual": _info(0, 1, ["x"], age=EXPIRY + 1, check=False)}  # registered without heartbeats
    gone = c.workers["old"].gone
    assert c.list_models() == ["f", "x"] and not c.receive_heart_beat("old", 0)
    assert gone.is_set()  # streams through the controller to it end
    assert c.receive_heart_beat("fresh/", 2) and c.workers["fresh"].queue_length == 2


# -- a controller with no workers ---------------------------------------------------------------------


def test_no_worker_gets_exactly_one_code_2_frame_and_openai_404(cluster):
    controller = Controller(heart_beat_expiration=EXPIRY)
    sock = bound_socket()
    with serving(create_controller_app(controller), sock):
        url = url_of(sock)
        status, frames = post_frames(url, {"model": "medlava-tiny", "prompt": "hello"})
        assert frames == [{"text": SERVER_ERROR_MSG, "error_code": NO_WORKER}] and status == 404
        assert httpx.post(url + "/get_worker_address", json={"model": "medlava-tiny"}).json() == {"address": ""}
        assert httpx.post(url + "/list_models").json() == {"models": []}
        assert httpx.post(url + "/receive_heart_beat", json={"worker_name": "http://x", "queue_length": 0}
                          ).json() == {"exist": False}
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert client.models.list().data == []
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="medlava-tiny", messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["code"] == "model_not_found"
        # LLaVA's register_worker.py: no status given, so the controller asks the worker for it.
        r = httpx.post(url + "/register_worker", json={"worker_name": cluster["a"], "check_heart_beat": False,
                                                         "worker_status": None})
        assert r.status_code == 200
        assert httpx.post(url + "/list_models").json() == {"models": [cluster["name"]]}
        assert httpx.post(url + "/receive_heart_beat", json={"worker_name": cluster["a"], "queue_length": 0}
                          ).json() == {"exist": True}
        status = httpx.post(url + "/worker_get_status").json()
        assert status["model_names"] == [cluster["name"]] and status["speed"] == 1
        bad = httpx.post(url + "/register_worker", json={"worker_name": "http://127.0.0.1:9",
                                                           "check_heart_beat": True})
        assert bad.status_code == 400 and "did not answer" in bad.json()["error"]["message"]


# -- LLaVA's clients, unchanged ----------------------------------------------------------------------------


def test_llava_client_gets_medlavas_own_greedy_answer(cluster, analyzer):
    want = analyzer.ask(PNG, QUESTION, SamplingParams(max_tokens=48))
    assert want.answer
    url = cluster["url"]
    assert httpx.post(url + "/refresh_all_workers").status_code == 200  # what the Gradio server does first
    assert cluster["name"] in httpx.post(url + "/list_models").json()["models"]
    worker = httpx.post(url + "/get_worker_address", json={"model": cluster["name"]}).json()["address"]
    assert worker in (cluster["a"], cluster["b"])
    payload = llava_payload(cluster, stop="</s>")
    assert payload["prompt"] == want.prompt
    for target in (worker, url):  # straight to the worker (Gradio) and through the controller
        status, frames = post_frames(target, payload)
        assert status == 200 and frames and all(f["error_code"] == OK for f in frames)
        texts = [f["text"] for f in frames]
        assert all(t.startswith(payload["prompt"]) for t in texts)  # the prompt plus the output so far
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
        assert texts[-1][len(payload["prompt"]):].strip() == want.answer  # Gradio's slice
    del payload["stop"]  # LLaVA's worker fails without one; the template's stop strings apply
    _, frames = post_frames(url, payload)
    assert frames[-1]["text"][len(payload["prompt"]):].strip() == want.answer


def test_openai_api_through_the_controller_matches_the_worker(cluster):
    url = "data:image/png;base64," + png_b64()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]}]
    via = openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    direct = openai.OpenAI(base_url=cluster["a"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    kwargs = dict(model=cluster["name"], messages=messages, max_tokens=24, temperature=0)
    want = direct.chat.completions.create(**kwargs)
    got = via.chat.completions.create(**kwargs)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.total_tokens == want.usage.total_tokens
    chunks = list(via.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    assert [m.id for m in via.models.list().data] == [cluster["name"]]
    with pytest.raises(openai.NotFoundError) as e:
        via.chat.completions.create(**{**kwargs, "model": "gpt-4o"})
    assert e.value.body["code"] == "model_not_found" and "gpt-4o" in e.value.body["message"]
    r = httpx.post(cluster["url"] + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


BAD_CASES = ("bad base64", "not an image", "truncated PNG", "max_new_tokens > 1024", "images without placeholders",
             "no prompt", "malformed JSON", "no model", "unknown model")


def _bad_cases(cluster) -> dict[str, tuple[object, int, int, str]]:
    good = llava_payload(cluster)
    png = PNG.read_bytes()
    cases = [
        ("bad base64", {**good, "images": ["@@@not-base64@@@"]}, 400, WORKER_ERROR, "base64"),
        ("not an image", {**good, "images": [base64.b64encode(b"hello").decode()]}, 400, WORKER_ERROR,
         "could not read the image"),
        ("truncated PNG", {**good, "images": [base64.b64encode(png[: len(png) // 2]).decode()]}, 400, WORKER_ERROR,
         "truncated or corrupt"),
        ("max_new_tokens > 1024", {**good, "max_new_tokens": 2000}, 400, WORKER_ERROR, "1024"),
        ("images without placeholders", {**good, "images": [png_b64(), png_b64()]}, 400, WORKER_ERROR,
         "1 <image> placeholder(s) but 2 image(s)"),
        ("no prompt", {"model": cluster["name"]}, 400, WORKER_ERROR, "prompt"),
        ("malformed JSON", b'{"model": "x", "prompt": ', 400, WORKER_ERROR, "not valid JSON"),
        ("no model", {"prompt": "hi"}, 400, WORKER_ERROR, "names no model"),
        ("unknown model", {**good, "model": "llava-med-v1.5-mistral-7b"}, 404, NO_WORKER, SERVER_ERROR_MSG),
    ]
    assert tuple(c[0] for c in cases) == BAD_CASES
    return {name: rest for name, *rest in cases}


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_gets_one_clear_error_frame_and_serving_goes_on(cluster, name):
    payload, status, code, needle = _bad_cases(cluster)[name]
    got, frames = post_frames(cluster["url"], payload)
    assert (got, len(frames), frames[0]["error_code"]) == (status, 1, code), (name, frames)
    assert needle in frames[0]["text"] and "Traceback" not in frames[0]["text"], (name, frames)
    _, ok = post_frames(cluster["url"], llava_payload(cluster, max_new_tokens=4))
    assert ok and ok[-1]["error_code"] == OK


def test_a_worker_refuses_a_model_it_does_not_serve(cluster):
    status, frames = post_frames(cluster["a"], llava_payload(cluster, model="other"))
    assert status == 404 and frames[0]["error_code"] == WORKER_ERROR and "not served here" in frames[0]["text"]
    status = httpx.post(cluster["a"] + "/worker_get_status").json()
    assert status == {"model_names": [cluster["name"]], "speed": 1.0, "queue_length": 0}


def test_logs_carry_no_prompt_text(cluster):
    text = "\n".join(cluster["logs"].lines)
    assert "llava-" in text and "image(s)" in text  # request ids and sizes are logged...
    assert QUESTION not in text and "pleural" not in text  # ...never the prompt


# -- workers that stop -------------------------------------------------------------------------------------


def test_a_worker_without_heartbeats_is_dropped_after_expiry(cluster):
    controller = cluster["controller"]
    sock = bound_socket()
    address = url_of(sock)
    solo = create_worker_app(cluster["engine"], controller_url=cluster["url"], worker_address=address,
                             heart_beat_interval=BEAT, model_name="solo", shutdown_engine=False,
                             analysis_kv_memory=SMALL_KV)
    with serving(solo, sock):
        wait_for(lambda: "solo" in httpx.post(cluster["url"] + "/list_models").json()["models"], 20, "solo to register")
    stopped = time.monotonic()  # no more heartbeats from here
    wait_for(lambda: "solo" not in httpx.post(cluster["url"] + "/list_models").json()["models"], EXPIRY + 5,
             "solo to expire")
    assert time.monotonic() - stopped > EXPIRY - 2 * BEAT - 0.5  # dropped by expiry, not before
    assert httpx.post(cluster["url"] + "/get_worker_address", json={"model": "solo"}).json() == {"address": ""}
    assert address not in controller.workers
    assert post_frames(cluster["url"], {"model": "solo", "prompt": "hi"})[1][0]["error_code"] == NO_WORKER


def fake_worker(mode: str):
    """A worker that streams two frames (or SSE events), then dies ("die": the connection drops
    mid-body) or goes silent ("hang"), and never sends heartbeats."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from medlava.serve.protocol import frame

    app = FastAPI()

    async def then_fail(pieces: list[bytes]):
        for piece in pieces:
            yield piece
        if mode == "hang":
            await asyncio.sleep(3600)
        raise RuntimeError("the worker died")  # uvicorn drops the connection mid-body

    @app.post("/worker_get_status")
    async def status():
        return {"model_names": ["fake"], "speed": 1, "queue_length": 0}

    @app.post("/worker_generate_stream")
    async def generate():
        return StreamingResponse(then_fail([frame("p" + "a"), frame("pab")]))

    @app.post("/v1/chat/completions")
    async def chat():
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}, "finish_reason": None}]}
        return StreamingResponse(then_fail([f"data: {json.dumps(chunk)}\n\n".encode()] * 2),
                                 media_type="text/event-stream")

    return app


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_streams_of_a_worker_that_dies_or_hangs_end_with_an_error(mode):
    controller = Controller(heart_beat_expiration=1.0)
    ctl_sock, fake_sock = bound_socket(), bound_socket()
    url, fake = url_of(ctl_sock), url_of(fake_sock)
    with serving(create_controller_app(controller), ctl_sock), serving(fake_worker(mode), fake_sock):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        for kind in ("llava", "openai"):
            assert httpx.post(url + "/register_worker", json={"worker_name": fake, "check_heart_beat": True}
                              ).status_code == 200
            t0 = time.monotonic()
            if kind == "llava":
                status, frames = post_frames(url, {"model": "fake", "prompt": "p"}, timeout=30)
                assert status == 200 and [f["error_code"] for f in frames] == [OK, OK, WORKER_UNREACHABLE]
                assert frames[-1]["text"] == SERVER_ERROR_MSG
            else:
                stream = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                                        stream=True)
                got = []
                with pytest.raises(openai.APIError, match="failed mid-stream"):
                    for chunk in stream:
                        got.append(chunk.choices[0].delta.content)
                assert got == ["a", "a"]
            waited = time.monotonic() - t0
            assert fake not in controller.workers  # dropped: dead at once, hung once its heartbeats expire
            assert waited < 10 and (mode == "die" or waited > 0.5), waited


def test_killing_a_worker_retries_the_unstarted_and_errors_the_streaming(cluster):
    """Worker B (a process, 2 requests at a time) is killed while it streams two requests and holds
    more waiting: those two end with a code-3 frame; the waiting ones are retried on A and succeed."""
    url, a, b, controller = cluster["url"], cluster["a"], cluster["b"], cluster["controller"]
    if cluster["worker_b"].poll() is not None:
        pytest.skip("worker B is not running")
    payload = llava_payload(cluster, max_new_tokens=500, ignore_eos=True)
    results: list[list[dict]] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with httpx.stream("POST", url + "/worker_generate_stream", json=payload, timeout=120) as r:
                buf = b""
                for chunk in r.iter_bytes():
                    *pieces, buf = (buf + chunk).split(b"\0")
                    results[i] += [json.loads(p) for p in pieces if p]
        except BaseException as e:  # reported below
            errors.append(e)

    def queue(worker: str) -> int:
        return httpx.post(worker + "/worker_get_status").json()["queue_length"]

    threads: list[threading.Thread] = []

    def launch() -> None:
        results.append([])
        threads.append(threading.Thread(target=run, args=(len(results) - 1,), daemon=True))
        threads[-1].start()

    for _ in range(6):  # shortest_queue spreads them over A and B...
        launch()
    deadline = time.monotonic() + 30
    while queue(b) < 3 and len(threads) < 16 and time.monotonic() < deadline:
        launch()  # ...and, as A's queue grows, sends more to B, where they wait for its 2 slots
        time.sleep(0.2)
    n = len(threads)

    def b_streams_two_and_holds_more():
        qa, qb = queue(a), queue(b)
        started = sum(bool(r) for r in results)
        return qb >= 3 and qa >= 1 and started == n - (qb - 2) and (qa, qb)

    qa, qb = wait_for(b_streams_two_and_holds_more, 60, "both workers busy, B with requests waiting")
    started_at_kill = [bool(r) for r in results]
    cluster["worker_b"].send_signal(signal.SIGKILL)
    cluster["worker_b"].wait(10)
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    assert not errors, errors
    print(f"queues at kill: A {qa}, B {qb}; started {sum(started_at_kill)} of {n}")

    failed = [i for i, r in enumerate(results) if r[-1]["error_code"] != OK]
    assert len(failed) == 2 and all(started_at_kill[i] for i in failed)  # B's two streams, and only they
    for i in failed:
        assert results[i][-1] == {"text": SERVER_ERROR_MSG, "error_code": WORKER_UNREACHABLE}
        assert all(f["error_code"] == OK for f in results[i][:-1])  # one error frame, at the end
    full = {r[-1]["text"] for i, r in enumerate(results) if i not in failed}
    assert len(full) == 1 and len(full.pop()) > len(payload["prompt"])  # every other request, retried or not, finished
    assert sum(not s for s in started_at_kill) == qb - 2 >= 1  # the ones B held waiting were retried on A

    assert b not in controller.workers  # dropped at once, before any expiry
    assert {httpx.post(url + "/get_worker_address", json={"model": cluster["name"]}).json()["address"]
            for _ in range(4)} == {a}
    assert httpx.post(url + "/list_models").json()["models"] == [cluster["name"]]
    _, frames = post_frames(url, llava_payload(cluster, max_new_tokens=4))
    assert frames[-1]["error_code"] == OK


def test_cli_commands_parse_their_options():
    from typer.testing import CliRunner

    from medlava.cli import app

    runner = CliRunner()
    for command, options in (("controller", ("--host", "--port", "--dispatch")),
                             ("worker", ("--controller", "--host", "--port", "--worker-address", "--model",
                                         "--limit-model-concurrency"))):
        helped = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
        assert helped.exit_code == 0
        for opt in options:
            assert opt in helped.output, (command, opt)
    bad = runner.invoke(app, ["controller", "--dispatch", "round_robin"])
    assert bad.exit_code == 2 and "shortest_queue or lottery" in bad.output
    bad = runner.invoke(app, ["worker", "--controller", "localhost:21001"])
    assert bad.exit_code == 2 and "must be a URL" in bad.output
