"""DICOM files, multi-frame objects and folders of slices to a `Study` (pydicom).

Pipeline (as pydicom recommends): decode -> modality LUT (rescale to HU for CT) -> VOI
(window) -> our own 8-bit mapping -> MONOCHROME1 inversion. Only key slices are decoded;
the size limit is checked from the headers before any pixel data is touched.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medlava.errors import ImagingError
from medlava.imaging.study import Study, check_pixel_count, key_slice_indices, safe_text
from medlava.imaging.windowing import apply_window, minmax_to_uint8, resolve_preset

PLUGIN_HINT = "install a decoder: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_HEADER_FIELDS = ("BodyPartExamined", "PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames",
                  "SliceThickness", "Manufacturer")

Source = Path | bytes
Frame = tuple[Dataset, int | None, str]  # dataset, frame index (None: single-frame), file name


def looks_like_dicom(head: bytes) -> bool:
    """True for Part 10 files (DICM at 128) and for bare datasets starting with group 0002/0008."""
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    element = int.from_bytes(head[2:4], "little")
    return group in (0x0002, 0x0008) and element < 0x1000


def _head(src: Source) -> bytes:
    if isinstance(src, bytes):
        return src[:132]
    with open(src, "rb") as f:
        return f.read(132)


def read_dataset(src: Source, name: str, *, stop_before_pixels: bool = False) -> Dataset:
    """dcmread with our errors; `force` only for files that look like DICOM without a preamble."""
    head = _head(src)
    if not looks_like_dicom(head):
        raise ImagingError(f"{name} is not a DICOM file")
    force = head[128:132] != b"DICM"
    fp = io.BytesIO(src) if isinstance(src, bytes) else src
    try:
        ds = pydicom.dcmread(fp, force=force, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise ImagingError(f"{name} is not a DICOM file") from None
    except Exception as e:  # pydicom raises many types on damaged input
        raise ImagingError(f"{name} is truncated or corrupt") from e
    if "TransferSyntaxUID" not in ds.file_meta:
        # Bare datasets: pydicom detected the encoding, the decoders need it spelled out.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little is not False
            else ExplicitVRBigEndian)
    return ds


def _int(ds: Dataset, keyword: str, default: int, name: str) -> int:
    value = ds.get(keyword)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ImagingError(f"{name} is truncated or corrupt (bad {keyword})") from None


def _n_frames(ds: Dataset, name: str) -> int:
    return max(1, _int(ds, "NumberOfFrames", 1, name))


def _n_pixels(ds: Dataset, name: str) -> int:
    return _int(ds, "Rows", 0, name) * _int(ds, "Columns", 0, name) * _n_frames(ds, name)


def _require_image(ds: Dataset, name: str) -> None:
    if not any(k in ds for k in _PIXEL_KEYWORDS) or not ds.get("Rows") or not ds.get("Columns"):
        raise ImagingError(f"{name} has no pixel data (not an image, or truncated)")


def _decode(ds: Dataset, index: int | None, name: str) -> tuple[np.ndarray, str]:
    """One frame's stored values, and the photometric interpretation they are in."""
    ts = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImagingError(f"{name} uses transfer syntax {ts.name}, which cannot be decoded") from None
    if not decoder.is_available:
        raise ImagingError(f"{name} holds {ts.name} pixel data and no decoder for it is installed; {PLUGIN_HINT}")
    try:
        arr, meta = decoder.as_array(ds, index=index, as_rgb=False)
    except ValueError as e:  # size mismatch between header and pixel data
        raise ImagingError(f"{name} is truncated or corrupt") from e
    except Exception as e:
        if ts.is_compressed:  # every installed plugin failed (e.g. 12-bit JPEG with Pillow only)
            raise ImagingError(f"{name}: could not decode {ts.name} pixel data; {PLUGIN_HINT}") from e
        raise ImagingError(f"{name} is truncated or corrupt") from e
    return arr, str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))


def _color_to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    scaled = arr.astype(np.float64) / float(2**bits - 1) * 255.0
    return np.floor(np.clip(scaled, 0, 255) + 0.5).astype(np.uint8)


def _to_rgb(arr: np.ndarray, pi: str, ds: Dataset, name: str) -> np.ndarray:
    if pi in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, pi, "RGB")
    elif pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        return _color_to_uint8(arr, 8 * arr.dtype.itemsize)
    return _color_to_uint8(arr, _int(ds, "BitsStored", 8, name))


