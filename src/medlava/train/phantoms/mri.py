"""Brain MRI phantom (T1-like: fat bright, CSF dark, an enhancing mass bright) as a NIfTI volume.

Drawn in DISPLAY coordinates (slice, row, column; anterior up, the patient's right on the
image's left), then turned into the RAS+ data array by inverting the transform medlava's NIfTI
reader applies, so what the reader shows is exactly what was drawn.
"""

from __future__ import annotations

import numpy as np

from medlava.train.phantoms.shapes import blur, box_of, coverage, grid, radius
from medlava.train.phantoms.study import SIDES, Finding, Rendering

FIELD_MM = 224.0  # in-plane field of view, whatever the matrix
UNIT_MM = FIELD_MM / 2  # one normalised unit
SLICES, SLICE_MM = 24, 4.0
KEY = SLICES // 2  # the slice load_study shows (the middle one)
SIGN = {"right": -1.0, "left": 1.0}  # where on the image (u) the patient's side lies
SCALP, SKULL, CSF, GREY, WHITE, MASS, EDEMA = 750.0, 110.0, 160.0, 470.0, 610.0, 980.0, 380.0


def display_to_ras(display: np.ndarray) -> np.ndarray:
    """(slice, row, col) display stack -> (x, y, z) RAS+ array: the inverse of showing slice z
    as np.rot90(data[:, :, z])[:, ::-1] (anterior up, patient's right on the left)."""
    return np.rot90(display[:, :, ::-1], k=-1, axes=(1, 2)).transpose(1, 2, 0)


def ras_affine(n: int, spacing: float) -> np.ndarray:
    """Diagonal RAS+ affine centring the volume on the scanner origin."""
    affine = np.diag([spacing, spacing, SLICE_MM, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * spacing, -(n - 1) / 2 * spacing, -(SLICES - 1) / 2 * SLICE_MM]
    return affine


def draw_brain_mri(rng: np.random.Generator, size: int, kinds: list[str], off_centre: bool = False) -> Rendering:
    """A ~ size/2 x size/2 x 24 head volume showing `kinds` ("brain_mass", "hydrocephalus").

    off_centre: the mass is centred 3-7 slices above or below the middle slice (a world for volume
    analysis, where looking at the middle slice alone misses or cuts lesions); otherwise on it.
    """
    n = max(size // 2, 16)
    spacing = FIELD_MM / n
    px = n / 2.0
    v2, u2 = grid(n)
    v, u = v2[None].astype(np.float32), u2[None].astype(np.float32)  # float32: 3-D, so half the traffic
    z = ((np.arange(SLICES, dtype=np.float32) - KEY) * SLICE_MM / UNIT_MM)[:, None, None]  # key slice at 0
    cz = rng.uniform(-0.08, 0.0)  # head centre a little below the key slice
    rv, ru, rz = rng.uniform(0.80, 0.86), rng.uniform(0.64, 0.70), 0.72
    head = radius((v, u, z), (0.0, 0.0, cz), (rv, ru, rz))
    vol = np.zeros((SLICES, n, n), dtype=np.float32)
    edge = ru * px
    for scale, value in ((1.0, SCALP), (0.94, SKULL), (0.885, CSF), (0.87, GREY), (0.68, WHITE)):
        vol += coverage(head / scale, edge * scale) * (value - vol)
    brain = coverage(head / 0.87, edge * 0.87)
    vol += brain * np.clip(0.5 - (np.abs(u) - 0.006) * px, 0.0, 1.0) * (CSF + 60 - vol)  # falx

    findings: list[Finding] = []
    big = "hydrocephalus" in kinds
    vent = np.zeros_like(vol)
    for sign in (-1.0, 1.0):  # lateral ventricles, their frontal horns diverging
        r_v = radius((v, u, z), (-0.05, sign * (0.12 if big else 0.09), cz + 0.09),
                     (0.34 if big else 0.26, 0.12 if big else 0.065, 0.16), angle=-sign * 0.15)
        vent = np.maximum(vent, coverage(r_v, (0.12 if big else 0.065) * px))
    vol += vent * (CSF - vol)
    if big:
        box = box_of(vent[KEY])
        findings.append(Finding("hydrocephalus", None, None, int(round((box[2] - box[0]) * spacing)), box))

    if "brain_mass" in kinds:
        side = str(rng.choice(SIDES))
        size_mm = int(rng.integers(10, 41))
        r = size_mm / 2.0 / UNIT_MM
        lo, hi = (0.24 if big else 0.17) + r, 0.56 - r
        cu = SIGN[side] * (rng.uniform(lo, hi) if hi > lo else (lo + hi) / 2)
        reach = np.sqrt(max(0.0, 1.0 - (abs(cu) / (ru * 0.8)) ** 2)) * rv * 0.8 - r  # stay inside the brain
        cv = rng.uniform(-max(reach, 0.0), max(reach, 0.0))
        halo = r + rng.uniform(4.0, 8.0) / UNIT_MM
        at = KEY
        if off_centre:  # drawn last, so worlds without it keep every other value
            at = KEY + int(rng.choice([-1, 1])) * int(rng.integers(3, 8))
            cv, cu = cv * 0.9, cu * 0.9  # the brain is smaller away from its middle
        mz = float(z[at, 0, 0])  # the mass's centre height
        vol += coverage(radius((v, u, z), (cv, cu, mz), (halo, halo, halo)), halo * px) * brain * (EDEMA - vol)
        mass = coverage(radius((v, u, z), (cv, cu, mz), (r, r, r)), r * px)
        vol += mass * (MASS - vol)
        fallback = ((cv + 1) * px - 0.5, (cu + 1) * px - 0.5)
        findings.append(Finding("brain_mass", side, None, size_mm, box_of(mass[at], fallback),
                                slice=at if off_centre else None))

    vol = blur(vol, 0.6 * n / 112, axes=(1, 2))
    # Magnitude images: Rician-like noise, quieter in the air (which also keeps files small).
    sd = 1.5 + 2.5 * coverage(head, edge)
    vol = np.abs(vol + sd * rng.standard_normal(vol.shape, dtype=np.float32))
    data = display_to_ras(np.clip(np.rint(vol), 0, 32767).astype(np.int16))
    return Rendering(pixels=np.ascontiguousarray(data), findings=findings, spacing_mm=(spacing, spacing, SLICE_MM),
                     display_size=n, affine=ras_affine(n, spacing))
