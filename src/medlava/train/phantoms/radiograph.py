"""Chest radiograph phantom (PA): body, lungs, heart, mediastinum, ribs, domes, and findings.

Drawn directly in display orientation (radiological convention: the patient's right lung on
the image's left) as densities in [0, 1] (bright = attenuating), then scaled to 12 bits.
Coordinates are normalised (see shapes.grid): one unit is 200 mm whatever the pixel size.
"""

from __future__ import annotations

import numpy as np

from medlava.train.phantoms.shapes import (
    band,
    blur,
    box_of,
    coverage,
    ellipse,
    grid,
    paint,
    place_disc,
    radius,
    segment_distance,
    smooth_noise,
)
from medlava.train.phantoms.study import SIDES, ZONES, Finding, Rendering

FIELD_MM = 400.0  # the film is 400 mm wide, so pixel spacing is 400 / size
UNIT_MM = FIELD_MM / 2
SIGN = {"right": -1.0, "left": 1.0}  # where on the image (u) the patient's side lies

AIR, SOFT, LUNG, HEART, FLUID = 0.04, 0.62, 0.17, 0.73, 0.60
STORED_LOW, STORED_SPAN = 300.0, 3300.0  # density 0..1 -> stored 12-bit values
NORMAL_CTR = (0.40, 0.47)
ENLARGED_CTR = (0.56, 0.68)


class _Lung:
    """One lung field: an ellipse cut by the diaphragm dome below and the mediastinum medially."""

    def __init__(self, side: str, rng: np.random.Generator, dome: float) -> None:
        self.side, self.sign = side, SIGN[side]
        self.cu = self.sign * rng.uniform(0.38, 0.42)
        self.cv = rng.uniform(0.12, 0.18)
        self.ru = rng.uniform(0.25, 0.29)
        self.rv = rng.uniform(0.83, 0.88)
        self.dome = dome  # highest point of this side's diaphragm (normalised v)

    def dome_v(self, u: np.ndarray | float) -> np.ndarray | float:
        # The dome curves down towards the costophrenic angle laterally and the heart medially.
        return self.dome + 1.6 * (u - self.cu) ** 2

    @property
    def top(self) -> float:
        return self.cv - self.rv

    @property
    def height(self) -> float:
        return float(self.dome_v(self.cu)) - self.top

    def hemithorax(self, v: np.ndarray, u: np.ndarray, px: float) -> np.ndarray:
        """The lung ellipse without the diaphragm cut (what fluid can fill), medially bounded."""
        medial = np.clip(0.5 + (self.sign * u - 0.10) * px, 0.0, 1.0)
        return ellipse(v, u, self.cv, self.cu, self.rv, self.ru, px) * medial

    def field(self, v: np.ndarray, u: np.ndarray, px: float) -> np.ndarray:
        below_dome = np.clip(0.5 - (v - self.dome_v(u)) * px, 0.0, 1.0)
        return self.hemithorax(v, u, px) * below_dome


def _sides(rng: np.random.Generator, kinds: list[str]) -> dict[str, str]:
    sides = {k: str(rng.choice(SIDES)) for k in kinds if k != "cardiomegaly"}
    if "pleural_effusion" in sides and "pneumothorax" in sides:  # no hydropneumothorax: opposite sides
        sides["pneumothorax"] = "left" if sides["pleural_effusion"] == "right" else "right"
    return sides


