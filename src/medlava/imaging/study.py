"""The `Study`: display-ready key images plus the few facts about them that are safe to keep."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from medlava.errors import ImagingError

# Total pixels per study (all frames/slices); bounds memory before any pixel data is decoded.
MAX_PIXELS = 64_000_000

# The only metadata keys a Study may carry: none of them can identify a patient.
# Descriptions, names, IDs, dates, UIDs and institutions are deliberately absent.
SAFE_METADATA_KEYS = frozenset(
    {
        "Modality",
        "BodyPartExamined",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "PixelSpacing",
        "SliceThickness",
        "Manufacturer",
        "Window",
        "SourceFormat",
        "SliceCount",
        "KeySlices",
        "SlicePositions",
    }
)


@dataclass(repr=False)
class Study:
    """One image or volume, reduced to 8-bit key images (uint8, HxW grey or HxWx3 RGB)."""

    images: list[np.ndarray]
    modality: str
    spacing: tuple[float, ...] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.images:
            raise ImagingError(f"{self.source or 'study'} has no images")
        for img in self.images:
            if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
                raise ValueError(f"Study images must be uint8 HxW or HxWx3, got {img.dtype} {img.shape}")
        unsafe = set(self.metadata) - SAFE_METADATA_KEYS
        if unsafe:
            raise ValueError(f"metadata keys outside the safe whitelist: {sorted(unsafe)}")

    def to_pil(self, index: int | None = None) -> Image.Image:
        """Key image `index` (default: the middle one) as a PIL image in its own mode (L or RGB)."""
        i = len(self.images) // 2 if index is None else index
        return Image.fromarray(self.images[i])

    def key_image(self) -> Image.Image:
        """The middle key image as RGB, the form vision models expect."""
        return self.to_pil().convert("RGB")

    def __repr__(self) -> str:
        shapes = ", ".join("x".join(str(s) for s in img.shape) for img in self.images)
        return (
            f"Study(source={self.source!r}, modality={self.modality!r}, "
            f"images=[{shapes}], spacing={self.spacing})"
        )


def check_pixel_count(name: str, n_pixels: int, limit: int) -> None:
    """Refuse oversized studies before their pixel data is decoded."""
    if n_pixels > limit:
        raise ImagingError(f"{name} is too large ({n_pixels} pixels > limit {limit})")


def key_slice_indices(depth: int, n: int | None = 1) -> list[int]:
    """Up to `n` evenly spaced slice indices in the middle 60% of a stack; n=1 gives the middle,
    n=None every slice (volume analysis)."""
    if depth < 1:
        raise ValueError("depth must be >= 1")
    if n is None:
        return list(range(depth))
    mid = depth // 2
    if n <= 1 or depth == 1:
        return [mid]
    # Symmetric about the middle so that an odd n always includes the middle slice itself.
    half = 0.3 * (depth - 1)
    idx = np.rint(mid + np.linspace(-half, half, n)).astype(int)
    return sorted({int(i) for i in np.clip(idx, 0, depth - 1)})


def key_slices(volume: np.ndarray, n: int = 1) -> list[np.ndarray]:
    """The key slices (axis 0) of a volume; see `key_slice_indices`."""
    return [volume[i] for i in key_slice_indices(volume.shape[0], n)]


def safe_text(value: object, limit: int = 64) -> str:
    """A metadata value as one short line (file values may carry control characters)."""
    text = " ".join(str(value).split())
    return text[:limit]
