"""Axial CT phantoms in Hounsfield units: a chest slice and an upper-abdomen slice.

Drawn as the scanner stores them, which is also how they are displayed: anterior at the top,
the patient's right on the image's left (columns run towards the patient's left).
Coordinates are normalised (see shapes.grid): one unit is 175 mm (a 350 mm field of view).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from medlava.train.phantoms.shapes import blur, box_of, ellipse, grid, paint, place_disc, smooth_noise
from medlava.train.phantoms.study import SIDES, Finding, Rendering

FIELD_MM = 350.0
UNIT_MM = FIELD_MM / 2
SIGN = {"right": -1.0, "left": 1.0}  # where on the image (u) the patient's side lies
AIR, LUNG, FAT, WATER, SOFT, LIVER, BONE = -1000.0, -850.0, -100.0, 10.0, 40.0, 60.0, 850.0
LUNG_WINDOW = (-600.0, 1500.0)
ABDOMEN_WINDOW = (40.0, 400.0)
NOISE_HU = 10.0


def _body(v: np.ndarray, u: np.ndarray, px: float, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Subcutaneous fat, the muscle wall and the (fatty) cavity inside; returns (hu, rv, ru) of the body."""
    hu = np.full(v.shape, AIR)
    rv, ru = rng.uniform(0.55, 0.63), rng.uniform(0.82, 0.90)
    paint(hu, ellipse(v, u, 0.05, 0.0, rv, ru, px), FAT)
    paint(hu, ellipse(v, u, 0.05, 0.0, rv - 0.05, ru - 0.06, px), SOFT + 5)  # muscle
    paint(hu, ellipse(v, u, 0.05, 0.0, rv - 0.09, ru - 0.11, px), FAT + 10)  # cavity fat
    for sign in (-1.0, 1.0):  # paraspinal muscles
        paint(hu, ellipse(v, u, 0.05 + rv - 0.17, sign * 0.16, 0.09, 0.11, px), SOFT + 10)
    return hu, rv, ru


def _spine(hu: np.ndarray, v: np.ndarray, u: np.ndarray, px: float, cv: float) -> None:
    """Vertebral body (cortex and cancellous bone), posterior arch and the spinal canal."""
    paint(hu, ellipse(v, u, cv + 0.17, 0.0, 0.035, 0.14, px), BONE - 150)  # laminae / transverse processes
    paint(hu, ellipse(v, u, cv, 0.0, 0.1, 0.105, px), BONE + 100)
    paint(hu, ellipse(v, u, cv, 0.0, 0.08, 0.085, px), 250.0)
    paint(hu, ellipse(v, u, cv + 0.15, 0.0, 0.045, 0.045, px), WATER + 10)  # canal


def _lesion(hu: np.ndarray, v: np.ndarray, u: np.ndarray, px: float, allowed: np.ndarray, size_mm: int,
            value: float, rng: np.random.Generator, margin_mm: float) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    r = size_mm / 2.0 / UNIT_MM
    cv, cu = place_disc(rng, allowed, allowed, v, u, r, px, margin=margin_mm / UNIT_MM)
    cover = ellipse(v, u, cv, cu, r, r, px)
    paint(hu, cover, value)
    return cover, box_of(cover, ((cv + 1) * px - 0.5, (cu + 1) * px - 0.5))