def draw_chest_radiograph(rng: np.random.Generator, size: int, kinds: list[str]) -> Rendering:
    """A PA chest film showing `kinds` (subset of PROTOCOL_KINDS["chest_xray"])."""
    v, u = grid(size)
    px = size / 2.0
    mm_per_px = FIELD_MM / size
    sides = _sides(rng, kinds)
    findings: list[Finding] = []

    img = np.full((size, size), AIR)
    body_ru = rng.uniform(0.83, 0.90)
    torso = (np.abs((v - 0.12) / 1.0) ** 2.6 + np.abs(u / body_ru) ** 2.6) ** (1 / 2.6)
    paint(img, coverage(torso, body_ru * px), SOFT)
    paint(img, ellipse(v, u, -1.0, 0.0, 0.32, 0.17, px), SOFT)  # neck

    dome_r = rng.uniform(0.27, 0.33)
    lungs = {"right": _Lung("right", rng, dome_r), "left": _Lung("left", rng, dome_r + rng.uniform(0.03, 0.07))}
    fields = {s: lung.field(v, u, px) for s, lung in lungs.items()}
    texture = np.exp(-((smooth_noise(rng, (size, size), 1.8 * size / 224) / 0.25) ** 2))  # vessel-like curves
    for s, lung in lungs.items():
        grad = LUNG + 0.07 * np.clip((v - lung.top) / lung.height, 0, 1)  # bases look denser
        paint(img, fields[s], grad)
        hilum = np.exp(-np.hypot(v + 0.02, u - lung.sign * 0.17) / 0.22)
        img += fields[s] * 0.14 * texture * (0.15 + 0.85 * hilum)

    blocked = np.zeros((size, size), dtype=bool)  # where lesions must not go
    if "pneumothorax" in kinds:
        findings.append(_pneumothorax(img, v, u, px, lungs[sides["pneumothorax"]], rng, mm_per_px, blocked))
    if "pleural_effusion" in kinds:
        findings.append(_effusion(img, v, u, px, lungs[sides["pleural_effusion"]], rng, mm_per_px, blocked))

    ctr = float(rng.uniform(*(ENLARGED_CTR if "cardiomegaly" in kinds else NORMAL_CTR)))
    heart = _heart_and_mediastinum(img, v, u, px, lungs, ctr)
    blocked |= heart > 0.5
    if "cardiomegaly" in kinds:
        width_mm = round((heart.max(axis=0) > 0.5).sum() * mm_per_px)
        findings.append(Finding("cardiomegaly", None, None, int(width_mm), box_of(heart)))

    for kind in ("mass", "nodule"):  # the bigger lesion first, while there is room
        if kind in kinds:
            findings.append(_lesion(img, v, u, px, lungs[sides[kind]], fields[sides[kind]], kind, rng,
                                    mm_per_px, blocked))

    img += _bones(v, u, px, lungs, rng) * (img > AIR + 0.1)
    img = blur(img, 0.7 * size / 224)
    stored = STORED_LOW + img * STORED_SPAN + rng.normal(0.0, 22.0, img.shape)
    pixels = np.clip(np.rint(stored), 0, 4095).astype(np.uint16)
    window = (float(np.rint(STORED_LOW + rng.uniform(0.42, 0.48) * STORED_SPAN)),
              float(np.rint(rng.uniform(0.85, 0.95) * STORED_SPAN)))
    return Rendering(pixels=pixels, findings=findings, spacing_mm=(mm_per_px, mm_per_px), display_size=size,
                     ctr=round(ctr, 3), window=window)


def _pneumothorax(img: np.ndarray, v: np.ndarray, u: np.ndarray, px: float, lung: _Lung,
                  rng: np.random.Generator, mm_per_px: float, blocked: np.ndarray) -> Finding:
    """Air between the collapsed lung and the chest wall: a dark apical/lateral rim without
    markings, bounded by a thin bright visceral pleural line."""
    d = rng.uniform(0.05, 0.11)  # rim width laterally (normalised); twice that at the apex
    inner_r = radius((v, u), (lung.cv + d, lung.cu - lung.sign * d / 2), (lung.rv - d, lung.ru - d / 2))
    field = lung.field(v, u, px)
    rim = field * (1.0 - coverage(inner_r, (lung.ru - d / 2) * px))
    paint(img, rim, 0.06)
    img += 0.03 * field * (1.0 - rim)  # the collapsed lung is a little denser
    line = band((inner_r - 1.0) * (lung.ru - d / 2), 0.6 / px, px)  # ~1 pixel either side of the edge
    img += 0.22 * line * field
    blocked |= rim > 0.2
    return Finding("pneumothorax", lung.side, None, int(round(d * UNIT_MM)), box_of(rim))


def _effusion(img: np.ndarray, v: np.ndarray, u: np.ndarray, px: float, lung: _Lung,
              rng: np.random.Generator, mm_per_px: float, blocked: np.ndarray) -> Finding:
    """Fluid filling the lung base up to a meniscus that climbs the lateral chest wall,
    blunting the costophrenic angle and hiding that side's dome."""
    base = float(lung.dome_v(lung.cu))
    level = base - rng.uniform(0.12, 0.35) * lung.height
    lateral = np.clip((lung.sign * (u - lung.cu) / lung.ru + 1.0) / 2.0, 0.0, 1.0)  # 0 medial .. 1 lateral
    meniscus = level - 0.15 * lateral**3
    below = np.clip(0.5 + (v - meniscus) * px * 0.5, 0.0, 1.0)  # a soft, 2-pixel top edge
    above_abdomen = np.clip(0.5 - (v - lung.dome_v(u) - 0.03) * px, 0.0, 1.0)
    fluid = lung.hemithorax(v, u, px) * below * above_abdomen
    replaced = fluid * lung.field(v, u, px)  # the part that was aerated lung
    paint(img, fluid, FLUID + 0.06 * np.clip((v - level) / 0.2, 0.0, 1.0))
    blocked |= fluid > 0.2
    box = box_of(replaced)
    return Finding("pleural_effusion", lung.side, None, int(round((box[3] - box[1]) * mm_per_px)), box)


