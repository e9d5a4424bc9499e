"""`medlava chat`: a multi-turn conversation about one study in the terminal, streamed.

Runs on a local model (`LocalChat`, the `Analyzer`) or on a running medlava server (`RemoteChat`,
the official `openai` SDK against its `/v1/chat/completions`). Both keep the whole history, so a
follow-up question sees the earlier turns (LLaVA-Med's CLI keeps them too, but loses them when it
reloads the image). Questions come from the keyboard, or line by line from stdin when it is not a
terminal, so a session scripts.
"""

from __future__ import annotations

import base64
import io
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from medlava.analysis.volumes import is_volume, position_of, slice_study
from medlava.engine.sampling import SamplingParams
from medlava.imaging import Study

EXIT_WORDS = {"exit", "quit", "/exit", "/quit"}


class LocalChat:
    """A conversation on an `Analyzer`: each turn streams through its engine."""

    def __init__(self, analyzer, study: Study, params: SamplingParams):
        self.analyzer, self.study, self.params = analyzer, study, params
        self.history: list[tuple[str, str]] = []

    def send(self, question: str) -> Iterator[str]:
        if not self.history and is_volume(self.study):
            # The first answer on a volume is `ask`'s: read on the slice the model is surest about,
            # which the rest of the conversation then looks at.
            answer = self.analyzer.ask(self.study, question, self.params)
            self.study = slice_study(self.study, position_of(self.study, answer.slice))
            self.history.append((question, answer.answer))
            yield answer.answer
            return
        pieces = []
        for piece in self.analyzer.stream(self.study, question, self.params, history=self.history):
            pieces.append(piece)
            yield piece
        self.history.append((question, "".join(pieces)))


class RemoteChat:
    """A conversation with a medlava (or any OpenAI-compatible) server; the image goes as a data URL."""

    def __init__(self, url: str, image: str, study: Study, params: SamplingParams, *,
                 window: str | None = None, api_key: str | None = None, model: str | None = None):
        from openai import OpenAI

        base = url.rstrip("/")
        self.client = OpenAI(base_url=base if base.endswith("/v1") else base + "/v1", api_key=api_key or "none",
                             max_retries=0)
        self.model = model or self.client.models.list().data[0].id
        self.params = params
        self.messages: list[dict] = []
        self.image_url = data_url(image, study, window)

    def send(self, question: str) -> Iterator[str]:
        content: str | list = question
        if not self.messages:
            content = [{"type": "image_url", "image_url": {"url": self.image_url}}, {"type": "text", "text": question}]
        messages = [*self.messages, {"role": "user", "content": content}]
        p = self.params
        stream = self.client.chat.completions.create(
            model=self.model, messages=messages, stream=True, temperature=p.temperature, top_p=p.top_p,
            max_tokens=p.max_tokens, seed=p.seed,
        )
        pieces = []
        for chunk in stream:
            if chunk.choices and (piece := chunk.choices[0].delta.content):
                pieces.append(piece)
                yield piece
        self.messages = [*messages, {"role": "assistant", "content": "".join(pieces)}]


def data_url(image: str, study: Study, window: str | None = None) -> str:
    """The study as the server reads it: a DICOM file or PNG/JPEG as it is; anything else (a series,
    NIfTI, a windowed CT) as the PNG of the key image medlava would show the model."""
    path = Path(image)
    suffix = path.suffix.lower()
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom"}.get(suffix)
    if mime is None or window is not None or (mime == "application/dicom" and is_volume(study)):
        buf = io.BytesIO()
        study.key_image().save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    else:
        data = path.read_bytes()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def questions(stdin: TextIO, out: TextIO) -> Iterator[str]:
    """Questions from the keyboard (with a prompt) or, when stdin is not a terminal, line by line."""
    tty = stdin.isatty()
    while True:
        if tty:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:  # end of input
            return
        line = line.strip()
        if line.lower() in EXIT_WORDS:
            return
        if line:
            yield line


def run(chat, lines: Iterable[str], out: TextIO | None = None) -> int:
    """Answer each line, streaming the answer to `out` (default: stdout); returns the number of turns."""
    out, turns = out or sys.stdout, 0
    for question in lines:
        for piece in chat.send(question):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        turns += 1
    return turns

