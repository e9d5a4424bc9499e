"""PNG and JPEG to a `Study` (Pillow): already display-ready, so only mode conversion."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medlava.errors import ImagingError
from medlava.imaging.study import Study, check_pixel_count
from medlava.imaging.windowing import minmax_to_uint8

Source = Path | bytes
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _to_array(im: Image.Image) -> np.ndarray:
    """uint8 HxW for greyscale, HxWx3 for everything with colour."""
    if im.mode in _HIGH_DEPTH_MODES:  # 16-bit/float grey: stretch to 8 bits
        return minmax_to_uint8(np.asarray(im))
    if im.mode in ("1", "L", "LA", "La"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))  # RGB, RGBA (alpha dropped), P, CMYK, YCbCr, ...


def _bomb_error(name: str, message: str, limit: int) -> ImagingError:
    found = re.search(r"\((\d+) pixels\)", message)  # Pillow states the size it refused
    n = int(found.group(1)) if found else None
    if n is not None and n > limit:
        return ImagingError(f"{name} is too large ({n} pixels > limit {limit})")
    return ImagingError(f"{name} is too large (over Pillow's decompression-bomb limit)")


def read_raster(src: Source, name: str, *, modality: str | None = None, max_pixels: int) -> Study:
    fp = io.BytesIO(src) if isinstance(src, bytes) else src
    try:
        with warnings.catch_warnings():  # our own pixel limit applies, not Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp, formats=["PNG", "JPEG"]) as im:
                width, height = im.size
                check_pixel_count(name, width * height, max_pixels)  # before load() decodes
                im.load()
                fmt = im.format or "image"
                # Phone photos of films carry their rotation in EXIF.
                arr = _to_array(ImageOps.exif_transpose(im))
    except ImagingError:
        raise
    except Image.DecompressionBombError as e:  # refused at open(), before our own check could run
        raise _bomb_error(name, str(e), max_pixels) from None
    except UnidentifiedImageError:
        raise ImagingError(f"{name} is not a PNG or JPEG image") from None
    except Exception as e:  # Pillow raises OSError/SyntaxError/ValueError on damaged files
        raise ImagingError(f"{name} is truncated or corrupt") from e
    mod = modality or "OT"
    meta = {
        "Modality": mod,
        "Rows": str(arr.shape[0]),
        "Columns": str(arr.shape[1]),
        "PhotometricInterpretation": "MONOCHROME2" if arr.ndim == 2 else "RGB",
        "SourceFormat": fmt,
    }
    return Study(images=[np.array(arr)], modality=mod, spacing=None, metadata=meta, source=name)
