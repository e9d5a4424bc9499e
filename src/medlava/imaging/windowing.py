"""Window maths: stored values (HU, MR signal, ...) to 8-bit display values."""

from __future__ import annotations

import numpy as np

from medlava.errors import ImagingError

# (center, width) in Hounsfield units, the usual CT reading windows.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600, 1500),
    "mediastinum": (40, 400),
    "bone": (400, 1800),
    "brain": (40, 80),
}


def resolve_preset(name: str) -> tuple[float, float]:
    """The (center, width) of a preset, or an ImagingError listing the valid names."""
    try:
        return WINDOW_PRESETS[name.lower()]
    except KeyError:
        valid = ", ".join(sorted(WINDOW_PRESETS))
        raise ImagingError(f"unknown window preset {name!r} (valid presets: {valid})") from None


def apply_window(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI function (PS3.3 C.11.2.1.2.1) mapped to 0..255, rounded half up.

    The linear ramp clipped to [0, 255] equals the standard's three-case definition:
    its ends sit exactly on c - 0.5 -/+ (w - 1) / 2.
    """
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    x = np.asarray(arr, dtype=np.float64)
    c = float(center) - 0.5
    if width == 1:  # a step: the ramp has no length
        y = np.where(x > c, 255.0, 0.0)
    else:
        y = ((x - c) / (float(width) - 1.0) + 0.5) * 255.0
    return np.floor(np.clip(y, 0.0, 255.0) + 0.5).astype(np.uint8)


def minmax_to_uint8(arr: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Stretch to 0..255 between the 0.5 and 99.5 percentiles (robust to a few hot pixels) of
    `reference` (default: `arr` itself).

    Falls back to the true min/max when the percentiles coincide (a small bright object on
    a flat background), and gives zeros for a constant image instead of dividing by zero.
    A volume passes its middle slice as the reference: then that slice looks the same however
    many slices are loaded, and every slice is shown on one scale.
    """
    x = np.asarray(arr, dtype=np.float64)
    ref = x if reference is None else np.asarray(reference, dtype=np.float64)
    finite = ref[np.isfinite(ref)]
    if finite.size == 0:
        return np.zeros(x.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    y = (np.nan_to_num(x, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo) * 255.0
    return np.floor(np.clip(y, 0.0, 255.0) + 0.5).astype(np.uint8)
