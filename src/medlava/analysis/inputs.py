"""Turn an image (any supported form) and a question into model inputs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image

from medlava.chat.image_processing import preprocess
from medlava.chat.templates import build_prompt
from medlava.chat.tokenize import tokenize_prompt
from medlava.imaging import Study, load_study
from medlava.model.loader import LoadedModel

ImageInput = str | os.PathLike | bytes | Image.Image | Study


@dataclass
class PreparedInput:
    prompt: str
    input_ids: list[int]
    pixels: torch.Tensor  # [1, 3, H, W]
    study: Study | None


def to_pil(image: ImageInput, window: str | None = None) -> tuple[Image.Image, Study | None]:
    """The key image to show the model, and the study it came from (None for a bare PIL image)."""
    if isinstance(image, Image.Image):
        return image, None
    study = image if isinstance(image, Study) else load_study(image, window=window)
    return study.key_image(), study


def prepare(lm: LoadedModel, image: ImageInput, question: str, window: str | None = None) -> PreparedInput:
    if not question.strip():
        raise ValueError("the question is empty")
    pil, study = to_pil(image, window)
    prompt = build_prompt(lm.conv_mode, question.strip())
    ids = tokenize_prompt(lm.tokenizer, prompt, lm.config.image_token_id, lm.config.image_tokens)
    return PreparedInput(prompt, ids, preprocess(pil, lm.image_processing).unsqueeze(0), study)
