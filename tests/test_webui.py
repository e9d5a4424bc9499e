"""The web UI (`medlava serve --ui`): its handlers, and the page in a real headless Chromium against a
real uvicorn on loopback, with the demo model. Neither the page nor the server may reach any host
but this one: the browser's requests are routed through the test, the server's sockets are patched.

The browser test needs Playwright (the `test` extra) and Debian's chromium (`scripts/install_browser.sh`,
which `make test` runs); without them it skips, saying why, except under CI=true, where it fails.
MEDLAVA_WEBUI_SCREENSHOT=PATH writes its screenshot there (scripts/webui_screenshot.py: docs/webui.png).
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pydicom
import pytest
from typer.testing import CliRunner

from medlava import Analyzer
from medlava.cli import app as cli
from medlava.engine.async_engine import AsyncLLMEngine
from medlava.engine.llm_engine import LLMEngine
from medlava.model.demo import DEMO_MODEL
from medlava.serve.api import create_app
from tests.test_serve import DICOM, PNG, captured_logs, data_url, start_server

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="the demo model is missing")

CHROMIUM = os.environ.get("MEDLAVA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = os.environ.get("MEDLAVA_WEBUI_SCREENSHOT")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# Questions whose demo-model answers are long (streamed in many pieces), a finding, and a "no".
DESCRIBE, EFFUSION = "Describe this image.", "Is there a pleural effusion?"
# A file name of the kind a PACS export can have: it must never reach the page or the logs.
IDENTIFYING_NAME = "DOE_JANE_MRN0012345.dcm"


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def server():
    """The app with the UI on a real uvicorn; the process may reach loopback only (any other
    connection or name lookup is refused and recorded in "outbound")."""
    outbound: list[str] = []
    connect, lookup = socket.socket.connect, socket.getaddrinfo

    def local_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            outbound.append(str(address[0]))
            raise OSError("this test allows loopback connections only")
        return connect(sock, address)

    def local_lookup(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in (None, "localhost", "127.0.0.1", "::1"):
            outbound.append(str(name))
            raise OSError("this test allows loopback names only")
        return lookup(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", local_connect)
        mp.setattr(socket, "getaddrinfo", local_lookup)
        yield from _serve(outbound)
    assert not outbound, f"the server tried to reach {sorted(set(outbound))}"


def _serve(outbound: list[str]):
    analyzer = Analyzer()
    engine = AsyncLLMEngine(LLMEngine(analyzer.lm))
    app = create_app(engine, ui=True)
    with captured_logs() as capture, start_server(app) as port:
        yield {"analyzer": analyzer, "app": app, "port": port, "logs": capture, "outbound": outbound}


class EngineSpy:
    """The serving engine, recording what each `generate` call was given."""

    def __init__(self, engine: AsyncLLMEngine):
        self.engine, self.calls = engine, []

    def generate(self, request_id, **kwargs):
        self.calls.append(kwargs)
        return self.engine.generate(request_id, **kwargs)


def test_chat_streams_in_pieces_and_keeps_the_conversation(server, tmp_path):
    """The chat handler's updates grow the answer piece by piece to what Analyzer.ask says, and the
    next turn is the conversation /v1/chat/completions would send, history included."""
    from medlava.chat.messages import render_prompt
    from medlava.serve.webui import FILE_WINDOW, WebUI

    ui = WebUI(server["app"], tmp_path)
    ui.engine = spy = EngineSpy(ui.engine)
    upload = tmp_path / "upload" / IDENTIFYING_NAME
    upload.parent.mkdir()
    shutil.copy(DICOM, upload)
    want = server["analyzer"].ask(DICOM, DESCRIBE).answer

    async def run():
        session = (await ui.upload(str(upload), FILE_WINDOW, None))[0]
        seen = [messages[-1]["content"] async for messages, _ in ui.chat(DESCRIBE, session)]
        async for _ in ui.chat(EFFUSION, session):
            pass
        return session, seen

    session, seen = asyncio.run(run())
    pieces = [s for s in dict.fromkeys(seen) if s]
    assert pieces[-1] == want
    assert len(pieces) > 5 and all(want.startswith(p) for p in pieces)  # streamed, not one update
    assert [q for q, _ in session.history] == [DESCRIBE, EFFUSION] and session.history[0][1] == want
    sent = spy.calls[-1]["messages"]
    assert sent[0]["content"][0]["image"] is session.study
    api = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(DICOM, "application/dicom")}},
                                        {"type": "text", "text": DESCRIBE}]},
           {"role": "assistant", "content": want}, {"role": "user", "content": EFFUSION}]
    conv = server["analyzer"].lm.conv_mode
    assert render_prompt(sent, conv) == render_prompt(api, conv)
    assert not upload.exists() and session.path.name == "study.dcm"  # kept under a neutral name only
    assert session.messages[0]["content"] == "*New study: Study 1 — new conversation*"


def test_window_preset_and_clear_start_new_conversations_and_bad_files_get_one_line(server, tmp_path):
    import gradio as gr

    from medlava.serve.webui import FILE_WINDOW, WebUI

    ui = WebUI(server["app"], tmp_path)
    ct, bad = tmp_path / "ct.dcm", tmp_path / IDENTIFYING_NAME
    shutil.copy(Path(DICOM).parent / "head_ct.dcm", ct)
    bad.write_text("not an image")

    async def run():
        session = (await ui.upload(str(ct), FILE_WINDOW, None))[0]
        session.history.append(("q", "a"))
        messages, _, info = await ui.rewindow("brain", session)
        return session, messages, info

    session, messages, info = asyncio.run(run())
    assert session.study.metadata["Window"].startswith("brain") and "window brain" in info
    assert session.history == [] and messages[0]["content"] == "*Study 1, window brain — new conversation*"
    session.history.append(("q", "a"))
    assert ui.restart(session)[0]["content"] == "*Study 1 — new conversation*" and session.history == []
    with pytest.raises(gr.Error) as refused:
        asyncio.run(ui.upload(str(bad), FILE_WINDOW, session))
    assert "study.dcm" in str(refused.value) and "DOE" not in str(refused.value)
    assert session.path.is_file()  # a refused upload leaves the current study as it was


def test_ui_asks_for_an_api_key_when_the_server_has_one(server):
    from fastapi.testclient import TestClient

    engine = server["app"].state.engine
    app = create_app(engine, api_keys=["k-123"], ui=True, shutdown_engine=False, analyzer=server["analyzer"])
    with TestClient(app) as client:
        assert client.get("/ui/config").status_code == 401
        assert client.post("/ui/login", data={"username": "x", "password": "wrong"}).status_code == 400
        assert client.post("/ui/login", data={"username": "x", "password": "k-123"}).status_code == 200
        assert client.get("/ui/config").status_code == 200


def _browser_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no chromium at {CHROMIUM} (scripts/install_browser.sh installs Debian's, as root with apt-get)"
    return None


@pytest.fixture
def browser():
    reason = _browser_missing()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; under CI=true the web UI browser test must run")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def ask_in_browser(browser, base: str, image: Path, question: str) -> list[str]:
    """Upload `image` on the web UI at `base` and ask `question` in a fresh page; the conversation's
    messages once the answer has arrived (the new-study line, then the answer)."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{base}/ui/")
    page.wait_for_selector("#upload", timeout=60_000)
    page.locator("input[type=file]").set_input_files(str(image))
    page.wait_for_selector("#study-preview img", timeout=60_000)
    page.fill("#question textarea", question)
    page.press("#question textarea", "Enter")
    deadline, bots = time.monotonic() + 60, []
    while time.monotonic() < deadline and not (len(bots) == 2 and bots[-1].strip()):
        page.wait_for_timeout(200)
        bots = page.locator("#chat [data-testid=bot]").all_inner_texts()
    page.close()
    assert not errors, errors
    return bots


