"""Synthetic phantoms: chest radiographs, chest/abdomen CT slices and brain MRI volumes with
known findings, plus the words (questions, answers, reports, captions) that describe them.

No torch here: the phantom world is plain numpy, written by `medlava.train.synthetic`.
"""

from medlava.train.phantoms.ct import draw_abdomen_ct, draw_chest_ct
from medlava.train.phantoms.mri import draw_brain_mri
from medlava.train.phantoms.radiograph import draw_chest_radiograph
from medlava.train.phantoms.study import (
    FINDING_KINDS,
    PROTOCOL_KINDS,
    Finding,
    PhantomStudy,
    Rendering,
)

__all__ = [
    "FINDING_KINDS",
    "PROTOCOL_KINDS",
    "Finding",
    "PhantomStudy",
    "Rendering",
    "draw_abdomen_ct",
    "draw_brain_mri",
    "draw_chest_ct",
    "draw_chest_radiograph",
]