def _heart_and_mediastinum(img: np.ndarray, v: np.ndarray, u: np.ndarray, px: float,
                           lungs: dict[str, _Lung], ctr: float) -> np.ndarray:
    """Paints mediastinum, trachea and heart; returns the heart's visible coverage.

    The heart's width is ctr x the thoracic width (outer lung edges); a third of it lies right of
    the midline and two thirds left (the patient's left, the image's right).
    """
    thorax = (abs(lungs["right"].cu) + lungs["right"].ru) + (abs(lungs["left"].cu) + lungs["left"].ru)
    width = ctr * thorax
    hcu, hru = 0.16 * width, width / 2.0
    left = lungs["left"]
    hrv = 0.30 + 0.4 * (ctr - 0.44)
    hcv = left.dome - 0.03
    diaphragm = np.where(u < 0, lungs["right"].dome_v(u), left.dome_v(u))
    above = np.clip(0.5 - (v - diaphragm) * px * 0.5, 0.0, 1.0)  # the heart's base fades into the dome
    upper = np.clip(0.5 - (np.abs(u) - 0.085) * px, 0.0, 1.0) * np.clip(0.5 - (v - hcv) * px, 0.0, 1.0)
    paint(img, upper * (v > -0.95), 0.68)  # mediastinum
    paint(img, ellipse(v, u, hcv - hrv - 0.03, 0.10, 0.055, 0.055, px), 0.72)  # aortic knob
    paint(img, band(u, 0.02, px) * (v < -0.25), 0.42)  # trachea
    heart = ellipse(v, u, hcv, hcu, hrv, hru, px) * above
    paint(img, heart, HEART)
    return heart


def _lesion(img: np.ndarray, v: np.ndarray, u: np.ndarray, px: float, lung: _Lung, field: np.ndarray,
            kind: str, rng: np.random.Generator, mm_per_px: float, blocked: np.ndarray) -> Finding:
    """A round opacity (nodule 8-29 mm, mass 30-60 mm) inside one zone of one lung."""
    size_mm = int(rng.integers(8, 30) if kind == "nodule" else rng.integers(30, 61))
    r = size_mm / 2.0 / UNIT_MM
    allowed = (field > 0.5) & ~blocked
    third = lung.height / 3.0
    zones = [int(z) for z in rng.permutation(3)]
    for z in zones:  # the chosen zone, unless fluid or air leaves it no room
        lo, hi = lung.top + z * third, lung.top + (z + 1) * third
        candidates = allowed & (v >= lo) & (v < hi)
        if candidates.sum() >= 4:
            break
    cv, cu = place_disc(rng, candidates, allowed, v, u, r, px, margin=4.0 / UNIT_MM)
    zone = ZONES[int(np.clip((cv - lung.top) // third, 0, 2))]
    stretch = rng.uniform(0.85, 1.15)  # slightly oval
    cover = ellipse(v, u, cv, cu, r * stretch, r / stretch, px)
    img += cover * (rng.uniform(0.26, 0.32) if kind == "nodule" else rng.uniform(0.32, 0.40))
    blocked |= ellipse(v, u, cv, cu, r * 1.3 + 0.02, r * 1.3 + 0.02, px) > 0.5
    fallback = ((cv + 1) * px - 0.5, (cu + 1) * px - 0.5)
    return Finding(kind, lung.side, zone, size_mm, box_of(cover, fallback))


def _bones(v: np.ndarray, u: np.ndarray, px: float, lungs: dict[str, _Lung], rng: np.random.Generator) -> np.ndarray:
    """Additive bone densities: posterior rib arcs across each hemithorax, clavicles, spine."""
    out = np.zeros_like(v)
    around = np.zeros_like(v)
    for lung in lungs.values():
        side = ellipse(v, u, lung.cv, lung.cu, lung.rv * 1.06, lung.ru * 1.12, px)
        around = np.maximum(around, side * np.clip(0.5 + (lung.sign * u - 0.07) * px, 0.0, 1.0))
        medial, lateral = (-0.61, lung.sign * 0.07), (-0.71, lung.sign * 0.50)
        out += 0.12 * band(segment_distance(v, u, medial, lateral), 0.022, px)
    # Ten arcs, bowing upwards, 0.1 apart: the distance to the nearest one in a single pass.
    phase = (v - rng.uniform(-0.66, -0.60) - 1.1 * (np.abs(u) - 0.30) ** 2) / 0.1
    nearest = np.clip(np.rint(phase), 0, 9)
    out += 0.05 * band((phase - nearest) * 0.1, 0.012, px) * around
    out += 0.05 * band(u, 0.05, px)  # spine, faint through the mediastinum
    return out
