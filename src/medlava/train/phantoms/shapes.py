"""Drawing primitives for the phantoms: coordinate grids, soft-edged shapes, blur and noise.

Everything is vectorised numpy (no per-pixel Python, no scipy), so a whole world draws in
seconds. Shapes return coverage in [0, 1] with a one-pixel linear edge: anti-aliased edges
look like anatomy rather than like clip art, and blend with `paint`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

Box = tuple[int, int, int, int]  # x0, y0, x1, y1: pixels img[y0:y1, x0:x1] (ends exclusive)


@lru_cache(maxsize=16)
def grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (v, u) coordinates of the pixel centres of an n x n image.

    v runs from -1 (top row) to 1 (bottom row), u from -1 (left column) to 1 (right column);
    one normalised unit is n / 2 pixels. Cached and read-only: every study of a size shares it.
    """
    c = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    v, u = np.meshgrid(c, c, indexing="ij")
    v.setflags(write=False)
    u.setflags(write=False)
    return v, u


def radius(coords: tuple[np.ndarray, ...], centre: tuple[float, ...], radii: tuple[float, ...],
           angle: float = 0.0) -> np.ndarray:
    """Normalised elliptical radius (1 on the boundary); `angle` (radians) rotates the first two axes."""
    d = [c - m for c, m in zip(coords, centre, strict=True)]
    if angle:
        ca, sa = np.cos(angle), np.sin(angle)
        d[0], d[1] = ca * d[0] - sa * d[1], sa * d[0] + ca * d[1]
    return np.sqrt(sum((di / r) ** 2 for di, r in zip(d, radii, strict=True)))


def coverage(r: np.ndarray, edge_px: float) -> np.ndarray:
    """Coverage from a normalised radius: 1 inside, 0 outside, a ~1 pixel ramp at r == 1.

    edge_px is the shape's smaller radius in pixels, turning (r - 1) into a pixel distance.
    """
    return np.clip(0.5 - (r - 1.0) * max(edge_px, 0.5), 0.0, 1.0)


def ellipse(v: np.ndarray, u: np.ndarray, cv: float, cu: float, rv: float, ru: float,
            px: float, angle: float = 0.0) -> np.ndarray:
    """Coverage of an ellipse on a `grid` (v, u); px = pixels per normalised unit.

    Only the ellipse's bounding square is computed: most shapes are small, and this is the
    inner loop of the whole generator.
    """
    out = np.zeros(v.shape)
    reach = max(rv, ru) + 2.0 / px
    r0, r1 = np.searchsorted(v[:, 0], [cv - reach, cv + reach])
    c0, c1 = np.searchsorted(u[0, :], [cu - reach, cu + reach])
    if r1 > r0 and c1 > c0:
        sub = (slice(r0, r1), slice(c0, c1))
        out[sub] = coverage(radius((v[sub], u[sub]), (cv, cu), (rv, ru), angle), min(rv, ru) * px)
    return out


def band(dist: np.ndarray, half_width: float, px: float) -> np.ndarray:
    """Coverage of a band |dist| <= half_width (normalised units), e.g. a rib arc or a pleural line."""
    return np.clip(0.5 - (np.abs(dist) - half_width) * px, 0.0, 1.0)


def segment_distance(v: np.ndarray, u: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Distance from every point to the segment a-b (points given as (v, u))."""
    av, au = a
    bv, bu = b
    dv, du = bv - av, bu - au
    t = np.clip(((v - av) * dv + (u - au) * du) / (dv * dv + du * du), 0.0, 1.0)
    return np.hypot(v - (av + t * dv), u - (au + t * du))


def paint(img: np.ndarray, cover: np.ndarray, value: float | np.ndarray) -> None:
    """Blend `value` into `img` in place where `cover` > 0 (the painter's algorithm)."""
    img += cover * (value - img)


def _kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3.0 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return k / k.sum()


def blur(img: np.ndarray, sigma: float, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Separable Gaussian blur along `axes` (default: all), edges padded by replication.

    Sums shifted copies of the array, one per kernel tap: a few dozen vectorised adds
    instead of np.apply_along_axis's Python loop over rows.
    """
    dtype = img.dtype if img.dtype in (np.float32, np.float64) else np.float64
    if sigma <= 0:
        return img.astype(dtype, copy=True)
    out = np.asarray(img, dtype=dtype)
    k = _kernel(sigma)
    r = len(k) // 2
    for ax in range(out.ndim) if axes is None else axes:
        pad = [(0, 0)] * out.ndim
        pad[ax] = (r, r)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[ax]
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            acc += w * padded.take(np.arange(i, i + n), axis=ax)
        out = acc
    return out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise blurred by `sigma` pixels and rescaled to unit standard deviation (texture)."""
    field = blur(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-12)


def box_of(cover: np.ndarray, fallback: tuple[float, float] | None = None) -> Box:
    """Bounding box (x0, y0, x1, y1; ends exclusive) of the pixels more than half covered.

    fallback: (row, col) of a shape too small to cover any pixel by half; it gets that pixel.
    """
    rows = np.flatnonzero(cover.max(axis=1) > 0.5)
    cols = np.flatnonzero(cover.max(axis=0) > 0.5)
    if rows.size == 0 or cols.size == 0:
        if fallback is None:
            raise ValueError("empty shape has no bounding box")
        r = int(np.clip(fallback[0], 0, cover.shape[0] - 1))
        c = int(np.clip(fallback[1], 0, cover.shape[1] - 1))
        return c, r, c + 1, r + 1
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def to_pixel(coord: float, n: int) -> float:
    """A normalised coordinate as a (fractional) pixel index in an n-pixel axis."""
    return (coord + 1.0) * n / 2.0 - 0.5


def place_disc(rng: np.random.Generator, candidates: np.ndarray, allowed: np.ndarray, v: np.ndarray,
               u: np.ndarray, r: float, px: float, margin: float = 0.0, tries: int = 60) -> tuple[float, float]:
    """A centre (v, u), chosen among the `candidates` pixels, for a disc of radius r (normalised)
    lying, with `margin` to spare, as far as possible inside `allowed` (a boolean mask).

    The margin keeps a lesion's immediate surroundings inside its organ, so it stands out.
    Keeps the first sampled centre whose disc is at least 95 % inside, else the best one:
    a few dozen small window sums, never a full morphological erosion.
    """
    idx = np.flatnonzero(candidates)
    if idx.size == 0:
        raise ValueError("no room to place a finding")
    h, w = allowed.shape
    reach = r + margin
    rp = max(1, int(np.ceil(reach * px)))
    total = max(np.pi * (reach * px) ** 2, 1.0)  # the whole disc's area: parts off-image count as outside
    best, best_frac = (0.0, 0.0), -1.0
    for i in rng.choice(idx, size=min(tries, idx.size), replace=False):
        row, col = divmod(int(i), w)
        r0, r1, c0, c1 = max(0, row - rp), min(h, row + rp + 1), max(0, col - rp), min(w, col + rp + 1)
        inside = np.hypot(v[r0:r1, c0:c1] - v[row, col], u[r0:r1, c0:c1] - u[row, col]) <= reach
        frac = min(1.0, float(allowed[r0:r1, c0:c1][inside].sum()) / total)
        if frac > best_frac:
            best, best_frac = (float(v[row, col]), float(u[row, col])), frac
        if frac >= 0.95:
            break
    return best
