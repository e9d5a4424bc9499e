"""Drafting a report: the model writes it, the header or the model names modality and body part."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from medlava.analysis.report import Report, build_report, describe, report_prompt
from medlava.analysis.report_text import mention_head, without_negations_of
from medlava.analysis.volumes import (
    SliceAnswer,
    is_volume,
    position_of,
    read_candidates,
    slice_index,
    slice_study,
    slice_z,
)
from medlava.chat.images import ImageInput, open_image
from medlava.engine.sampling import SamplingParams
from medlava.imaging import Study

if TYPE_CHECKING:
    from medlava.analysis.vqa import Analyzer

MODALITY_QUESTION = "What modality is this?"
BODY_PART_QUESTION = "What part of the body is shown?"
# The model's word for a modality -> the DICOM code a report carries (for images without a header).
MODALITY_CODES = {"x-ray": "DX", "xray": "DX", "radiograph": "DX", "ct": "CT", "mri": "MR", "mr": "MR",
                  "ultrasound": "US", "pet": "PT", "mammogram": "MG"}
HEADERLESS = {"", "OT"}  # PNG/JPEG (and "other") studies: the file says nothing


def _short(answer: str) -> str:
    return " ".join(answer.strip().rstrip(".").lower().split()[:4])


def _as_study(image: ImageInput, window: str | None) -> Study:
    pil, study = open_image(image, window, key_slices=None)  # a volume whole: the report reads its best slice
    if study is None:  # a bare PIL image: no header at all
        study = Study(images=[np.asarray(pil.convert("RGB"))], modality="OT", source="image")
    return study


def _questions(study: Study) -> list[str]:
    """The report prompt, then what the header does not say."""
    questions = [report_prompt(study.modality)]
    if study.modality.upper() in HEADERLESS:
        questions.append(MODALITY_QUESTION)
    if not study.metadata.get("BodyPartExamined"):
        questions.append(BODY_PART_QUESTION)
    return questions


def merge_slice_reports(reads: list[SliceAnswer], study: Study, **fields) -> Report:
    """One report of a volume from the reports written on its candidate slices: the most confident
    one that names a finding (else the most confident), plus the kinds of finding that only other
    slices showed (a finding already named is not taken again with another side: one lesion read
    twice), each on its own slice."""
    drafts = [(build_report(a.text, study=study, **fields), a) for a in reads]
    report, best = max(drafts, key=lambda d: (bool(d[0].findings), d[1].confidence))
    for f in report.findings:
        f.slice, f.slice_z_mm = slice_index(study, best.position), slice_z(study, best.position)
    extra = []
    for draft, other in sorted(drafts, key=lambda d: -d[1].confidence):
        for f in draft.findings:
            if any(g.name == f.name for g in report.findings):
                continue
            f.slice, f.slice_z_mm = slice_index(study, other.position), slice_z(study, other.position)
            report.findings.append(f)
            extra.append(f)
    if extra:  # the narrative names them too, with the slice to look at
        sections = report.sections
        base = without_negations_of(sections.findings, {mention_head(f.name) for f in extra})
        sections.findings = " ".join([base, *(f"{describe(f).capitalize()}." for f in extra)])
        sections.impression = " ".join(
            [sections.impression, *(f"{' '.join(filter(None, [f.side, f.name])).capitalize()} (slice {f.slice})."
                                    for f in extra)])
        report.impression = sections.impression
    return report


UNCOUNTABLE = {"cardiomegaly", "hydrocephalus", "atelectasis", "consolidation", "emphysema", "pneumonia",
               "lymphadenopathy", "pulmonary edema", "hemorrhage"}


def _presence_questions(name: str) -> list[str]:
    """'Is there a lung nodule?', then with the bare term ('Is there a nodule?'): models are asked
    about findings in the words they were taught, which the report's name may refine."""
    names = list(dict.fromkeys([name, mention_head(name)]))
    return [f"Is there {n if n in UNCOUNTABLE else ('an ' if n[0] in 'aeiou' else 'a ') + n}?" for n in names]


def ground(analyzer: Analyzer, study: Study, report: Report, method: str) -> None:
    """Give each finding its box: the peak region of the map explaining the model's "yes" to a
    presence question about it, on the finding's own slice. A finding the model will not confirm
    when asked keeps no box."""
    from medlava.analysis.grounding import NothingToLocalize, explain

    for f in report.findings:
        target = study
        if is_volume(study):
            target = slice_study(study, position_of(study, f.slice) if f.slice is not None else len(study.images) // 2)
        for question in _presence_questions(f.name):
            try:
                f.box = [int(round(v)) for v in explain(analyzer, target, question, method).box]
                break
            except NothingToLocalize:
                continue


def draft_reports(analyzer: Analyzer, images: list[ImageInput], params: SamplingParams | None = None, *,
                  window: str | None = None, grounding: str | None = "occlusion") -> list[Report]:
    """Reports of several studies as one engine batch. Each study's questions (the report, plus
    modality and body part when its header lacks them) share the image's cached prefix. A series
    or volume is reported on its candidate slices (see analysis/volumes.py) and the reports merged;
    its other questions are asked about the middle slice. `grounding` (an explain method, or None)
    boxes each finding."""
    params = params or SamplingParams(max_tokens=512)
    studies = [_as_study(image, window) for image in images]
    asked = [_questions(study) for study in studies]
    items = [(study, q) for study, questions in zip(studies, asked, strict=True)
             for q in (questions[1:] if is_volume(study) else questions)]
    replies = iter(analyzer.ask_many(items, params, volumes="middle"))
    stacks = [(study, questions[0]) for study, questions in zip(studies, asked, strict=True) if is_volume(study)]
    slice_reads = iter(read_candidates(analyzer, stacks, params) if stacks else [])
    reports = []
    for study, questions in zip(studies, asked, strict=True):
        said = {q: next(replies).answer for q in (questions[1:] if is_volume(study) else questions)}
        modality = study.modality.upper()
        if MODALITY_QUESTION in said:
            modality = MODALITY_CODES.get(_short(said[MODALITY_QUESTION]), "OT")
        body_part = study.metadata.get("BodyPartExamined", "").lower() or _short(said.get(BODY_PART_QUESTION, ""))
        fields = dict(modality=modality, body_part=body_part or None, model=analyzer.lm.name)
        if is_volume(study):
            report = merge_slice_reports(next(slice_reads), study, **fields)
        else:
            report = build_report(said[questions[0]], study=study, **fields)
        if grounding:
            ground(analyzer, study, report, grounding)
        reports.append(report)
    return reports