def _finish(hu: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    hu = blur(hu, 0.6 * size / 224) + rng.normal(0.0, NOISE_HU, hu.shape)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def draw_chest_ct(rng: np.random.Generator, size: int, kinds: list[str]) -> Rendering:
    """A chest slice at heart level: lungs with vessels, heart, aorta, spine, ribs, sternum."""
    v, u = grid(size)
    px = size / 2.0
    hu, rv, ru = _body(v, u, px, rng)
    cavity = ellipse(v, u, 0.05, 0.0, rv - 0.11, ru - 0.13, px)
    vessels = smooth_noise(rng, v.shape, 1.1 * size / 224)
    lungs = {}
    for side in SIDES:
        s = SIGN[side]
        medial = np.clip(0.5 + (s * u - 0.12) * px, 0.0, 1.0)
        lungs[side] = ellipse(v, u, 0.0, s * 0.37, 0.44, 0.31, px) * cavity * medial
        paint(hu, lungs[side], LUNG + 15 * vessels)
        hilum = np.exp(-np.hypot(v + 0.02, u - s * 0.15) / 0.25)
        paint(hu, lungs[side] * np.clip((vessels - 2.4 + 0.9 * hilum) * 2.0, 0.0, 1.0), SOFT - 20)

    findings: list[Finding] = []
    blocked = np.zeros(v.shape, dtype=bool)
    if "pleural_effusion" in kinds:
        side = str(rng.choice(SIDES))
        s = SIGN[side]
        t = rng.uniform(0.06, 0.18)  # greatest thickness (normalised), posteriorly: the patient lies supine
        fluid = lungs[side] * (1.0 - ellipse(v, u, -t, s * 0.37, 0.44, 0.31, px))
        paint(hu, fluid, WATER)
        blocked |= fluid > 0.2
        findings.append(Finding("pleural_effusion", side, None, int(round(t * UNIT_MM)), box_of(fluid)))

    heart = ellipse(v, u, -0.1, 0.09, 0.25, 0.22, px, angle=0.5)
    paint(hu, heart, SOFT)
    paint(hu, ellipse(v, u, -0.2, -0.07, 0.055, 0.055, px), SOFT)  # ascending aorta
    paint(hu, ellipse(v, u, 0.27, 0.1, 0.055, 0.055, px), SOFT)  # descending aorta
    paint(hu, ellipse(v, u, 0.25, -0.03, 0.03, 0.03, px), SOFT - 10)  # oesophagus
    paint(hu, ellipse(v, u, 0.05 - rv + 0.08, 0.0, 0.03, 0.065, px), 600.0)  # sternum
    _spine(hu, v, u, px, 0.05 + rv - 0.23)
    for sign in (-1.0, 1.0):  # ribs: bony ovals round the cavity, clear of sternum and spine
        for theta in np.linspace(-1.1, 1.15, 7):
            cv = 0.05 + (rv - 0.08) * np.sin(theta)
            cu = sign * (ru - 0.1) * np.cos(theta)
            paint(hu, ellipse(v, u, cv, cu, 0.028, 0.022, px), rng.uniform(650, 900))

    if "lung_nodule" in kinds:
        side = str(rng.choice(SIDES))
        size_mm = int(rng.integers(5, 26))
        allowed = (lungs[side] > 0.5) & (heart < 0.1) & ~blocked
        _, box = _lesion(hu, v, u, px, allowed, size_mm, rng.uniform(20, 50), rng, 4.0)
        findings.append(Finding("lung_nodule", side, None, size_mm, box))
    mm = FIELD_MM / size
    return Rendering(pixels=_finish(hu, rng, size), findings=findings, spacing_mm=(mm, mm), display_size=size,
                     window=LUNG_WINDOW)


def draw_abdomen_ct(rng: np.random.Generator, size: int, kinds: list[str]) -> Rendering:
    """An upper-abdomen slice (non-contrast): liver (patient's right), stomach, spleen, kidneys, aorta, IVC, spine."""
    v, u = grid(size)
    px = size / 2.0
    hu, rv, ru = _body(v, u, px, rng)
    cavity = ellipse(v, u, 0.05, 0.0, rv - 0.1, ru - 0.12, px)
    others = np.zeros(v.shape)  # what the liver must not overlap (it is painted last)

    def organ(cover: np.ndarray, value: float | np.ndarray) -> None:
        nonlocal others
        paint(hu, cover, value)
        others = np.maximum(others, cover)

    stomach = ellipse(v, u, -0.2, 0.3, 0.2, 0.18, px) * cavity
    organ(stomach, 25.0)
    paint(hu, stomach * np.clip(0.5 - (v + 0.3) * px, 0.0, 1.0), AIR)  # gas floats anteriorly
    organ(ellipse(v, u, 0.16, 0.55, 0.22, 0.1, px, angle=-0.6) * cavity, 45.0)  # spleen
    for _ in range(4):  # bowel loops with a little gas
        cv, cu = rng.uniform(-0.38, 0.0), rng.uniform(0.0, 0.35)
        organ(ellipse(v, u, cv, cu, 0.07, 0.08, px) * cavity, 20.0)
        paint(hu, ellipse(v, u, cv - 0.03, cu, 0.02, 0.03, px) * cavity, AIR)
    kidneys = {}
    for side in SIDES:
        s = SIGN[side]
        organ(ellipse(v, u, 0.27, s * 0.34, 0.19, 0.135, px, angle=-s * 0.5), FAT)  # perirenal fat
        kidney = ellipse(v, u, 0.27, s * 0.34, 0.15, 0.1, px, angle=-s * 0.5)
        paint(hu, kidney, 35.0)
        sinus = ellipse(v, u, 0.25, s * 0.26, 0.04, 0.025, px)  # renal sinus fat at the hilum
        paint(hu, sinus, FAT + 40)
        kidneys[side] = kidney
        organ(ellipse(v, u, 0.36, s * 0.13, 0.07, 0.055, px), SOFT + 5)  # psoas
    organ(ellipse(v, u, 0.22, 0.06, 0.05, 0.05, px), SOFT)  # aorta
    organ(ellipse(v, u, 0.17, -0.1, 0.04, 0.055, px), SOFT)  # IVC
    _spine(hu, v, u, px, 0.05 + rv - 0.21)
    liver = ellipse(v, u, -0.05, -0.33, 0.40, 0.42, px) * cavity * np.clip(0.5 - (u - 0.12) * px, 0.0, 1.0)
    liver *= 1.0 - others
    paint(hu, liver, LIVER + 4 * smooth_noise(rng, v.shape, 2.0))

    findings: list[Finding] = []
    if "liver_lesion" in kinds:
        size_mm = int(rng.integers(8, 41))
        detail = str(rng.choice(["hypodense", "hyperdense"]))
        value = rng.uniform(5, 15) if detail == "hypodense" else rng.uniform(85, 95)
        _, box = _lesion(hu, v, u, px, liver > 0.99, size_mm, value, rng, 6.0)
        findings.append(Finding("liver_lesion", "right", None, size_mm, box, detail))
    if "kidney_stone" in kinds:  # calculi: why non-contrast CT is done
        side = str(rng.choice(SIDES))
        size_mm = int(rng.integers(3, 13))
        _, box = _lesion(hu, v, u, px, kidneys[side] > 0.5, size_mm, rng.uniform(500, 1000), rng, 2.0)
        findings.append(Finding("kidney_stone", side, None, size_mm, box))
    mm = FIELD_MM / size
    return Rendering(pixels=_finish(hu, rng, size), findings=findings, spacing_mm=(mm, mm), display_size=size,
                     window=ABDOMEN_WINDOW)


FOCAL = frozenset({"lung_nodule", "liver_lesion", "kidney_stone"})
SERIES_SLICES, SERIES_MM = 11, 5.0
MAX_HALF_EXTENT = 2  # a focal lesion shows on at most 2 slices either side of its centre


def draw_ct_series(draw, rng: np.random.Generator, size: int, kinds: list[str]) -> Rendering:
    """An axial series of SERIES_SLICES slices from a slice drawer: the same anatomy on every slice
    (the body as a cylinder, with fresh noise per slice), effusions on all, and the focal lesions
    (nodule, liver lesion, stone) only on the slices around a centre slice that the middle slice
    misses. Boxes are on that centre slice, which each focal finding records."""
    start = rng.bit_generator.state
    lesioned = draw(rng, size, kinds)
    after = rng.bit_generator.state
    rng.bit_generator.state = start  # the same draws up to the first focal lesion: the same anatomy
    plain = draw(rng, size, [k for k in kinds if k not in FOCAL])
    rng.bit_generator.state = after
    focal = [f for f in lesioned.findings if f.kind in FOCAL]
    half = min(MAX_HALF_EXTENT, max((int(f.size_mm / 2 // SERIES_MM) for f in focal), default=0))
    middle = SERIES_SLICES // 2
    centres = [k for k in range(SERIES_SLICES) if abs(k - middle) > half]
    centre = int(rng.choice(centres))
    stack = np.stack([(lesioned if abs(k - centre) <= half and focal else plain).pixels
                      for k in range(SERIES_SLICES)]).astype(np.float32)
    stack = np.clip(np.rint(stack + rng.normal(0.0, NOISE_HU / 2, stack.shape)), -1024, 3071).astype(np.int16)
    findings = [replace(f, slice=centre) if f.kind in FOCAL else f for f in lesioned.findings]
    return replace(lesioned, pixels=stack, findings=findings, spacing_mm=(*lesioned.spacing_mm, SERIES_MM))
