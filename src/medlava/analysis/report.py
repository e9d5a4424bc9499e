"""The structured `Report`: what the model wrote, as sections and as validated findings."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from medlava.analysis.report_text import extract_findings, split_sections
from medlava.imaging import Study

DISCLAIMER = ("AI-generated draft report (medlava); not a diagnosis. It must be reviewed, corrected and "
              "signed by a qualified clinician before any clinical use.")

# How each modality is named in prompts and in the technique line.
MODALITY_WORDS = {"CR": "x-ray", "DX": "x-ray", "DR": "x-ray", "RG": "x-ray", "XR": "x-ray", "CT": "ct",
                  "MR": "mri", "US": "ultrasound", "MG": "mammogram", "PT": "pet", "NM": "nuclear medicine study"}
Box = Annotated[list[int], Field(min_length=4, max_length=4)]


class ReportFinding(BaseModel):
    """One abnormality stated as present, located in the study's own pixels where grounded."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="plain words, e.g. 'pleural effusion'")
    side: Literal["right", "left"] | None = Field(None, description="the patient's side")
    location: str | None = Field(None, description="zone, lobe or structure, e.g. 'upper zone'")
    size_mm: float | None = Field(None, gt=0)
    box: Box | None = Field(None, description="[x0, y0, x1, y1] in the study's displayed pixels")
    slice: int | None = Field(None, ge=0, description="index of the slice in the series or volume")
    slice_z_mm: float | None = Field(None, description="ImagePositionPatient z of that slice (DICOM)")


class ReportSections(BaseModel):
    model_config = ConfigDict(extra="forbid")

    technique: str
    findings: str
    impression: str


class Report(BaseModel):
    """A draft radiology report; `findings` lists only what is present (negations are not findings)."""

    model_config = ConfigDict(extra="forbid")

    modality: str
    body_part: str | None
    sections: ReportSections
    impression: str
    findings: list[ReportFinding]
    model: str
    disclaimer: str = DISCLAIMER

    def to_markdown(self) -> str:
        lines = ["# Radiology report (AI draft)", "",
                 f"> {self.disclaimer}", "",
                 "## Technique", self.sections.technique, "",
                 "## Findings", self.sections.findings or "(none written)", "",
                 "## Impression", self.sections.impression or "(none written)"]
        if self.findings:
            lines += ["", "## Structured findings"]
            lines += [f"- {describe(f)}" for f in self.findings]
        lines += ["", f"_Model: {self.model}_"]
        return "\n".join(lines) + "\n"


def describe(f: ReportFinding) -> str:
    """'right pleural effusion, 12 mm, box [x0, y0, x1, y1]' for lists and narrative."""
    words = " ".join(filter(None, [f.side, f.name]))
    extra = [f"in the {f.location}" if f.location else "", f"{f.size_mm:g} mm" if f.size_mm else "",
             f"slice {f.slice}" if f.slice is not None else "",
             f"box {f.box}" if f.box else ""]
    return ", ".join([words, *filter(None, extra)])


def modality_word(modality: str) -> str:
    return MODALITY_WORDS.get(modality.upper(), "study")


def report_prompt(modality: str) -> str:
    """The instruction for the model, naming the modality when it is known."""
    return f"Write a radiology report for this {modality_word(modality)}."


def technique(study: Study | None, modality: str, body_part: str | None) -> str:
    """The technique line, from the image header (never from the model)."""
    what = modality_word(modality)
    what = "imaging study" if what == "study" else what.upper() if len(what) <= 3 else what
    text = f"{what} of the {body_part}" if body_part else what
    meta = study.metadata if study else {}
    if meta.get("SliceCount"):
        text += f", {meta['SliceCount']} slices ({meta.get('SourceFormat', 'volume')})"
    if meta.get("Window", "").split(" ")[0] not in ("", "min/max", "none"):
        text += f", window {meta['Window']}"
    return text[:1].upper() + text[1:] + "."


def build_report(text: str, *, modality: str, body_part: str | None, model: str,
                 study: Study | None = None) -> Report:
    """Parse what the model wrote into a validated Report (findings without boxes yet)."""
    sections = split_sections(text)
    findings_text, impression = sections.get("findings", ""), sections.get("impression", "")
    findings = [ReportFinding(name=m.name, side=m.side, location=m.location, size_mm=m.size_mm)
                for m in extract_findings(findings_text, impression)]
    return Report(
        modality=modality,
        body_part=body_part,
        sections=ReportSections(technique=sections.get("technique") or technique(study, modality, body_part),
                                findings=findings_text, impression=impression),
        impression=impression,
        findings=findings,
        model=model,
    )
