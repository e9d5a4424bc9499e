"""Visual question answering on studies: the `Analyzer` clinicians' tools call, run on the engine."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from medlava.analysis.report import Report
from medlava.analysis.volumes import answer_volumes, is_volume, position_of, slice_index, slice_study, slice_z
from medlava.chat.images import ImageInput, open_image
from medlava.chat.templates import build_prompt, get_template
from medlava.engine.llm import LLM
from medlava.engine.sampling import SamplingParams
from medlava.model.demo import resolve_model
from medlava.model.loader import LoadedModel, load_model

VOLUME_MODES = ("auto", "middle")
_stream_ids = itertools.count()


class AnswerStripper:
    """Strips a streamed answer as `Analyzer.ask` strips a whole one: leading whitespace is dropped
    and trailing whitespace held back until more text follows it, so the pieces join to `text.strip()`."""

    def __init__(self):
        self.started, self.held = False, ""

    def feed(self, delta: str) -> str:
        text = self.held + (delta if self.started else delta.lstrip())
        self.started = self.started or bool(text)
        body = text.rstrip()
        self.held = text[len(body):]
        return body


@dataclass
class Answer:
    prompt: str  # the exact text given to the tokenizer
    answer: str
    token_ids: list[int]  # generated ids
    finish_reason: str
    model: str
    modality: str | None
    slice: int | None = None  # for a series or volume: the slice the answer was read on
    slice_z_mm: float | None = None  # and its ImagePositionPatient z, where DICOM gives it
    logprobs: list[float] | None = None  # per generated token, when SamplingParams.logprobs is set

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
        quantization: str | None = None,
        conv_mode: str | None = None,
        **engine_kwargs,
    ):
        path = resolve_model(model)  # None: the shipped demo model
        self.lm: LoadedModel = load_model(
            path, vision_tower=vision_tower, dtype=dtype, device=device, quantization=quantization
        )
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
        volumes: str = "auto",
    ) -> list[Answer]:
        """Answer (image, question) pairs as one engine batch, in order.

        Prompts put the image first, so questions about the same image share its cached prefix.
        volumes: "auto" reads a series or volume whole and answers on the slice that shows most
        (`analysis/volumes.py`); "middle" looks at its middle slice only.
        """
        if volumes not in VOLUME_MODES:
            raise ValueError(f"volumes must be one of {', '.join(VOLUME_MODES)}, got {volumes!r}")
        params = self._with_template_stop(params)
        prompts = [self._prompt(question) for _, question in items]
        opened = self._open_all([image for image, _ in items], window, None if volumes == "auto" else 1)
        stacks = [i for i, (_, study) in enumerate(opened) if volumes == "auto" and is_volume(study)]
        flat = sorted(set(range(len(items))) - set(stacks))
        answers: dict[int, Answer] = {}
        outputs = self.llm.generate([{"prompt": prompts[i], "images": [opened[i][0]]} for i in flat], params,
                                    use_tqdm=False) if flat else []
        for i, out in zip(flat, outputs, strict=True):
            study = opened[i][1]
            answers[i] = Answer(prompts[i], out.text.strip(), out.token_ids, out.finish_reason, self.lm.name,
                                study.modality if study else None, logprobs=out.logprobs)
        read = answer_volumes(self, [(opened[i][1], items[i][1]) for i in stacks], params) if stacks else []
        for i, best in zip(stacks, read, strict=True):
            study = opened[i][1]
            answers[i] = Answer(prompts[i], best.text, best.token_ids, best.finish_reason, self.lm.name,
                                study.modality, slice_index(study, best.position), slice_z(study, best.position))
        return [answers[i] for i in range(len(items))]

    def stream(
        self,
        image: ImageInput,
        question: str,
        params: SamplingParams | None = None,
        *,
        history: list[tuple[str, str]] = (),
        window: str | None = None,
    ) -> Iterator[str]:
        """Answer `question` about one image, yielding the answer as it is generated (the pieces join
        to what `ask` returns). `history`: this conversation's earlier (question, answer) turns.
        A series or volume is read on its key slice; `ask` is what chooses the most telling one."""
        pil, _ = open_image(image, window)
        prompt, params = self._prompt(question, history), self._with_template_stop(params)
        engine, rid = self.llm.engine, f"stream-{next(_stream_ids)}"
        engine.add_request(rid, prompt=prompt, images=[pil], params=params)
        strip, finished = AnswerStripper(), False
        try:
            while not finished and engine.has_unfinished():
                for out in engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        if piece := strip.feed(out.delta_text):
                            yield piece
        finally:
            if not finished:  # the caller stopped early (or the engine failed): free the blocks
                engine.abort(rid)

    def _prompt(self, question: str, history: list[tuple[str, str]] = ()) -> str:
        return build_prompt(self.lm.conv_mode, question.strip(), history)  # refuses an empty question

    def _with_template_stop(self, params: SamplingParams | None) -> SamplingParams:
        params = params or SamplingParams()
        stop = get_template(self.lm.conv_mode).stop
        return replace(params, stop=list(dict.fromkeys([*params.stop, *stop])))

    def explain(self, image: ImageInput, question: str, method: str = "relevance", *, window: str | None = None):
        """Answer `question` and show where in the image the answer came from: an `Explanation`
        (peak and box in the study's pixels, the map; `.save_overlay(png)`). See `analysis/grounding.py`."""
        from medlava.analysis.grounding import explain

        pil, study = open_image(image, window, key_slices=None)
        answer = self.ask(study or pil, question)  # a volume: read on its most telling slice
        if is_volume(study):
            study = slice_study(study, position_of(study, answer.slice))
        return explain(self, study or pil, question, method, answer=answer)

    @staticmethod
    def _open_all(images: list[ImageInput], window: str | None, key_slices: int | None) -> list:
        """open_image for each input; a path named several times (a worklist's questions about one
        study) is read once."""
        cache: dict = {}
        out = []
        for image in images:
            key = str(image) if isinstance(image, str | Path) else id(image)
            if key not in cache:
                cache[key] = open_image(image, window, key_slices=key_slices)
            out.append(cache[key])
        return out

    def report(
        self,
        image: ImageInput,
        params: SamplingParams | None = None,
        *,
        window: str | None = None,
        grounding: str | None = "occlusion",
    ) -> Report:
        """A structured draft report (sections, impression, findings present) of one study; each
        finding is boxed by `grounding` (an `explain` method; None: no boxes)."""
        return self.report_many([image], params, window=window, grounding=grounding)[0]

    def report_many(
        self,
        images: list[ImageInput],
        params: SamplingParams | None = None,
        *,
        window: str | None = None,
        grounding: str | None = "occlusion",
    ) -> list[Report]:
        """Reports of several studies, drafted as one engine batch, in order."""
        from medlava.analysis.reporting import draft_reports

        return draft_reports(self, images, params, window=window, grounding=grounding)
