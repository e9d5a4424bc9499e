"""NIfTI-1/2 (.nii, .nii.gz) to a `Study` (nibabel): first volume, RAS+, axial key slices."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from medlava.errors import ImagingError
from medlava.imaging.study import Study, check_pixel_count, key_slice_indices
from medlava.imaging.windowing import apply_window, minmax_to_uint8, resolve_preset

Source = Path | bytes


@contextmanager
def _opened(src: Source, name: str) -> Iterator[nib.Nifti1Image | nib.Nifti2Image]:
    """The image, read lazily so the size check precedes reading (bytes go via a temp file,
    which also bounds a .nii.gz that would inflate far beyond its first volume)."""
    with tempfile.TemporaryDirectory(prefix="medlava-nii-") as tmp:
        if isinstance(src, bytes):
            if src[344:348] == b"ni1\x00":
                raise ImagingError(f"{name} is a NIfTI header without its image (.hdr/.img pairs are not supported)")
            path = Path(tmp) / ("upload.nii.gz" if src[:2] == b"\x1f\x8b" else "upload.nii")
            path.write_bytes(src)
        else:
            path = src
        try:
            img = nib.load(path)
        except Exception as e:  # nibabel/gzip/zlib raise many types on damaged input
            raise ImagingError(f"{name} is truncated or corrupt (not a readable NIfTI file)") from e
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise ImagingError(f"{name} is not a NIfTI file")
        yield img


def _first_volume(img: nib.Nifti1Image | nib.Nifti2Image, name: str, max_pixels: int) -> nib.Nifti1Image:
    """The first 3-D volume (index 0 of every axis past the third), reoriented to RAS+."""
    shape = img.shape
    if len(shape) < 2:
        raise ImagingError(f"{name} has {len(shape)} dimension(s); an image needs at least 2")
    spatial = shape[:3]
    check_pixel_count(name, int(np.prod(spatial)), max_pixels)
    # Slice before reading: only the first volume of a 4-D series is ever loaded.
    index = (slice(None),) * len(spatial) + (0,) * (len(shape) - len(spatial))
    try:
        data = np.asarray(img.dataobj[index])
    except Exception as e:
        raise ImagingError(f"{name} is truncated or corrupt") from e
    if data.dtype.fields is not None:
        raise ImagingError(f"{name} has RGB voxels, which are not supported")
    if np.iscomplexobj(data):
        data = np.abs(data)
    data = data.astype(np.float32)
    while data.ndim < 3:
        data = data[..., None]
    return nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))


def _display(axial: np.ndarray) -> np.ndarray:
    """An x/y slice of an RAS+ volume as radiologists view it: anterior up, patient right on the left."""
    return np.rot90(axial)[:, ::-1]


def read_nifti(src: Source, name: str, *, window: str | None = None, modality: str | None = None,
               max_pixels: int, n_key: int | None = 1) -> Study:
    with _opened(src, name) as img:
        canon = _first_volume(img, name, max_pixels)
    volume = np.asarray(canon.dataobj, dtype=np.float32)
    depth = volume.shape[2]
    idx = key_slice_indices(depth, n_key)
    slices = np.stack([_display(volume[:, :, k]) for k in idx])
    if window:  # presets are in HU: meaningful for CT NIfTI
        c, w = resolve_preset(window)
        shown, label = apply_window(slices, c, w), f"{window.lower()} {c:g}/{w:g}"
    else:
        middle = _display(volume[:, :, depth // 2])  # the scale of the key slice, whatever is loaded
        shown, label = minmax_to_uint8(slices, reference=middle), "min/max"
    zx, zy, zz = (float(z) for z in canon.header.get_zooms()[:3])
    mod = modality or "MR"
    meta = {
        "Modality": mod,
        "Rows": str(shown.shape[1]),
        "Columns": str(shown.shape[2]),
        "PixelSpacing": f"{zy:g}\\{zx:g}",
        "Window": label,
        "SourceFormat": "NIfTI",
    }
    spacing: tuple[float, ...] = (zy, zx)
    if depth > 1:
        spacing += (zz,)
        meta.update(SliceThickness=f"{zz:g}", SliceCount=str(depth), KeySlices=",".join(map(str, idx)))
    return Study(images=list(shown), modality=mod, spacing=spacing, metadata=meta, source=name)
