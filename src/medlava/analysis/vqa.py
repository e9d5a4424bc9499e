"""Visual question answering on a study: the `Analyzer` clinicians' tools call."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from medlava.analysis.inputs import ImageInput, prepare
from medlava.chat.templates import get_template
from medlava.engine.reference import generate_reference
from medlava.engine.sampling import SamplingParams
from medlava.model.demo import resolve_model
from medlava.model.loader import LoadedModel, load_model


@dataclass
class Answer:
    prompt: str  # the exact text given to the tokenizer
    answer: str
    token_ids: list[int]  # generated ids
    finish_reason: str
    model: str
    modality: str | None

    def to_dict(self) -> dict:
        return asdict(self)


class Analyzer:
    """Loads a model once and answers questions about studies."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        vision_tower: str | Path | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        conv_mode: str | None = None,
    ):
        path = resolve_model(model)  # None: the shipped demo model
        self.lm: LoadedModel = load_model(path, vision_tower=vision_tower, dtype=dtype, device=device)
        if conv_mode is not None:
            get_template(conv_mode)  # fail early on a typo
            self.lm.conv_mode = conv_mode

    def ask(
        self,
        image: ImageInput,
        question: str,
        params: SamplingParams | None = None,
        *,
        window: str | None = None,
    ) -> Answer:
        params = params or SamplingParams()
        template = get_template(self.lm.conv_mode)
        params = replace(params, stop=list(dict.fromkeys([*params.stop, *template.stop])))
        inp = prepare(self.lm, image, question, window)
        with torch.inference_mode():
            gen = generate_reference(self.lm.model, self.lm.tokenizer, inp.input_ids, params, pixels=inp.pixels)
        return Answer(
            prompt=inp.prompt,
            answer=gen.text.strip(),
            token_ids=gen.token_ids,
            finish_reason=gen.finish_reason,
            model=self.lm.name,
            modality=inp.study.modality if inp.study else None,
        )