WATCH_CHAT = """() => {
  window.__answers = [];
  const chat = document.querySelector('#chat');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid=bot]');
    const text = bots.length ? bots[bots.length - 1].innerText : '';
    if (window.__answers[window.__answers.length - 1] !== text) window.__answers.push(text);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def test_webui_in_a_real_browser(browser, server, tmp_path):  # no server built when it skips
    port = server["port"]
    base = f"http://127.0.0.1:{port}"
    described = CliRunner().invoke(cli, ["ask", str(DICOM), DESCRIBE])  # what `medlava ask` prints
    assert described.exit_code == 0, described.output
    upload = tmp_path / IDENTIFYING_NAME
    shutil.copy(DICOM, upload)

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    requests, outside = [], []

    def route(r):  # every request the page makes; none may leave this machine
        requests.append(r.request.url)
        host = urlsplit(r.request.url).hostname or ""
        if r.request.url.startswith(("data:", "blob:")) or host in LOCAL_HOSTS:
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    context.on("websocket", lambda ws: outside.append(ws.url) if urlsplit(ws.url).hostname not in LOCAL_HOSTS else None)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    def wait_for(check, what: str, timeout: float = 30.0):
        end = time.monotonic() + timeout
        while not check():
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}")
            page.wait_for_timeout(100)

    def bot_texts() -> list[str]:
        return [words(t) for t in page.locator("#chat [data-testid=bot]").all_inner_texts()]

    def ask(question: str, want: str, enter: bool = True) -> None:
        page.fill("#question textarea", question)
        if enter:
            page.press("#question textarea", "Enter")
        else:
            page.click("#ask")
        wait_for(lambda: bot_texts() and bot_texts()[-1] == words(want), f"the answer to {question!r}")

    page.goto(f"{base}/ui/")
    page.wait_for_selector("#upload", timeout=30_000)

    # A DICOM study, uploaded under an identifying file name.
    page.locator("input[type=file]").set_input_files(str(upload))
    wait_for(lambda: bot_texts() == ["New study: Study 1 — new conversation"], "the new-study line")
    page.wait_for_selector("#study-preview img")
    assert "DX" in page.inner_text("#study-info")

    # Chat: the answer streams in and equals `medlava ask`'s greedy answer; the second turn equals what
    # /v1/chat/completions answers for the same conversation (one renderer, one engine).
    page.evaluate(WATCH_CHAT)
    ask(DESCRIBE, described.output.strip())
    seen = [words(t) for t in page.evaluate("window.__answers") if t.strip() and not t.startswith("New study")]
    assert len(set(seen)) > 5 and all(words(described.output).startswith(s) for s in seen)  # it grew
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    history = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(DICOM, "application/dicom")}},
                                            {"type": "text", "text": DESCRIBE}]},
               {"role": "assistant", "content": described.output.strip()},
               {"role": "user", "content": EFFUSION}]
    second = client.chat.completions.create(model=server["app"].state.model_name, messages=history)
    ask(EFFUSION, second.choices[0].message.content, enter=False)
    assert len(bot_texts()) == 3  # the new-study line and two answers: the history is kept

    # Evidence for the last answer: the overlay image.
    page.click("#show-evidence")
    page.wait_for_selector("#evidence-image img", timeout=30_000)
    wait_for(lambda: "Evidence (relevance)" in page.inner_text("#evidence-note"), "the evidence note")

    # The draft report, with its FHIR Bundle and DICOM SR to download.
    page.click("#draft-report")
    wait_for(lambda: "Impression" in page.inner_text("#report-text"), "the report", timeout=60)
    assert "Radiology report (AI draft)" in page.inner_text("#report-text")
    links = {Path(urlsplit(a).path).name: a for a in
             page.locator("#downloads a[href]").evaluate_all("els => els.map(e => e.href)")}
    assert set(links) == {"report_fhir.json", "report_sr.dcm"}, links
    bundle = json.loads(page.request.get(links["report_fhir.json"]).body())
    assert bundle["resourceType"] == "Bundle"
    sr = pydicom.dcmread(io.BytesIO(page.request.get(links["report_sr.dcm"]).body()))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == pydicom.dcmread(DICOM).StudyInstanceUID
    page.screenshot(path=SCREENSHOT or str(tmp_path / "webui.png"), full_page=True)

    # A second study: a new conversation, visibly; a "no" has no evidence; a PNG has no SR.
    page.locator("input[type=file]").set_input_files(str(PNG))
    wait_for(lambda: bot_texts() == ["New study: Study 2 — new conversation"], "the second new-study line")
    assert page.inner_text("#report-text").strip() == ""
    no = server["analyzer"].ask(PNG, EFFUSION).answer
    assert no == "no"
    ask(EFFUSION, no)
    page.click("#show-evidence")
    wait_for(lambda: "Nothing to localise" in page.inner_text("#evidence-note"), "the nothing-to-localise note")
    page.click("#draft-report")
    wait_for(lambda: "No DICOM SR" in page.inner_text("#report-note"), "the no-SR note", timeout=60)
    assert "Impression" in page.inner_text("#report-text")

    html = page.content()
    context.close()
    assert not errors, errors
    assert requests and not outside, outside  # offline: no CDN, no web fonts, no analytics
    assert not server["outbound"], server["outbound"]  # nor from the server (gradio's version check)
    logs = "\n".join(server["logs"].lines)
    for text in (html, logs):
        assert "DOE_JANE" not in text and "MRN0012345" not in text
