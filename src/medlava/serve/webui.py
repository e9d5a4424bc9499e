"""The web UI: a Gradio app mounted at `/ui` on the API's FastAPI app (`create_app(..., ui=True)`).

Upload a study (DICOM, NIfTI, PNG, JPEG; a CT window preset), chat about it with streamed answers,
draft a report (Markdown shown; FHIR JSON and, for DICOM, a DICOM SR to download) and show the
evidence for the last answer (the heatmap overlay). It runs on the app's own paths: chat is
admitted like `/v1/chat/completions` and goes through the same `AsyncLLMEngine` with the same
OpenAI-shaped messages (so `render_prompt` renders it), reports and explanations through the app's
`analyse` (a worker thread, one at a time, on its `SharedAnalyzer`) — the event loop never waits.

Offline: Gradio's own assets only, system fonts (no web fonts), analytics off, no SSR node server.
Privacy: the page names a study only by a neutral label ("Study 2"), never by its file name, and the
upload is kept under a neutral name; logs carry request ids and timings, never questions or answers.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio builds Blocks: no telemetry

import asyncio  # noqa: E402
import hmac  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from medlava.chat.messages import question_messages  # noqa: E402
from medlava.chat.templates import get_template  # noqa: E402
from medlava.engine.sampling import SamplingParams  # noqa: E402
from medlava.errors import MedlavaError  # noqa: E402
from medlava.imaging import WINDOW_PRESETS, Study, load_study  # noqa: E402
from medlava.serve.api import DEFAULT_MAX_TOKENS, APIError  # noqa: E402

logger = logging.getLogger("medlava.serve.webui")

PATH = "/ui"
FILE_WINDOW = "the file's own"
GROUNDINGS = ("occlusion", "relevance", "none")  # /v1/reports' choices; occlusion is its default
EVIDENCE_METHODS = ("relevance", "occlusion")  # /v1/explain's; relevance is its default
REPORT_MAX_TOKENS = 512  # /v1/reports' default
# System fonts only: Gradio's default theme would fetch Google Fonts.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = "#study-preview img { object-fit: contain; }"
IMAGE_BUTTONS = ["download", "fullscreen"]  # not "share": it posts to Hugging Face


@dataclass
class Session:
    """One browser tab's study and conversation (gradio keeps it per session)."""

    number: int  # "Study N": the page's only name for the study
    folder: Path  # holds the upload under a neutral name, and the report files
    path: Path
    study: Study
    history: list[tuple[str, str]] = field(default_factory=list)  # (question, answer) turns
    messages: list[dict] = field(default_factory=list)  # what the chat shows, the "new study" line first
    epoch: int = 0  # bumped when the conversation restarts, so a stream still running stops showing
    closed: bool = False  # replaced by the next upload, or the tab is gone

    def shows(self, study: Study) -> bool:
        """Whether the page still shows `study` (an analysis that outlived it is discarded)."""
        return not self.closed and self.study is study

    @property
    def label(self) -> str:
        return f"Study {self.number}"

    @property
    def is_dicom(self) -> bool:
        return self.study.metadata.get("SourceFormat", "").startswith("DICOM")


def _drop(session: Session | None) -> None:
    if session is not None:
        session.epoch, session.closed = session.epoch + 1, True
        shutil.rmtree(session.folder, ignore_errors=True)


def _neutral_name(name: str) -> str:
    """'study' plus the upload's suffix (the loader reads the kind from it; DICOM may have none)."""
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return "study.nii.gz"
    suffix = Path(lower).suffix
    return "study" + (suffix if suffix[1:].isalnum() and len(suffix) <= 6 else "")


def _describe(session: Session) -> str:
    """A line about the study from its safe metadata (format, modality, size, window)."""
    s, meta = session.study, session.study.metadata
    h, w = s.images[0].shape[:2]
    parts = [meta.get("SourceFormat", "image"), s.modality, f"{w}×{h}"]
    if len(s.images) > 1:
        parts.append(f"{len(s.images)} slices (chat reads the middle one; reports and evidence the whole volume)")
    if meta.get("Window"):
        parts.append(f"window {meta['Window']}")
    return f"**{session.label}**: " + ", ".join(parts)


