"""The explanation as a picture: a heatmap blended over the displayed image, the peak and the box drawn."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

MAX_ALPHA = 0.6  # the hottest pixels show 40 % of the image underneath; cold ones show all of it
PEAK_COLOUR, BOX_COLOUR = (255, 255, 255), (0, 255, 0)


def jet(t: np.ndarray) -> np.ndarray:
    """Jet-like colours for values in [0, 1] -> uint8 RGB (blue, cyan, yellow, red)."""
    t = np.clip(t, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # where red, green and blue peak
    rgb = np.clip(1.5 - np.abs(4.0 * (t - centres)), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def overlay_image(image: Image.Image, heat: np.ndarray, peak, box) -> Image.Image:
    """`heat` ([h, w], 0..1, the image's own size) over `image`, alpha growing with the heat."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if heat.shape != base.shape[:2]:
        raise ValueError(f"heat map {heat.shape} does not match the image ({base.shape[0]}, {base.shape[1]})")
    alpha = (MAX_ALPHA * np.clip(heat, 0.0, 1.0))[..., None]
    out = Image.fromarray(((1 - alpha) * base + alpha * jet(heat)).round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 160))
    draw.rectangle([round(v) for v in box], outline=BOX_COLOUR, width=width)
    x, y = peak
    r = 3 * width + 2
    draw.line([(x - r, y), (x + r, y)], fill=PEAK_COLOUR, width=width)
    draw.line([(x, y - r), (x, y + r)], fill=PEAK_COLOUR, width=width)
    draw.ellipse([x - r, y - r, x + r, y + r], outline=PEAK_COLOUR, width=width)
    return out


def write_overlay(image: Image.Image, heat: np.ndarray, peak, box, path: str | os.PathLike) -> None:
    overlay_image(image, heat, peak, box).save(path, format="PNG")