def _file_window(ds: Dataset) -> tuple[float, float] | None:
    """The first WindowCenter/WindowWidth pair, if present and usable."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if isinstance(center, MultiValue) else center)
        w = float(width[0] if isinstance(width, MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if w >= 1 else None


def _ct_default(ds: Dataset) -> tuple[str, tuple[float, float]]:
    part = str(ds.get("BodyPartExamined", "")).upper()
    preset = "brain" if part in ("HEAD", "BRAIN", "SKULL") else "mediastinum"
    return preset, resolve_preset(preset)


def choose_window(ds: Dataset, modality: str, preset: str | None) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """Explicit preset -> file window -> file VOI LUT -> CT default -> min/max. Returns (label, fn)."""
    if preset:
        c, w = resolve_preset(preset)
        return f"{preset.lower()} {c:g}/{w:g}", lambda a: apply_window(a, c, w)
    file_window = _file_window(ds)
    if file_window:
        c, w = file_window
        return f"file {c:g}/{w:g}", lambda a: apply_window(a, c, w)
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])  # LUT output range is 0..2**bits-1
        return "file VOI LUT", lambda a: _color_to_uint8(apply_voi_lut(a, ds, prefer_lut=True), bits)
    if modality == "CT":
        name, (c, w) = _ct_default(ds)
        return f"{name} {c:g}/{w:g}", lambda a: apply_window(a, c, w)
    return "min/max", lambda a: minmax_to_uint8(a, reference=a[len(a) // 2])  # the middle slice's scale


def _spacing(ds: Dataset, slice_gap: float | None) -> tuple[float, ...] | None:
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if ps is None and shared and "PixelMeasuresSequence" in shared[0]:
        ps = shared[0].PixelMeasuresSequence[0].get("PixelSpacing")
    try:
        row_col = (float(ps[0]), float(ps[1])) if ps is not None else None
    except (TypeError, ValueError, IndexError):
        row_col = None
    if row_col is None:
        return None
    return row_col + ((slice_gap,) if slice_gap else ())


def _slice_gap(ds: Dataset) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(ds.get(keyword) or 0)
        except (TypeError, ValueError):
            continue
        if value > 0:
            return value
    return None


def _metadata(ds: Dataset, modality: str, window: str, source_format: str) -> dict[str, str]:
    meta = {"Modality": modality, "Window": window, "SourceFormat": source_format}
    for keyword in _HEADER_FIELDS:
        value = ds.get(keyword)
        if value not in (None, ""):
            meta[keyword] = safe_text(value)
    ps = ds.get("PixelSpacing")
    if ps:
        meta["PixelSpacing"] = safe_text("\\".join(str(v) for v in ps))
    return meta


def _render_colour(decoded: list[tuple[np.ndarray, str, Dataset]], name: str) -> list[np.ndarray]:
    images = []
    for arr, pi, ds in decoded:
        if arr.ndim != 3 and pi != "PALETTE COLOR":
            raise ImagingError(f"{name} mixes colour and greyscale frames")
        images.append(_to_rgb(arr, pi, ds, name))
    return images


def _render_grey(decoded: list[tuple[np.ndarray, str, Dataset]], ref: Dataset, modality: str,
                 window: str | None) -> tuple[list[np.ndarray], str]:
    values = np.stack([apply_modality_lut(arr, ds).astype(np.float64) for arr, _, ds in decoded])
    label, fn = choose_window(ref, modality, window)
    shown = fn(values)  # one window for all key slices, so they compare
    mono1 = str(ref.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    inverse = str(ref.get("PresentationLUTShape", "")) == "INVERSE"
    if mono1 != inverse:  # after windowing, as the standard orders it
        shown = 255 - shown
    return list(shown), label


def render(frames: list[Frame], *, window: str | None, modality: str | None, n_key: int | None,
           slice_gap: float | None, source: str, source_format: str) -> Study:
    """Decode the key frames of an ordered stack and turn them into a Study."""
    idx = key_slice_indices(len(frames), n_key)
    ref = frames[idx[len(idx) // 2]][0]
    mod = modality or safe_text(ref.get("Modality") or "OT")
    decoded = []
    for ds, i, name in (frames[j] for j in idx):
        arr, pi = _decode(ds, i, name)
        decoded.append((arr, pi, ds))
    if decoded[0][0].ndim == 3 or decoded[0][1] == "PALETTE COLOR":
        images, label = _render_colour(decoded, source), "none (colour)"
    else:
        images, label = _render_grey(decoded, ref, mod, window)
    meta = _metadata(ref, mod, label, source_format)
    spacing = _spacing(ref, None)
    if len(frames) > 1:
        meta["SliceCount"] = str(len(frames))
        meta["KeySlices"] = ",".join(str(i) for i in idx)
        z = [_patient_z(frames[j][0]) for j in idx]
        if all(v is not None for v in z) and len(set(z)) == len(z):  # one position per slice: a series
            meta["SlicePositions"] = ",".join(f"{v:g}" for v in z)
        spacing = _spacing(ref, slice_gap or _slice_gap(ref))
    return Study(images=images, modality=mod, spacing=spacing, metadata=meta, source=source)


def read_dicom(src: Source, name: str, *, window: str | None = None, modality: str | None = None,
               max_pixels: int, n_key: int | None = 1) -> Study:
    """A single DICOM file (single- or multi-frame)."""
    ds = read_dataset(src, name)
    _require_image(ds, name)
    check_pixel_count(name, _n_pixels(ds, name), max_pixels)
    n = _n_frames(ds, name)
    frames: list[Frame] = [(ds, None, name)] if n == 1 else [(ds, i, name) for i in range(n)]
    return render(frames, window=window, modality=modality, n_key=n_key, slice_gap=None,
                  source=name, source_format="DICOM")


def _patient_z(ds: Dataset) -> float | None:
    """ImagePositionPatient z, as viewers show it for a slice."""
    try:
        return float(ds.ImagePositionPatient[2])
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def _position(ds: Dataset) -> float | None:
    """Slice position along the slice normal (falls back to z when orientation is missing)."""
    try:
        ipp = [float(v) for v in ds.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        return float(np.dot(ipp, np.cross(iop[:3], iop[3:])))
    except (AttributeError, TypeError, ValueError):
        return ipp[2]


def _series_headers(folder: Path) -> list[tuple[Path, Dataset]]:
    found = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            ds = read_dataset(path, path.name, stop_before_pixels=True)
        except (ImagingError, OSError):
            continue  # exports often hold non-DICOM files (README, thumbnails): skip them
        if ds.get("Rows") and ds.get("Columns"):
            found.append((path, ds))
    return found


def series_stack(folder: Path) -> tuple[list[tuple[Path, Dataset, int | None]], float | None]:
    """The slices of a folder's largest series in slice order, as (file, header, frame index or
    None) with multi-frame files expanded, and the slice gap in mm where positions give it."""
    name = folder.name
    headers = _series_headers(folder)
    if not headers:
        raise ImagingError(f"{name} contains no DICOM images (subfolders are not searched)")
    # Group by the raw UID bytes: never decoded, never logged.
    series: dict[bytes, list[tuple[Path, Dataset]]] = {}
    for path, ds in headers:
        item = ds.get_item("SeriesInstanceUID")
        value = b"" if item is None or item.value is None else item.value
        key = value if isinstance(value, bytes) else str(value).encode()
        series.setdefault(key, []).append((path, ds))
    members = max(series.values(), key=len)
    shape_counts = Counter((int(ds.Rows), int(ds.Columns)) for _, ds in members)
    shape = shape_counts.most_common(1)[0][0]  # drop scouts/localisers of another size
    members = [(p, ds) for p, ds in members if (int(ds.Rows), int(ds.Columns)) == shape]

    positions = [_position(ds) for _, ds in members]
    if all(p is not None for p in positions):
        order = np.argsort(positions, kind="stable")
    else:
        order = np.argsort([_int(ds, "InstanceNumber", 0, p.name) for p, ds in members], kind="stable")
    members = [members[i] for i in order]

    gap = None
    if all(p is not None for p in positions) and len(members) > 1:
        diffs = np.abs(np.diff(np.sort(np.asarray(positions, dtype=float))))
        gap = float(np.median(diffs)) if np.median(diffs) > 0 else None
    stack = [(path, ds, None if _n_frames(ds, path.name) == 1 else i)
             for path, ds in members for i in range(_n_frames(ds, path.name))]
    return stack, gap


def read_dicom_series(folder: Path, *, window: str | None = None, modality: str | None = None,
                      max_pixels: int, n_key: int | None = 1) -> Study:
    """A folder of slices: the largest series, ordered along the slice normal."""
    name = folder.name
    stack, gap = series_stack(folder)
    files = {path: ds for path, ds, _ in stack}
    check_pixel_count(name, sum(_n_pixels(ds, p.name) for p, ds in files.items()), max_pixels)

    # Read pixel data only for the files holding key slices.
    full: dict[Path, Dataset] = {}
    for j in key_slice_indices(len(stack), n_key):
        path = stack[j][0]
        if path not in full:
            full[path] = read_dataset(path, path.name)
            _require_image(full[path], path.name)
    frames: list[Frame] = [(full.get(path, ds), i, path.name) for path, ds, i in stack]
    return render(frames, window=window, modality=modality, n_key=n_key, slice_gap=gap,
                  source=name, source_format="DICOM series")