def _refusal(e: Exception) -> gr.Error:
    """An APIError (queue full, bad prompt) or a user-fixable error as the page's one-line error."""
    return gr.Error(getattr(e, "message", None) or str(e) or type(e).__name__)


class WebUI:
    """The page's handlers, on `app`'s engine (chat) and `app.state.analyse` (reports, evidence)."""

    def __init__(self, app: FastAPI, root: Path):
        self.root = root  # every session's folder is made in it; mount_ui deletes it when the app stops
        self.engine, self.limits, self.analyzer = app.state.engine, app.state.limits, app.state.analyzer
        self.admit, self.analyse = app.state.admit, app.state.analyse
        self.template_stop = list(get_template(self.engine.conv_mode).stop)

    async def upload(self, file: str | None, window: str, previous: Session | None):
        """A new study: a new session, a cleared chat that says so, previews and outputs reset."""
        if not file:
            raise gr.Error("no file was received: choose a DICOM, NIfTI, PNG or JPEG study")
        folder = Path(tempfile.mkdtemp(prefix="study-", dir=self.root))
        path = folder / _neutral_name(Path(file).name)
        try:
            await asyncio.to_thread(shutil.move, file, path)  # the original (maybe identifying) name goes
            study = await self._load(path, window)
        except (MedlavaError, ValueError, OSError) as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise _refusal(e) from None
        _drop(previous)
        session = Session((previous.number + 1) if previous else 1, folder, path, study)
        session.messages = [{"role": "assistant", "content": f"*New study: {session.label} — new conversation*"}]
        logger.info("webui: study %d loaded (%s, %s)", session.number, study.metadata.get("SourceFormat"),
                    study.modality)
        return session, session.messages, study.to_pil(), _describe(session), "", None, "", None, ""

    async def rewindow(self, window: str, session: Session | None):
        """Another window shows other pixels: read the study again and start a new conversation."""
        if session is None:
            return gr.update(), gr.update(), gr.update()
        try:
            study = await self._load(session.path, window)
        except (MedlavaError, ValueError, OSError) as e:
            raise _refusal(e) from None
        session.study, session.history, session.epoch = study, [], session.epoch + 1
        session.messages = [{"role": "assistant",
                             "content": f"*{session.label}, window {window} — new conversation*"}]
        return session.messages, study.to_pil(), _describe(session)

    def restart(self, session: Session | None):
        """The chat's clear button: the same study, a new conversation (the history goes too)."""
        if session is None:
            return []
        session.history, session.epoch = [], session.epoch + 1
        session.messages = [{"role": "assistant", "content": f"*{session.label} — new conversation*"}]
        return session.messages

    async def _load(self, path: Path, window: str) -> Study:
        preset = None if window == FILE_WINDOW else window
        # The whole volume (reports and evidence read its best slice), within the API's pixel limit.
        return await asyncio.to_thread(load_study, path, window=preset, key_slices=None,
                                       max_pixels=self.limits.max_pixels)

    async def chat(self, question: str, session: Session | None):
        """Stream the answer to `question`, this conversation's earlier turns included; yields
        (the chat's messages, the cleared question box)."""
        if session is None:
            raise gr.Error("upload a study first")
        question = question.strip()
        if not question:
            yield session.messages, ""
            return
        # The request /v1/chat/completions makes: OpenAI-shaped messages with the image first in the
        # first user turn (rendered by render_prompt in the engine), its default sampling (greedy,
        # 256 tokens, the template's stop strings), admitted against the same max_queue.
        messages = question_messages(question, session.history)
        messages[0]["content"][0] = {"type": "image", "image": session.study}
        params = SamplingParams(max_tokens=DEFAULT_MAX_TOKENS, stop=self.template_stop)
        rid, t0 = f"webui-{uuid.uuid4().hex}", time.perf_counter()
        try:
            self.admit()
        except APIError as e:
            raise _refusal(e) from None
        epoch = session.epoch
        shown = [*session.messages, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield shown, ""
        gen = self.engine.generate(rid, params=params, messages=messages)
        text, out = "", None
        try:
            async for out in gen:
                if session.epoch != epoch:  # a new study or window meanwhile: stop (aclose aborts the request)
                    logger.info("%s: conversation restarted; request aborted", rid)
                    return
                text += out.delta_text
                shown[-1] = {"role": "assistant", "content": text.strip()}
                yield shown, ""
        except (ValueError, MedlavaError) as e:  # the prompt's length, the image
            raise _refusal(e) from None
        finally:
            await gen.aclose()
        session.history.append((question, text.strip()))
        session.messages = shown
        logger.info("%s: turn %d, %d completion tokens, finish=%s, %.3fs", rid, len(session.history),
                    len(out.token_ids) if out else 0, out.finish_reason if out else "-", time.perf_counter() - t0)

    async def report(self, session: Session | None, grounding: str):
        """The draft report as Markdown, its FHIR Bundle and (DICOM only) its DICOM SR as files,
        and a note (why there is no SR)."""
        if session is None:
            raise gr.Error("upload a study first")
        study = session.study

        def work():
            from medlava.analysis.fhir import report_fhir_json

            try:
                rep = self.analyzer.report(study, SamplingParams(max_tokens=REPORT_MAX_TOKENS),
                                           grounding=None if grounding == "none" else grounding)
            except (ValueError, MedlavaError) as e:
                raise _refusal(e) from None
            if not session.shows(study):  # a new study or window meanwhile (its folder may be gone)
                return None
            fhir = session.folder / "report_fhir.json"
            fhir.write_text(report_fhir_json(rep) + "\n")
            files, note = [str(fhir)], ""
            if session.is_dicom:
                from medlava.analysis.sr import report_sr

                try:
                    sr = session.folder / "report_sr.dcm"
                    report_sr(rep, session.path).save_as(sr, enforce_file_format=True)
                    files.append(str(sr))
                except (ValueError, MedlavaError) as e:
                    note = f"No DICOM SR: {e}"
            else:
                fmt = session.study.metadata.get("SourceFormat", "not DICOM")
                note = (f"No DICOM SR: an SR is filed in its source DICOM study, and {session.label} is {fmt}. "
                        "Download the FHIR JSON instead.")
            return rep.to_markdown(), files, note

        try:
            out = await self.analyse(f"webui-report-{uuid.uuid4().hex}", work)
        except APIError as e:
            raise _refusal(e) from None
        return out if out and session.shows(study) else (gr.update(), gr.update(), gr.update())

    async def evidence(self, session: Session | None, method: str):
        """Where in the image the last answer came from (overlay, note); a 'no'/'normal' answer
        has nothing to show."""
        if session is None:
            raise gr.Error("upload a study first")
        if not session.history:
            raise gr.Error("ask a question first: the evidence is shown for the last answer")
        question, answer = session.history[-1]
        study = session.study

        def work():
            from medlava.analysis.grounding import NothingToLocalize
            from medlava.analysis.overlay import overlay_image

            try:
                ex = self.analyzer.explain(study, question, method)
            except NothingToLocalize:
                return None, (f"Nothing to localise: the last answer, {answer!r}, reports no finding, "
                              "so there is nowhere in the image to point at.")
            except (ValueError, MedlavaError) as e:
                raise _refusal(e) from None
            where = f" on slice {ex.slice}" if ex.slice is not None else ""
            return overlay_image(ex.image, ex.heat, ex.peak, ex.box), (
                f"Evidence ({ex.method}) for {ex.answer!r}{where}: the peak is the white cross, the box green.")

        try:
            out = await self.analyse(f"webui-explain-{uuid.uuid4().hex}", work)
        except APIError as e:
            raise _refusal(e) from None
        return out if session.shows(study) else (gr.update(), gr.update())

    def blocks(self) -> gr.Blocks:
        with gr.Blocks(title="medlava", analytics_enabled=False, delete_cache=(1800, 3600)) as ui:
            gr.Markdown("## medlava\nAsk about a study, draft a report, see the evidence. "
                        "An AI draft for a clinician to review; not a diagnosis.")
            session = gr.State(None, delete_callback=_drop)
            with gr.Row():
                with gr.Column(scale=2):
                    upload = gr.UploadButton("Upload study (DICOM, NIfTI, PNG, JPEG)", elem_id="upload",
                                             variant="primary")
                    window = gr.Dropdown([FILE_WINDOW, *WINDOW_PRESETS], value=FILE_WINDOW, label="CT window",
                                         info="A preset in Hounsfield units, as medlava ask --window",
                                         elem_id="window")
                    preview = gr.Image(label="Study", type="pil", interactive=False, height=320,
                                       buttons=IMAGE_BUTTONS, elem_id="study-preview")
                    info = gr.Markdown(elem_id="study-info")
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Conversation", height=380, elem_id="chat", buttons=["copy"],
                                         feedback_options=None)
                    with gr.Row():
                        question = gr.Textbox(placeholder="Ask about the study…", show_label=False, scale=5,
                                              elem_id="question")
                        ask = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
                    with gr.Row():
                        report = gr.Button("Draft report", elem_id="draft-report")
                        evidence = gr.Button("Show evidence", elem_id="show-evidence")
                    with gr.Accordion("Options", open=False):
                        grounding = gr.Dropdown(list(GROUNDINGS), value=GROUNDINGS[0], elem_id="grounding",
                                                label="Report finding boxes")
                        method = gr.Dropdown(list(EVIDENCE_METHODS), value=EVIDENCE_METHODS[0],
                                             label="Evidence method", elem_id="evidence-method")
            with gr.Row():
                with gr.Column(scale=3):
                    report_md = gr.Markdown(elem_id="report-text")
                    report_note = gr.Markdown(elem_id="report-note")
                    downloads = gr.File(label="Downloads", file_count="multiple", interactive=False,
                                        elem_id="downloads")
                with gr.Column(scale=2):
                    overlay = gr.Image(label="Evidence", type="pil", interactive=False, height=320,
                                       buttons=IMAGE_BUTTONS, elem_id="evidence-image")
                    evidence_note = gr.Markdown(elem_id="evidence-note")

            # The engine batches conversations: no per-event limit beyond the app's max_queue.
            free = dict(concurrency_limit=None)
            upload.upload(self.upload, [upload, window, session], [session, chatbot, preview, info, report_md,
                          downloads, report_note, overlay, evidence_note], **free)
            window.input(self.rewindow, [window, session], [chatbot, preview, info], **free)
            chatbot.clear(self.restart, [session], [chatbot])
            for trigger in (ask.click, question.submit):  # the session changes in place (gradio keeps the object)
                trigger(self.chat, [question, session], [chatbot, question], **free)
            report.click(self.report, [session, grounding], [report_md, downloads, report_note], **free)
            evidence.click(self.evidence, [session, method], [overlay, evidence_note], **free)
        return ui


def mount_ui(app: FastAPI, *, api_keys: list[bytes] = (), path: str = PATH) -> FastAPI:
    """Mount the UI at `path`; with API keys, the page asks for one (as the password, any user name)."""

    def key_ok(_user: str, password: str) -> bool:
        given, ok = password.encode(), False
        for key in api_keys:  # every key compared, in constant time
            ok |= hmac.compare_digest(given, key)
        return ok

    root = Path(tempfile.mkdtemp(prefix="medlava-ui-"))
    gr.mount_gradio_app(
        app, WebUI(app, root).blocks(), path=path, theme=THEME, css=CSS, ssr_mode=False, footer_links=["settings"],
        max_file_size=app.state.limits.max_image_bytes, show_error=False, auth=key_ok if api_keys else None,
        auth_message="This medlava server needs an API key: enter it as the password." if api_keys else None,
    )
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI):
        try:
            async with inner(a) as state:
                yield state
        finally:  # uploads and report files do not outlive the server
            shutil.rmtree(root, ignore_errors=True)

    app.router.lifespan_context = lifespan
    return app
