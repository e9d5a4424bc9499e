"""The OpenAI-compatible server: a real uvicorn on loopback, driven by the real `openai` SDK."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import openai
import pydicom
import pytest
import uvicorn

from medlava import Analyzer, SamplingParams
from medlava.engine.async_engine import AsyncLLMEngine
from medlava.engine.llm_engine import LLMEngine
from medlava.model.demo import DEMO_MODEL
from medlava.serve.api import create_app

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="the demo model is missing")

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
PNG, DICOM = SAMPLES / "chest_xray.png", SAMPLES / "phantom_chest_effusion.dcm"
KEY = "test-key-123"
QUESTION = "Is there a pleural effusion on this film?"
MAX_BODY, MAX_IMAGE = 1 << 20, 300_000


def free_port() -> int:
    """A loopback port nothing listens on (for a server started in its own process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + (record.exc_text or ""))


@contextmanager
def start_server(app):
    """A uvicorn serving `app` on a free loopback port, in a thread; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="info"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if srv.started:
            break
        time.sleep(0.01)
    assert srv.started
    try:
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def captured_logs():
    """Every INFO line of medlava's and uvicorn's loggers while the block runs, as a `Capture`."""
    capture = Capture()
    loggers = [logging.getLogger(n) for n in ("medlava", "uvicorn", "uvicorn.error", "uvicorn.access")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    logging.getLogger().addHandler(capture)
    try:
        yield capture
    finally:
        logging.getLogger().removeHandler(capture)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@pytest.fixture(scope="module")
def server():
    analyzer = Analyzer()
    engine = AsyncLLMEngine(LLMEngine(analyzer.lm))
    app = create_app(engine, api_keys=[KEY], max_body_bytes=MAX_BODY, max_image_bytes=MAX_IMAGE)
    with captured_logs() as capture, start_server(app) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        yield {"analyzer": analyzer, "engine": engine, "app": app, "port": port, "client": client,
               "model": analyzer.lm.name, "logs": capture}


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def post_chat(server, payload, key: str | None = KEY):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return raw(server, "POST", "/v1/chat/completions", body, headers)


def streamed(client, **kwargs) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize("path,mime", [(PNG, "image/png"), (DICOM, "application/dicom")])
def test_plain_and_streamed_answers_equal_analyzer_ask(server, path, mime):
    want = server["analyzer"].ask(path, QUESTION, SamplingParams(max_tokens=64))
    client, model = server["client"], server["model"]
    kwargs = dict(model=model, messages=image_message(data_url(path, mime)), max_tokens=64, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    assert plain.choices[0].message.content == want.answer
    assert plain.choices[0].finish_reason == want.finish_reason
    u = plain.usage
    assert u.completion_tokens == len(want.token_ids) and u.prompt_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    text, chunks = streamed(client, stream_options={"include_usage": True}, **kwargs)
    assert text == want.answer
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == u.total_tokens
    assert all(c.id == chunks[0].id for c in chunks)


def test_multi_turn_stop_and_models(server):
    client, model = server["client"], server["model"]
    url = data_url(PNG, "image/png")
    one = client.chat.completions.create(model=model, messages=image_message(url), max_tokens=8)
    turns = [*image_message(url), {"role": "assistant", "content": one.choices[0].message.content},
             {"role": "user", "content": "Anything else?"}]
    two = client.chat.completions.create(model=model, messages=turns, max_tokens=8)
    assert two.usage.prompt_tokens > one.usage.prompt_tokens + 3  # the earlier turns are in the prompt
    long = client.chat.completions.create(model=model, messages=image_message(url), max_tokens=6,
                                          extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 6 and long.choices[0].finish_reason == "length"
    listed = client.models.list()
    assert [m.id for m in listed.data] == [model] == ["medlava-tiny"]


def test_health_stays_fast_while_streams_run(server):
    client, model = server["client"], server["model"]
    url = data_url(PNG, "image/png")
    errors: list[Exception] = []
    done = threading.Event()

    def stream_some():
        try:
            for _ in range(2):
                text, _ = streamed(client, model=model, messages=image_message(url), max_tokens=120,
                                   extra_body={"ignore_eos": True})
                assert text
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=stream_some) for _ in range(8)]
    for t in threads:
        t.start()
    latencies = []
    deadline = time.monotonic() + 60
    time.sleep(0.2)
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        t0 = time.perf_counter()
        status, _, body = raw(server, "GET", "/health")
        latencies.append(time.perf_counter() - t0)
        assert status == 200 and json.loads(body) == {"status": "ok"}
        time.sleep(0.02)
    done.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(latencies) >= 10
    p90 = sorted(latencies)[int(0.9 * len(latencies))]
    print(f"/health p90 {p90 * 1000:.1f} ms over {len(latencies)} calls during 8 streams")
    assert p90 <= 0.1


def test_clients_that_disconnect_free_their_requests(server):
    client, model, engine = server["client"], server["model"], server["engine"]
    url = data_url(DICOM, "application/dicom")
    streams = [client.chat.completions.create(model=model, messages=image_message(url), max_tokens=1500,
                                              stream=True, extra_body={"ignore_eos": True}) for _ in range(4)]
    for s in streams:
        assert next(iter(s)).choices[0].delta.role == "assistant"
    before = sum("client gone" in line for line in server["logs"].lines)
    for s in streams:
        s.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = engine.metrics()
        if m.running == m.waiting == 0 and engine.num_unfinished() == 0:
            break
        time.sleep(0.05)
    m = engine.metrics()
    assert m.running == 0 and m.waiting == 0 and engine.num_unfinished() == 0
    assert m.kv_blocks_used == 0
    assert sum("client gone" in line for line in server["logs"].lines) - before == 4  # aborted, not finished


def _table(model: str) -> list:
    png = PNG.read_bytes()
    good_image = image_message(data_url(PNG, "image/png"))
    b64 = base64.b64encode

    def with_url(url: str) -> dict:
        return {"model": model, "messages": image_message(url)}

    return [
        ("malformed JSON", b'{"model": "x", "messages": [', KEY, 400, "not valid JSON"),
        ("wrong types", {"model": model, "messages": "hello"}, KEY, 400, "messages"),
        ("wrong part type", {"model": model, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
         KEY, 400, "messages.0.content"),
        ("bad base64", with_url("data:image/png;base64,@@@not-base64@@@"), KEY, 400, "base64"),
        ("non-image bytes", with_url("data:image/png;base64," + b64(b"just some text, no image").decode()),
         KEY, 400, "could not read the image"),
        ("truncated PNG", with_url("data:image/png;base64," + b64(png[: len(png) // 2]).decode()),
         KEY, 400, "truncated or corrupt"),
        ("corrupt DICOM", with_url("data:application/dicom;base64," + b64(DICOM.read_bytes()[:5000]).decode()),
         KEY, 400, "truncated or corrupt"),
        ("unsupported image type", with_url("data:image/gif;base64,R0lGOD"), KEY, 400, "image/gif"),
        ("oversize image", with_url("data:image/png;base64," + b64(bytes(MAX_IMAGE + 10)).decode()),
         KEY, 413, "per-image limit"),
        ("oversize body", {"model": model, "messages": good_image, "pad": "x" * (MAX_BODY + 10)},
         KEY, 413, f"{MAX_BODY}-byte limit"),
        ("remote URL", with_url("https://example.org/chest.png"), KEY, 400, "remote image URLs"),
        ("too-long prompt", {"model": model, "messages": [{"role": "user", "content": "effusion " * 3000}]},
         KEY, 400, "2048-token context"),
        ("negative max_tokens", {"model": model, "messages": good_image, "max_tokens": -5}, KEY, 400, "max_tokens"),
        ("n > 1", {"model": model, "messages": good_image, "n": 2}, KEY, 400, "n must be 1"),
        ("bad turn order", {"model": model, "messages": [{"role": "assistant", "content": "hi"}]},
         KEY, 400, "alternate"),
        ("unknown model", {"model": "gpt-4o", "messages": good_image}, KEY, 404, "does not exist"),
        ("missing API key", {"model": model, "messages": good_image}, None, 401, "API key"),
        ("wrong API key", {"model": model, "messages": good_image}, "wrong", 401, "API key"),
    ]


@pytest.mark.parametrize("case", range(len(_table("m"))), ids=[c[0] for c in _table("m")])
def test_bad_inputs_get_4xx_json_and_the_server_keeps_serving(server, case):
    name, payload, key, status, needle = _table(server["model"])[case]
    got, headers, body = post_chat(server, payload, key)
    assert got == status, (name, body[:300])
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "code"} and err["code"]
    assert needle in err["message"], (name, err)
    assert b"Traceback" not in body
    if name == "too-long prompt":
        assert any(w.isdigit() and int(w) > 2048 for w in err["message"].split())  # the prompt's length too
    ok, _, good = post_chat(server, {"model": server["model"], "max_tokens": 4,
                                     "messages": image_message(data_url(PNG, "image/png"))})
    assert ok == 200 and json.loads(good)["choices"][0]["message"]["content"]


def test_openai_sdk_sees_the_errors_and_the_queue_limit(server):
    client, model = server["client"], server["model"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    limits = server["app"].state.limits
    limits.max_queue, saved = 0, limits.max_queue
    try:
        status, headers, body = post_chat(server, {"model": model, "messages": [{"role": "user", "content": "hi"}]})
    finally:
        limits.max_queue = saved
    assert status == 429 and headers.get("retry-after") == "1"
    assert json.loads(body)["error"]["code"] == "queue_full"
    assert raw(server, "GET", "/v1/models")[0] == 401  # /v1 needs the key...
    assert raw(server, "GET", "/health")[0] == 200  # ...these do not
    assert raw(server, "GET", "/nowhere")[0] == 404


def test_metrics_are_exported(server):
    status, headers, body = raw(server, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("medlava_num_requests_running", "medlava_num_requests_waiting", "medlava_kv_cache_usage_perc",
                 "medlava_prefix_cache_hit_rate", "medlava_prompt_tokens_total", "medlava_generation_tokens_total",
                 "medlava_time_to_first_token_seconds_bucket", "medlava_e2e_request_latency_seconds_count"):
        assert name in text, name
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["medlava_generation_tokens_total"] > 0 and values["medlava_e2e_request_latency_seconds_count"] > 0
    assert values["medlava_prefix_cache_hit_rate"] > 0  # the same image was asked about again and again


def test_logs_carry_ids_but_no_patient_data_or_prompts(server):
    lines = server["logs"].lines
    assert any("chatcmpl-" in line and "image(s)" in line for line in lines)  # ids and sizes are logged
    assert any("e2e=" in line for line in lines)  # and timings
    ds = pydicom.dcmread(DICOM)
    secrets = [str(ds.PatientName), str(ds.PatientName).replace("^", " "), str(ds.PatientID), QUESTION,
               "effusion effusion", "Anything else?"]
    text = "\n".join(lines)
    for secret in secrets:
        assert secret not in text, secret


def test_serve_command_parses_its_options():
    from typer.testing import CliRunner

    from medlava.cli import app

    runner = CliRunner()
    helped = runner.invoke(app, ["serve", "--help"])
    assert helped.exit_code == 0
    for opt in ("--model", "--host", "--port", "--api-key", "--max-queue", "--max-image-bytes"):
        assert opt in helped.output
    bad = runner.invoke(app, ["serve", "--max-image-bytes", "lots"])
    assert bad.exit_code == 2 and "not a positive size" in bad.output
