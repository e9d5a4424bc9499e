"""Free-text radiology reports -> sections and the abnormalities they state as present.

Rule-based on purpose (the model writes prose; this reads it the way NegEx-style labellers
such as CheXpert's do): split into sections by their headings, into sentences, into clauses;
find finding terms; drop those inside a negation's scope ("no pleural effusion or
pneumothorax", "mass is not seen"); read side, location and size from the finding's clause;
merge what the findings section and the impression say about the same finding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

SECTION_NAMES = ("technique", "comparison", "findings", "impression")
_HEADING = re.compile(r"(?im)^[ \t]*[#*_]*[ \t]*(technique|comparison|findings?|impressions?|conclusions?)"
                      r"[ \t]*[*_]*[ \t]*:?[*_]*[ \t]*")

# Canonical head term -> pattern. Organ words qualify the generic heads (nodule, mass, ...).
_TERMS: tuple[tuple[str, str], ...] = (
    ("pericardial effusion", r"pericardial effusions?"),
    ("pleural effusion", r"(?:pleural )?effusions?"),
    ("pneumothorax", r"pneumothora(?:x|ces)"),
    ("cardiomegaly", r"cardiomegaly|(?:heart|cardiac silhouette) (?:is|appears) enlarged|enlarged (?:heart|cardiac silhouette)"),
    ("hydrocephalus", r"hydrocephalus|ventriculomegaly|ventricles are (?:enlarged|dilated)|(?:enlarged|dilated) ventricles"),
    ("pulmonary edema", r"pulmonary (?:o)?edema"),
    ("consolidation", r"consolidations?"),
    ("atelectasis", r"atelectas[ei]s"),
    ("pneumonia", r"pneumonia"),
    ("emphysema", r"emphysema"),
    ("fracture", r"fractures?"),
    ("hemorrhage", r"ha?emorrhages?|bleed"),
    ("infarct", r"infarcts?|infarction"),
    ("lymphadenopathy", r"lymphadenopathy"),
    ("opacity", r"opacit(?:y|ies)"),
    ("nodule", r"nodules?"),
    ("mass", r"mass(?:es)?"),
    ("lesion", r"lesions?"),
    ("stone", r"stones?|calculi|calculus"),
    ("cyst", r"cysts?"),
)
_GENERIC = {"nodule", "mass", "lesion", "stone", "cyst", "opacity", "fracture", "hemorrhage", "infarct"}
_ORGANS = (("lung", r"lungs?|pulmonary"), ("liver", r"liver|hepatic"), ("kidney", r"kidneys?|renal"),
           ("brain", r"brain|cerebral|cerebellar|intracranial"), ("adrenal", r"adrenal"),
           ("thyroid", r"thyroid"), ("breast", r"breast"), ("bone", r"bone|osseous|rib"))
_TERM_RE = re.compile("|".join(f"(?P<t{i}>\\b(?:{p})\\b)" for i, (_, p) in enumerate(_TERMS)), re.IGNORECASE)
_ORGAN_RE = [(name, re.compile(rf"\b(?:{p})\b", re.IGNORECASE)) for name, p in _ORGANS]

# Negation cues whose scope runs to the end of the clause, and cues that negate what precedes them.
_PRE_NEG = re.compile(r"\b(?:no|not|without|negative for|free of|absence of|resolved|nor|rules? out|"
                      r"no evidence of|normal)\b", re.IGNORECASE)
_POST_NEG = re.compile(r"\b(?:is|are|was|were) (?:not (?:seen|identified|present|visible|demonstrated)|absent|"
                       r"resolved)\b", re.IGNORECASE)
# Clause boundaries: negation scope and a finding's attributes stop here.
_CLAUSE = re.compile(r"[;:]|,\s*(?=but|however|although|while|and there)|\b(?:but|however|although|whereas)\b",
                     re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_SIDE = re.compile(r"\b(right|left|bilateral|bilaterally)\b", re.IGNORECASE)
_SIZE = re.compile(r"\b(\d+(?:\.\d+)?)\s*(mm|cm)\b", re.IGNORECASE)
_ZONE = re.compile(r"\b(upper|middle|mid|lower)[ -](zone|lobe)\b", re.IGNORECASE)
_IN_THE = re.compile(r"\b(?:in|within|at) the ((?:[a-z]+ ){0,4}?[a-z]+?)(?=\s+with\b|\s+and\b|[,.;]|$)",
                     re.IGNORECASE)
# A term after "with" in the same clause describes the finding before it ("mass with surrounding edema").
_WITH = re.compile(r"\bwith\b", re.IGNORECASE)


@dataclass(frozen=True)
class Mention:
    """An abnormality stated as present."""

    name: str  # plain words: "pleural effusion", "lung nodule"
    head: str  # the term without organ: "nodule"
    side: str | None = None  # "right" / "left"
    location: str | None = None
    size_mm: float | None = None


def split_sections(text: str) -> dict[str, str]:
    """Heading -> text ('Findings: ...' lines, Markdown headings too); unheaded text counts as findings."""
    parts = _HEADING.split(text.strip())
    sections: dict[str, str] = {}
    lead = parts[0].strip()
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        key = heading.lower().rstrip("s")
        key = {"finding": "findings", "conclusion": "impression", "impression": "impression"}.get(key, key)
        sections[key] = " ".join(filter(None, [sections.get(key), " ".join(body.split())]))
    if lead:
        sections["findings"] = " ".join(filter(None, [" ".join(lead.split()), sections.get("findings")]))
    return sections


def _clauses(text: str) -> list[str]:
    out = []
    for sentence in _SENTENCE.split(text):
        out += [c.strip() for c in _CLAUSE.split(sentence) if c and c.strip()]
    return out


def _negated(clause: str, start: int, end: int) -> bool:
    return bool(_PRE_NEG.search(clause[:start]) or _POST_NEG.search(clause[end:]))


def _organ(clause: str) -> str | None:
    hits = [(m.start(), name) for name, rx in _ORGAN_RE for m in rx.finditer(clause)]
    return min(hits)[1] if hits else None


def _side(clause: str, start: int) -> str | None:
    """The side word nearest to the term (patient's side); bilateral findings have none."""
    hits = [(abs(m.start() - start), m[1].lower()) for m in _SIDE.finditer(clause)]
    if not hits:
        return None
    side = min(hits)[1]
    return None if side.startswith("bilateral") else side


def _location(clause: str, end: int) -> str | None:
    zone = _ZONE.search(clause)
    if zone:
        level = zone[1].lower()
        return f"{'middle' if level == 'mid' else level} {zone[2].lower()}"
    place = _IN_THE.search(clause, end) or _IN_THE.search(clause)
    if not place:
        return None
    words = place[1].lower().split()
    if words[0] in ("right", "left") and len(words) > 1 and words[1] != "lobe":
        words = words[1:]  # the side has its own field; "right lobe of the liver" is anatomy
    return " ".join(words)


def _size(clause: str) -> float | None:
    m = _SIZE.search(clause)
    if not m:
        return None
    value = float(m[1]) * (10 if m[2].lower() == "cm" else 1)
    return round(value, 1)


def _head(match: re.Match) -> str:
    return _TERMS[int(match.lastgroup[1:])][0]


def mention_head(name: str) -> str:
    """The head term of a finding name: 'brain mass' -> 'mass' (the name itself if none)."""
    m = _TERM_RE.search(name)
    return _head(m) if m else name


def mentions(text: str) -> list[Mention]:
    """Abnormalities stated as present in `text`, in order of appearance."""
    found = []
    for clause in _clauses(text):
        with_at = _WITH.search(clause)
        for m in _TERM_RE.finditer(clause):
            if with_at and m.start() > with_at.start() and found and found[-1][1] == clause:
                continue  # an attribute of the finding already taken from this clause
            if _negated(clause, m.start(), m.end()):
                continue
            head = _head(m)
            organ = _organ(clause) if head in _GENERIC else None
            name = f"{organ} {head}" if organ else head
            found.append((Mention(name, head, _side(clause, m.start()), _location(clause, m.end()),
                                  _size(clause)), clause))
    return [m for m, _ in found]


def without_negations_of(text: str, heads: set[str]) -> str:
    """`text` less the sentences that deny one of these findings ("No mass lesion." once another
    slice showed a mass)."""
    def denies(sentence: str) -> bool:
        return any(_head(m) in heads and _negated(clause, m.start(), m.end())
                   for clause in _clauses(sentence) for m in _TERM_RE.finditer(clause))

    return " ".join(s for s in _SENTENCE.split(text) if s.strip() and not denies(s))


def _merge(a: Mention, b: Mention) -> Mention:
    """One finding from two statements about it: the more specific name, the first known values."""
    name = a.name if len(a.name) >= len(b.name) else b.name
    return replace(a, name=name, side=a.side or b.side, location=a.location or b.location,
                   size_mm=a.size_mm if a.size_mm is not None else b.size_mm)


def _same(a: Mention, b: Mention) -> bool:
    return a.head == b.head and (a.side == b.side or a.side is None or b.side is None)


def extract_findings(findings: str, impression: str = "") -> list[Mention]:
    """The findings a report states as present; what the findings section and the impression
    both say about one finding (same term, compatible side) becomes one entry."""
    merged: list[Mention] = []
    for mention in mentions(findings) + mentions(impression):
        for i, kept in enumerate(merged):
            if _same(kept, mention):
                merged[i] = _merge(kept, mention)
                break
        else:
            merged.append(mention)
    return merged
