"""`load_study`: one entry point for paths, folders and raw bytes; picks the reader by
suffix, then by magic bytes, then by the caller's MIME hint."""

from __future__ import annotations

import gzip
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from medlava.errors import ImagingError
from medlava.imaging.dicom import looks_like_dicom, read_dicom, read_dicom_series
from medlava.imaging.nifti import read_nifti
from medlava.imaging.raster import read_raster
from medlava.imaging.study import MAX_PIXELS, Study
from medlava.imaging.windowing import resolve_preset

SUPPORTED = "DICOM (.dcm file or a folder of slices), NIfTI (.nii, .nii.gz), PNG, JPEG"
BYTES_NAME = "<bytes>"

_SUFFIX_KINDS = {
    ".dcm": "dicom", ".dicom": "dicom", ".dic": "dicom", ".ima": "dicom",
    ".nii": "nifti", ".png": "raster", ".jpg": "raster", ".jpeg": "raster",
}
_MIME_KINDS = {
    "application/dicom": "dicom", "application/dicom+binary": "dicom", "image/dicom": "dicom",
    "image/png": "raster", "image/jpeg": "raster", "image/jpg": "raster", "image/pjpeg": "raster",
    "application/x-nifti": "nifti", "application/nifti": "nifti", "image/nifti": "nifti",
}
_HEAD = 352  # enough for the NIfTI-1 magic at 344
T = TypeVar("T")


def kind_from_name(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return "nifti"
    return _SUFFIX_KINDS.get(os.path.splitext(lower)[1])


def sniff(head: bytes, gunzip: bytes | None = None) -> str | None:
    """The reader for these leading bytes; `gunzip` is the decompressed head of a gzip file."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff"):
        return "raster"
    if head[128:132] == b"DICM":
        return "dicom"
    for h in (head, gunzip or b""):
        if h[344:348] in (b"n+1\x00", b"ni1\x00") or h[4:8] == b"n+2\x00":
            return "nifti"
    if looks_like_dicom(head):  # a bare dataset without the Part 10 preamble
        return "dicom"
    return None


def _gunzip_head(fileobj: io.BufferedIOBase) -> bytes | None:
    try:
        with gzip.GzipFile(fileobj=fileobj) as gz:
            return gz.read(_HEAD)
    except (OSError, EOFError):
        return None


def _sniff_bytes(data: bytes) -> str | None:
    gunzip = _gunzip_head(io.BytesIO(data)) if data[:2] == b"\x1f\x8b" else None
    return sniff(data[:_HEAD], gunzip)


def _sniff_path(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(_HEAD)
        gunzip = None
        if head[:2] == b"\x1f\x8b":
            f.seek(0)
            gunzip = _gunzip_head(f)
    return sniff(head, gunzip)


def _unsupported(name: str) -> ImagingError:
    return ImagingError(f"{name} is not a supported image format (supported: {SUPPORTED})")


def load_study(
    source: str | os.PathLike | bytes,
    *,
    window: str | None = None,
    mime: str | None = None,
    modality: str | None = None,
    max_pixels: int = MAX_PIXELS,
    key_slices: int | None = 1,
) -> Study:
    """Read a file, a DICOM folder or raw bytes into a `Study` of 8-bit key images.

    window: a CT preset name (see WINDOW_PRESETS) overriding the file's own window.
    mime: a hint for bytes whose magic is not recognised (e.g. bare DICOM datasets).
    modality: overrides the modality the file states (or the format's default).
    key_slices: how many slices of a volume to keep (evenly spaced in its middle 60 %); None keeps all.
    Every failure the input can cause raises ImagingError naming the file.
    """
    if window is not None:
        resolve_preset(window)  # fail fast with the valid names, whatever the format
    if key_slices is not None and key_slices < 1:
        raise ImagingError(f"key_slices must be at least 1, got {key_slices}")
    mod = modality.strip().upper() if modality else None
    opts = {"window": window, "modality": mod, "max_pixels": max_pixels, "n_key": key_slices}

    if isinstance(source, bytes | bytearray | memoryview):
        src: Path | bytes = bytes(source)
        name = BYTES_NAME
        if not src:
            raise ImagingError(f"{name} is empty")
        hint = (mime or "").split(";")[0].strip().lower()
        kind = _sniff_bytes(src) or _MIME_KINDS.get(hint)
    else:
        path = Path(source)
        name = path.name or str(path)
        if not path.exists():
            raise ImagingError(f"no such file: {name}")
        if path.is_dir():
            return _guard(name, lambda: read_dicom_series(path, **opts))
        src = path
        kind = kind_from_name(name)
        if kind is None:
            kind = _guard(name, lambda: _sniff_path(path))
            if kind == "nifti":
                src = _guard(name, path.read_bytes)  # nibabel picks its reader by suffix
        elif path.stat().st_size == 0:
            raise ImagingError(f"{name} is empty")

    if kind == "dicom":
        return _guard(name, lambda: read_dicom(src, name, **opts))
    if kind == "nifti":
        return _guard(name, lambda: read_nifti(src, name, **opts))
    if kind == "raster":
        return _guard(name, lambda: read_raster(src, name, modality=mod, max_pixels=max_pixels))
    raise _unsupported(name)


def _guard(name: str, fn: Callable[[], T]) -> T:
    """Last line of defence: no raw library exception leaves this package. Library warnings
    are silenced because pydicom's quote element values, and our errors say what matters."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except ImagingError:
        raise
    except MemoryError:
        raise ImagingError(f"{name} is too large to load into memory") from None
    except OSError as e:
        raise ImagingError(f"cannot read {name}: {e.strerror or 'I/O error'}") from e
    except Exception as e:
        raise ImagingError(f"{name} could not be read ({type(e).__name__})") from e
