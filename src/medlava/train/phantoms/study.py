"""Ground truth of the phantom world: what each study shows, and where.

A `Finding`'s box is in the coordinates of the DISPLAYED key image, exactly as
`medlava.imaging.load_study(path).key_image()` returns it: radiological convention, so the
patient's right is on the image's left, anterior (or the head) at the top.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# Finding kinds in the one fixed order used wherever several are listed ("what abnormality").
FINDING_KINDS: tuple[str, ...] = (
    "nodule", "mass", "pleural_effusion", "pneumothorax", "cardiomegaly",
    "lung_nodule", "liver_lesion", "kidney_stone", "brain_mass", "hydrocephalus",
)

# Which kinds each protocol can show (and therefore which presence questions make sense for it).
PROTOCOL_KINDS: dict[str, tuple[str, ...]] = {
    "chest_xray": ("nodule", "mass", "pleural_effusion", "pneumothorax", "cardiomegaly"),
    "chest_ct": ("lung_nodule", "pleural_effusion"),
    "abdomen_ct": ("liver_lesion", "kidney_stone"),
    "brain_mri": ("brain_mass", "hydrocephalus"),
}

# Lung findings are located by zone (thirds of the lung's height on the radiograph).
ZONED_KINDS = frozenset({"nodule", "mass"})
SIDES = ("right", "left")
ZONES = ("upper", "middle", "lower")


@dataclass(frozen=True)
class Finding:
    """One abnormality: kind, the PATIENT's side, lung zone, size and its box on the key image."""

    kind: str
    side: str | None  # "left" / "right" (patient's side), None for cardiomegaly / hydrocephalus
    zone: str | None  # "upper" / "middle" / "lower" for nodules and masses on radiographs
    size_mm: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 on the key image; pixels img[y0:y1, x0:x1]
    detail: str | None = None  # e.g. "hypodense" / "hyperdense" for liver lesions
    slice: int | None = None  # the volume slice the box is on, where it is not the middle one

    def to_dict(self) -> dict:
        d = asdict(self)
        d["box"] = list(self.box)
        if d["slice"] is None:
            del d["slice"]  # worlds without volume lesions keep their records as they were
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        return cls(**{**d, "box": tuple(d["box"])})


@dataclass
class Rendering:
    """What a modality drawer produces: the pixels (before writing) and the truth about them.

    pixels: radiograph = displayed 12-bit values (bright = dense); CT = Hounsfield units;
    MRI = the NIfTI data array (x, y, z in RAS voxel order), affine alongside.
    """

    pixels: np.ndarray
    findings: list[Finding]
    spacing_mm: tuple[float, ...]
    display_size: int  # side of the (square) displayed key image in pixels
    ctr: float | None = None
    window: tuple[float, float] | None = None  # (center, width) in stored values / HU, for DICOM
    affine: np.ndarray | None = None


@dataclass
class PhantomStudy:
    """One study's ground-truth record (one line of studies.jsonl)."""

    id: str
    image: str  # file name, relative to images/
    modality: str  # "CR" / "DX" / "CT" / "MR" (PNG radiographs keep CR/DX; the file itself says nothing)
    modality_name: str  # "x-ray" / "ct" / "mri"
    body_part: str  # "chest" / "abdomen" / "head"
    findings: list[Finding] = field(default_factory=list)
    size: int = 0  # side of the (square) displayed key image in pixels
    ctr: float | None = None  # cardiothoracic ratio, radiographs only

    @property
    def protocol(self) -> str:
        return {"x-ray": "chest_xray", "mri": "brain_mri"}.get(self.modality_name) or f"{self.body_part}_ct"

    @property
    def normal(self) -> bool:
        return not self.findings

    def kinds(self) -> list[str]:
        """The kinds present, in the fixed FINDING_KINDS order."""
        present = {f.kind for f in self.findings}
        return [k for k in FINDING_KINDS if k in present]

    def ordered_findings(self) -> list[Finding]:
        return sorted(self.findings, key=lambda f: FINDING_KINDS.index(f.kind))

    def to_record(self) -> dict:
        rec = {
            "id": self.id,
            "image": self.image,
            "modality": self.modality,
            "modality_name": self.modality_name,
            "body_part": self.body_part,
            "findings": [f.to_dict() for f in self.ordered_findings()],
            "size": self.size,
        }
        if self.ctr is not None:
            rec["ctr"] = self.ctr
        return rec

    @classmethod
    def from_record(cls, rec: dict) -> PhantomStudy:
        return cls(id=rec["id"], image=rec["image"], modality=rec["modality"],
                   modality_name=rec["modality_name"], body_part=rec["body_part"],
                   findings=[Finding.from_dict(f) for f in rec["findings"]], size=rec["size"],
                   ctr=rec.get("ctr"))
