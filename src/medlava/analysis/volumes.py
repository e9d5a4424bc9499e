"""Questions about a whole CT/MR volume, not just its middle slice.

1. Candidate slices by content: inside the body, a lesion makes a slice unlike its mirror image
   (most lesions are one-sided); the strongest slice of each run of slices where that stands out
   from the rest of the stack, plus the middle slice, are the candidates.
2. The model answers the question on every candidate (one engine batch), with its confidence in
   each answer: the mean log-probability of the answer's tokens (`SamplingParams.logprobs`).
3. A finding seen on any slice counts, as a radiologist reads a stack: among the candidates
   whose answer reports something, the most confident wins; only when none does, the most
   confident "nothing" answer stands.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from medlava.analysis.grounding import is_negative_answer
from medlava.analysis.report_text import extract_findings, split_sections
from medlava.engine.sampling import SamplingParams
from medlava.imaging import Study

MAX_CANDIDATES = 4  # the middle slice and up to three runs of outlying slices
# The asymmetry z-score that flags a slice, chosen on the phantom volumes of seed 4242 (the figures
# in docs/VOLUMES.md come from seed 2027): slices through a brain mass score 7-75, no slice of a
# mass-free head above 3.
OUTLIER_Z = 4.0
CENTRAL_AREA = 0.85  # of the largest body section: slices nearer the ends of a stack are never candidates


@dataclass(frozen=True)
class SliceAnswer:
    position: int  # index into study.images
    text: str
    token_ids: list[int]
    finish_reason: str
    confidence: float  # mean log-probability of the answer tokens


def is_volume(study: Study | None) -> bool:
    return study is not None and len(study.images) > 1


def slice_index(study: Study, position: int) -> int:
    """The slice number in the series or volume of study.images[position]."""
    keys = study.metadata.get("KeySlices")
    return int(keys.split(",")[position]) if keys else position


def slice_z(study: Study, position: int) -> float | None:
    """ImagePositionPatient z of study.images[position], where the DICOM series gives it."""
    z = study.metadata.get("SlicePositions")
    return float(z.split(",")[position]) if z else None


def slice_study(study: Study, position: int) -> Study:
    """study.images[position] alone, still knowing its slice number and position."""
    meta = {k: v for k, v in study.metadata.items() if k not in ("KeySlices", "SlicePositions")}
    meta["KeySlices"] = str(slice_index(study, position))
    z = slice_z(study, position)
    if z is not None:
        meta["SlicePositions"] = f"{z:g}"
    return Study(images=[study.images[position]], modality=study.modality, spacing=study.spacing,
                 metadata=meta, source=study.source)


def position_of(study: Study, index: int) -> int:
    """The position in study.images of slice number `index`."""
    keys = study.metadata.get("KeySlices")
    return keys.split(",").index(str(index)) if keys else index


def _grey(img: np.ndarray) -> np.ndarray:
    return (img.mean(axis=2) if img.ndim == 3 else img).astype(np.float32)


def slice_measures(study: Study) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: how much the body differs from its own left-right mirror, per body pixel, and the
    body's area in pixels.

    Bodies are nearly symmetric and most lesions are not, so the first peaks where a one-sided
    lesion lies (on the phantom volumes the top three slices hold the mass in every study; a
    difference from the stack's median instead picks the ends of the stack, where anatomy changes
    fastest)."""
    stack = np.stack([_grey(img) for img in study.images])
    body = stack > 0.1 * stack.max()
    area = body.sum(axis=(1, 2)).astype(float)
    both = body & body[:, :, ::-1]
    return (np.abs(stack - stack[:, :, ::-1]) * both).sum(axis=(1, 2)) / np.maximum(area, 1), area


def candidate_positions(study: Study, n: int = MAX_CANDIDATES) -> list[int]:
    """The middle slice plus, for each run of consecutive slices whose asymmetry stands out from
    the stack's (a robust z-score of at least OUTLIER_Z either way), the run's strongest slice;
    strongest runs first, in stack order. Only slices through the full body count (at least
    CENTRAL_AREA of the largest body section): the ends of a stack change shape fastest.

    A stack with no outlier is read on its middle slice alone, so the model is never asked about
    ordinary slices it could misread (the demo model was trained on middle slices only)."""
    scores, area = slice_measures(study)
    median = float(np.median(scores))
    spread = 1.4826 * float(np.median(np.abs(scores - median))) or 1e-9  # MAD as a standard deviation
    # Either way: a lesion inside an asymmetric organ (the liver) can make its slice more symmetric.
    outlying = np.abs(scores - median) / spread
    flagged = (outlying >= OUTLIER_Z) & (area >= CENTRAL_AREA * area.max())
    peaks, k = [], 0
    while k < len(flagged):
        if flagged[k]:
            end = k
            while end + 1 < len(flagged) and flagged[end + 1]:
                end += 1
            peaks.append(k + int(np.argmax(outlying[k : end + 1])))
            k = end
        k += 1
    middle = len(study.images) // 2
    peaks = [p for p in sorted(peaks, key=lambda p: -outlying[p]) if p != middle]
    return sorted([middle, *peaks[: n - 1]])


def read_candidates(analyzer, jobs: list[tuple[Study, str]], params: SamplingParams) -> list[list[SliceAnswer]]:
    """For each (volume, question): the answers on its candidate slices, all jobs' candidates in
    one engine batch that also returns each answer token's log-probability."""
    positions = [candidate_positions(study) for study, _ in jobs]
    asks = [(j, p, study.to_pil(p).convert("RGB"), question)
            for j, ((study, question), ps) in enumerate(zip(jobs, positions, strict=True)) for p in ps]
    answers = analyzer.ask_many([(img, q) for _, _, img, q in asks], replace(params, logprobs=0))
    per_job: dict[int, list[SliceAnswer]] = {}
    for (j, p, _, _), a in zip(asks, answers, strict=True):
        confidence = float(np.mean(a.logprobs)) if a.logprobs else float("-inf")
        per_job.setdefault(j, []).append(SliceAnswer(p, a.answer, a.token_ids, a.finish_reason, confidence))
    return [per_job[j] for j in range(len(jobs))]


def answer_volumes(analyzer, jobs: list[tuple[Study, str]], params: SamplingParams) -> list[SliceAnswer]:
    """For each (volume, question): the answer on its best candidate slice."""
    read = read_candidates(analyzer, jobs, params)
    return [choose(question, answers) for (_, question), answers in zip(jobs, read, strict=True)]


def reports_something(question: str, answer: str) -> bool:
    """Whether an answer reports a finding; a written report (with an impression) does when its
    parsed findings are not empty."""
    sections = split_sections(answer)
    if "impression" in sections:
        return bool(extract_findings(sections.get("findings", ""), sections["impression"]))
    return not is_negative_answer(question, answer)


def choose(question: str, answers: list[SliceAnswer]) -> SliceAnswer:
    """A finding seen on any slice counts: the most confident reporting answer, else the most
    confident one."""
    positive = [a for a in answers if reports_something(question, a.text)]
    return max(positive or answers, key=lambda a: a.confidence)
