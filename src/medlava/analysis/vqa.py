"""Visual question answering on studies: the `Analyzer` clinicians' tools call, run on the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from medlava.chat.images import ImageInput, open_image
from medlava.chat.templates import build_prompt, get_template
from medlava.engine.llm import LLM
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
    """Loads a model once and answers questions about studies.

    Engine options (`kv_cache_memory`, `max_num_seqs`, `enable_prefix_caching`, ...) pass through
    to `LLMEngine`.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        vision_tower: str | Path | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        conv_mode: str | None = None,
        **engine_kwargs,
    ):
        path = resolve_model(model)  # None: the shipped demo model
        self.lm: LoadedModel = load_model(path, vision_tower=vision_tower, dtype=dtype, device=device)
        self.llm = LLM(self.lm, conv_mode=conv_mode, **engine_kwargs)  # checks and sets lm.conv_mode

    def ask(
        self,
        image: ImageInput,
        question: str,
        params: SamplingParams | None = None,
        *,
        window: str | None = None,
    ) -> Answer:
        return self.ask_many([(image, question)], params, window=window)[0]

    def ask_many(
        self,
        items: list[tuple[ImageInput, str]],
        params: SamplingParams | None = None,
        *,
        window: str | None = None,
    ) -> list[Answer]:
        """Answer (image, question) pairs as one engine batch, in order.

        Prompts put the image first, so questions about the same image share its cached prefix.
        """
        template = get_template(self.lm.conv_mode)
        params = params or SamplingParams()
        params = replace(params, stop=list(dict.fromkeys([*params.stop, *template.stop])))
        requests, studies = [], []
        for image, question in items:
            prompt = build_prompt(template, question.strip())  # refuses an empty question
            pil, study = open_image(image, window)
            requests.append({"prompt": prompt, "images": [pil]})
            studies.append(study)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            Answer(
                prompt=request["prompt"],
                answer=out.text.strip(),
                token_ids=out.token_ids,
                finish_reason=out.finish_reason,
                model=self.lm.name,
                modality=study.modality if study else None,
            )
            for request, out, study in zip(requests, outputs, studies, strict=True)
        ]
