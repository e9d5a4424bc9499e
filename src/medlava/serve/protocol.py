"""Pydantic models of the OpenAI chat-completions wire format (the subset medlava serves), and of
LLaVA's controller/worker protocol (`serve/controller.py`, `serve/worker.py`)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are ignored, as vLLM does


class TextPart(_In):
    type: Literal["text"]
    text: str


class ImageURL(_In):
    url: str
    detail: str | None = None


class ImagePart(_In):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_In):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_In):
    include_usage: bool = False


class ChatCompletionRequest(_In):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extra parameter: generate max_tokens whatever the model says


class ReportRequest(_In):
    """`POST /v1/reports`: a draft report of one study (`image` a data: URL)."""

    model: str
    image: str
    format: Literal["json", "fhir"] = "json"  # "sr" (DICOM SR) is not offered over HTTP yet
    grounding: Literal["occlusion", "relevance", "none"] = "occlusion"
    max_tokens: int | None = Field(None, ge=1)


class ExplainRequest(_In):
    """`POST /v1/explain`: answer `question` and show where in the image the answer came from."""

    model: str
    image: str
    question: str = Field(min_length=1)
    method: Literal["relevance", "occlusion"] = "relevance"


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache (OpenAI's and vLLM's field)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "medlava"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- LLaVA's controller/worker protocol (llava/serve/controller.py, model_worker.py) ----------------

SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"  # llava/utils.py
WORKER_HEART_BEAT_INTERVAL = 15.0  # seconds between a worker's heartbeats (llava/constants.py)
CONTROLLER_HEART_BEAT_EXPIRATION = 30.0  # seconds without one before the controller drops the worker
MAX_NEW_TOKENS = 1024  # LLaVA's worker caps max_new_tokens here

# error_code in a stream frame: 0 ok; 1 the worker refused or failed the request (LLaVA: any exception
# in generate_stream); 2 no worker serves the model; 3 the worker could not be reached or died mid-stream.
OK, WORKER_ERROR, NO_WORKER, WORKER_UNREACHABLE = 0, 1, 2, 3


def frame(text: str, error_code: int = OK) -> bytes:
    """One stream frame: JSON then NUL, what LLaVA's clients split on (`iter_lines(delimiter=b"\\0")`)."""
    return json.dumps({"text": text, "error_code": error_code}).encode() + b"\0"


class WorkerStatus(_In):
    model_names: list[str]
    speed: float = Field(1.0, ge=0)
    queue_length: int = Field(0, ge=0)


class RegisterWorker(_In):
    worker_name: str = Field(pattern=r"^https?://")  # the worker's base URL, e.g. http://127.0.0.1:21002
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None  # None: the controller asks the worker


class HeartBeat(_In):
    worker_name: str
    queue_length: int = Field(0, ge=0)


class WorkerGenerateRequest(_In):
    """`POST /worker_generate_stream`: an already rendered prompt with one `<image>` per image."""

    model: str | None = None
    prompt: str = Field(min_length=1)
    images: list[str] | None = None  # base64 image bytes (LLaVA's Gradio sends PNG)
    temperature: float = Field(1.0, ge=0, le=2)  # LLaVA's default; <= 0.001 is greedy, as LLaVA's worker
    top_p: float = Field(1.0, ge=0, le=1)  # 0 keeps only the top token: greedy
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    stop: str | list[str] | None = None  # added to the template's own stop strings
    ignore_eos: bool = False  # medlava's (and vLLM's) extra: generate max_new_tokens whatever the model says
