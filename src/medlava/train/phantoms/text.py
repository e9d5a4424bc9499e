"""Words for the phantom world: VQA-RAD style questions and short answers, reports, captions.

The vocabulary is deliberately small and consistent (the demo model and its tokenizer learn
from it): answers are short and lower-case, every question kind has several paraphrases, and
findings are always named the same way and listed in the fixed FINDING_KINDS order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medlava.train.phantoms.study import PROTOCOL_KINDS, Finding, PhantomStudy

NAMES = {
    "nodule": "nodule", "mass": "mass", "pleural_effusion": "pleural effusion", "pneumothorax": "pneumothorax",
    "cardiomegaly": "cardiomegaly", "lung_nodule": "lung nodule", "liver_lesion": "liver lesion",
    "kidney_stone": "kidney stone", "brain_mass": "brain mass", "hydrocephalus": "hydrocephalus",
}
_MASS_NOUNS = {"cardiomegaly", "hydrocephalus"}  # no article: "Is there cardiomegaly?"
NO_ABNORMALITY = "no abnormality"

MODALITY_Q = ("What modality is this?", "What imaging modality was used?", "What type of imaging is this?",
              "How was this image acquired?")
BODY_PART_Q = ("What part of the body is shown?", "Which body part is imaged?", "What region of the body is this?",
               "Which part of the body is being imaged?")
PRESENCE_Q = ("Is there {np}?", "Does this image show {np}?", "Is {np} present?", "Can you see {np}?",
              "Is there evidence of {np}?")
NORMAL_Q = ("Is this study normal?", "Is this a normal image?", "Does this image look normal?")
ABNORMAL_Q = ("Is there an abnormality?", "Is anything abnormal in this image?", "Are there any abnormal findings?")
SIDE_Q = ("On which side is the {name}?", "Which side is the {name} on?", "Is the {name} on the left or the right?",
          "Which side of the patient has the {name}?")
LOCATION_Q = ("Where is the {name}?", "Where is the {name} located?", "In which zone is the {name}?")
FINDING_Q = ("What abnormality is seen?", "What is the main finding?", "What abnormality does this image show?",
             "What is the abnormal finding?")
REPORT_PROMPTS = ("Write a radiology report for this study.", "Write the report for this image.",
                  "Describe the findings and give an impression.", "Please write a radiology report.")
CAPTION_PROMPTS = ("Describe the image briefly.", "Give a short description of this image.",
                   "Summarize the image in one sentence.", "What does this image show? Answer briefly.")


@dataclass(frozen=True)
class QA:
    kind: str  # "modality", "body_part", "presence:<kind>", "normal", "side", "location", "finding"
    text: str
    answer: str

    @property
    def answer_type(self) -> str:
        return "CLOSED" if self.answer in ("yes", "no") else "OPEN"


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def noun_phrase(kind: str) -> str:
    name = NAMES[kind]
    return name if kind in _MASS_NOUNS else f"a {name}"


def location(f: Finding) -> str:
    """'right upper zone' for zoned lung findings, else the side."""
    return f"{f.side} {f.zone} zone" if f.zone else str(f.side)


def finding_answer(study: PhantomStudy) -> str:
    return " and ".join(NAMES[k] for k in study.kinds()) or NO_ABNORMALITY


def questions(study: PhantomStudy, rng: np.random.Generator) -> list[QA]:
    """About 5-8 questions for one study.

    Presence questions ask about every finding present plus absent kinds plausible for the
    protocol (one for abnormal studies, one or two for normal ones), so that over a world with
    ~0.8 findings per study "yes" and "no" each answer roughly half of them.
    """
    qas = [QA("modality", _pick(rng, MODALITY_Q), study.modality_name),
           QA("body_part", _pick(rng, BODY_PART_Q), study.body_part)]

    present = study.kinds()
    absent = [k for k in PROTOCOL_KINDS[study.protocol] if k not in present]
    n_absent = 1 if present else 1 + int(rng.random() < 0.3)
    asked = present + [str(k) for k in rng.permutation(absent)[:n_absent]] if absent else list(present)
    presence = [QA(f"presence:{k}", _pick(rng, PRESENCE_Q).format(np=noun_phrase(k)), "yes" if k in present else "no")
                for k in asked]
    qas += [presence[i] for i in rng.permutation(len(presence))]

    # Half the time ask the opposite polarity, which also keeps yes/no balanced over all closed questions.
    if rng.random() < 0.5:
        qas.append(QA("normal", _pick(rng, NORMAL_Q), "yes" if study.normal else "no"))
    else:
        qas.append(QA("normal", _pick(rng, ABNORMAL_Q), "no" if study.normal else "yes"))
    qas.append(QA("finding", _pick(rng, FINDING_Q), finding_answer(study)))

    sided = [f for f in study.ordered_findings() if f.side]
    if sided:
        f = sided[0]
        qas.append(QA("side", _pick(rng, SIDE_Q).format(name=NAMES[f.kind]), str(f.side)))
        if f.zone:
            qas.append(QA("location", _pick(rng, LOCATION_Q).format(name=NAMES[f.kind]), location(f)))
    return qas


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _phrase(f: Finding) -> str:
    """A finding as a caption phrase: 'a right upper zone nodule', 'a hypodense liver lesion'."""
    if f.kind in _MASS_NOUNS:
        return NAMES[f.kind]
    if f.kind == "liver_lesion":
        return f"a {f.detail} liver lesion"
    return f"a {location(f)} {NAMES[f.kind]}"


_TITLES = {"chest_xray": "Chest x-ray", "chest_ct": "Axial ct of the chest", "abdomen_ct": "Axial ct of the abdomen",
           "brain_mri": "Axial mri of the brain"}


def caption(study: PhantomStudy) -> str:
    """One sentence: 'Chest x-ray with a right upper zone nodule.' / 'Axial ct of the abdomen, no abnormality.'"""
    title = _TITLES[study.protocol]
    if study.normal:
        return f"{title}, {NO_ABNORMALITY}."
    return f"{title} with {' and '.join(_phrase(f) for f in study.ordered_findings())}."


def _by_kind(study: PhantomStudy) -> dict[str, Finding]:
    return {f.kind: f for f in study.findings}


def _xray_report(f: dict[str, Finding], ctr: float | None) -> tuple[list[str], list[str]]:
    found, impression = [], []
    for kind, word, label in (("nodule", "nodule", "pulmonary nodule"), ("mass", "mass", "lung mass")):
        if kind in f:
            g = f[kind]
            found.append(f"There is a {g.size_mm} mm {word} in the {location(g)}.")
            impression.append(f"{_cap(location(g))} {label}.")
    if "nodule" not in f and "mass" not in f:
        found.append("The lungs are clear.")
    for kind, text in (("pleural_effusion", "pleural effusion with blunting of the costophrenic angle"),
                       ("pneumothorax", "pneumothorax with a visible pleural edge")):
        if kind in f:
            found.append(f"There is a {f[kind].side} {text}.")
            impression.append(f"{_cap(str(f[kind].side))} {NAMES[kind]}.")
    missing = [NAMES[k] for k in ("pleural_effusion", "pneumothorax") if k not in f]
    if missing:
        found.append(f"No {' or '.join(missing)}.")
    if "cardiomegaly" in f:
        found.append(f"The heart is enlarged, with a cardiothoracic ratio of {ctr:.2f}.")
        impression.append("Cardiomegaly.")
    else:
        found.append("The cardiac silhouette is normal in size.")
    return found, impression


def _chest_ct_report(f: dict[str, Finding]) -> tuple[list[str], list[str]]:
    found, impression = [], []
    if "lung_nodule" in f:
        g = f["lung_nodule"]
        found.append(f"There is a {g.size_mm} mm nodule in the {g.side} lung.")
        impression.append(f"{_cap(str(g.side))} lung nodule.")
    else:
        found.append("The lungs are clear.")
    if "pleural_effusion" in f:
        found.append(f"There is a {f['pleural_effusion'].side} pleural effusion.")
        impression.append(f"{_cap(str(f['pleural_effusion'].side))} pleural effusion.")
    else:
        found.append("No pleural effusion.")
    found.append("The heart and mediastinum are normal.")
    return found, impression


def _abdomen_ct_report(f: dict[str, Finding]) -> tuple[list[str], list[str]]:
    found, impression = [], []
    if "liver_lesion" in f:
        g = f["liver_lesion"]
        found.append(f"There is a {g.size_mm} mm {g.detail} lesion in the right lobe of the liver.")
        impression.append(f"{_cap(str(g.detail))} liver lesion.")
    else:
        found.append("The liver is normal.")
    if "kidney_stone" in f:
        g = f["kidney_stone"]
        found.append(f"There is a {g.size_mm} mm stone in the {g.side} kidney.")
        impression.append(f"{_cap(str(g.side))} kidney stone.")
    else:
        found.append("The kidneys are normal.")
    found.append("The spleen is normal.")
    return found, impression


def _brain_mri_report(f: dict[str, Finding]) -> tuple[list[str], list[str]]:
    found, impression = [], []
    if "brain_mass" in f:
        g = f["brain_mass"]
        found.append(f"There is a {g.size_mm} mm enhancing mass in the {g.side} cerebral hemisphere "
                     "with surrounding edema.")
        impression.append(f"{_cap(str(g.side))} cerebral mass.")
    else:
        found.append("No mass lesion.")
    if "hydrocephalus" in f:
        found.append("The ventricles are enlarged.")
        impression.append("Hydrocephalus.")
    else:
        found.append("The ventricles are normal in size.")
    return found, impression


def report(study: PhantomStudy) -> tuple[str, str]:
    """(findings, impression) of a template report built from the ground truth."""
    f = _by_kind(study)
    if study.protocol == "chest_xray":
        found, impression = _xray_report(f, study.ctr)
    elif study.protocol == "chest_ct":
        found, impression = _chest_ct_report(f)
    elif study.protocol == "abdomen_ct":
        found, impression = _abdomen_ct_report(f)
    else:
        found, impression = _brain_mri_report(f)
    if not impression:
        impression = [f"Normal {_TITLES[study.protocol].replace('Axial ', '').lower()}."]
    return " ".join(found), " ".join(impression)


def report_text(study: PhantomStudy) -> str:
    """The report as one answer: 'Findings: ...' and 'Impression: ...' on two lines."""
    findings, impression = report(study)
    return f"Findings: {findings}\nImpression: {impression}"


def report_prompt(rng: np.random.Generator) -> str:
    return _pick(rng, REPORT_PROMPTS)


def caption_prompt(rng: np.random.Generator) -> str:
    return _pick(rng, CAPTION_PROMPTS)
