"""Turn an image (any supported form) and a question into model inputs, for code that runs the model directly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medlava.chat.image_processing import preprocess
from medlava.chat.images import ImageInput, open_image
from medlava.chat.templates import build_prompt
from medlava.chat.tokenize import tokenize_prompt
from medlava.imaging import Study
from medlava.model.loader import LoadedModel


@dataclass
class PreparedInput:
    prompt: str
    input_ids: list[int]
    pixels: torch.Tensor  # [1, 3, H, W]
    study: Study | None


def prepare(lm: LoadedModel, image: ImageInput, question: str, window: str | None = None) -> PreparedInput:
    pil, study = open_image(image, window)
    prompt = build_prompt(lm.conv_mode, question.strip())
    ids = tokenize_prompt(lm.tokenizer, prompt, lm.config.image_token_id, lm.config.image_tokens)
    return PreparedInput(prompt, ids, preprocess(pil, lm.image_processing).unsqueeze(0), study)
