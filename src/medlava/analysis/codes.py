"""Coded concepts for findings, taken from DICOM's own code dictionary (pydicom), so the FHIR and SR
exports say 'pleural effusion' as SNOMED CT 60046008 rather than as text alone."""

from __future__ import annotations

import re

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

LOCAL_SCHEME = "99MEDLAVA"  # a private coding scheme (DICOM reserves designators starting with 99)
ORGANS = ("lung", "liver", "kidney", "brain", "heart", "chest", "abdomen", "head")
SIDES = {"right": codes.SCT.Right, "left": codes.SCT.Left}


def _camel(words: str) -> str:
    return "".join(w.capitalize() for w in re.findall(r"[a-z0-9]+", words.lower()))


def snomed_code(name: str) -> Code | None:
    """The SNOMED CT concept DICOM's dictionary has for a finding name (the whole name, else its
    head noun): 'pleural effusion' -> PleuralEffusion, 'lung nodule' -> Nodule; None if neither."""
    for words in (name, name.split()[-1] if name.split() else ""):
        code = getattr(codes.SCT, _camel(words), None) if words else None
        if code is not None:
            return code
    return None


def finding_code(name: str) -> Code:
    """A code for any finding name: SNOMED CT where known, else the local scheme with the name itself."""
    return snomed_code(name) or Code(_camel(name)[:16] or "Finding", LOCAL_SCHEME, name)


def site_code(*texts: str | None) -> Code | None:
    """The first organ or region named in the texts (finding name, location, body part)."""
    for text in texts:
        for organ in ORGANS:
            if text and re.search(rf"\b{organ}", text.lower()):
                return getattr(codes.SCT, organ.capitalize())
    return None
