"""DICOM de-identification: the PS3.15 Annex E Basic Application Level Confidentiality Profile.

The attribute table is DICOM PS3.15 Table E.1-1, edition 2026c, as shipped by the
`dicom-anonymizer` package (KitwareMedical, module `dicomanonymizer`,
`dicom_anonymization_databases/dicomfields_2026c.py`); only its table is used, the actions are
ours. Cross-checked against innolitics/dicom-standard's parse of the 2024b table (identical
where both list an attribute; 2026c only adds attributes). `OVERRIDES` below fixes what the
table alone misses. No profile options are applied.

Compound actions are resolved the way the profile allows without knowing each IOD's Types:
always the choice that keeps any IOD conformant (`BASIC_RESOLUTION`). Attributes the table
does not list are kept (K); kept sequences are walked with the same rules. Private attributes
are removed, UIDs are replaced through one `UIDMap` per run, the File Meta Information and
preamble are rebuilt, Pixel Data is never touched (so burned-in text is only warned about).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    UID_dictionary,
    generate_uid,
)

from medlava.errors import ImagingError
from medlava.imaging.dicom import looks_like_dicom, read_dataset

TABLE_EDITION = "2026c"
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
METHOD = f"medlava: PS3.15 Basic Profile, Table E.1-1 {TABLE_EDITION}"  # LO: at most 64 characters

_CATEGORIES = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
               "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}

# Fixes on top of the library's table, each with why. Keyword -> action.
OVERRIDES = {
    # PS3.15 E.1.1 item 5: *all* references to other SOP Instances (and frames of reference,
    # which link instances of one patient) must be replaced, but these UID attributes are not in
    # Table E.1-1; left alone they would keep the original UIDs and the link to the source data.
    "MultiFrameSourceSOPInstanceUID": "U",
    "SOPInstanceUIDOfConcatenationSource": "U",
    "ReferencedColorPaletteInstanceUID": "U",
    "ReferencedFiducialUID": "U",  # Fiducial UID is U, so its references must map the same way
    "TargetFrameOfReferenceUID": "U",
    "VolumeFrameOfReferenceUID": "U",
    "TableFrameOfReferenceUID": "U",
    "EquipmentFrameOfReferenceUID": "U",
    "RadiopharmaceuticalAdministrationEventUID": "U",
    "AssertionUID": "U",
    "ReferencedAssertionUID": "U",
    "ModelGroupUID": "U",
    "VolumetricPresentationInputSetUID": "U",
    "PrivateRecordUID": "U",
}
# The table removes only Overlay Data and Overlay Comments of (60xx); that leaves overlay
# planes without their Type 1 data and keeps free text the table does not list (Overlay Label,
# Overlay Description). Remove the whole overlay group, as the table already does for curves.
# (group, element, group mask, element mask, action), the library's form for repeating groups.
OVERRIDE_MASKS = [(0x6000, 0x0000, 0xFF00, 0x0000, "X")]

# Compound action -> what this module does: the choice valid whatever the attribute's Type.
BASIC_RESOLUTION = {"Z/D": "D", "X/Z": "Z", "X/D": "D", "X/Z/D": "D", "X/Z/U*": "U*"}

# D: dummy values, consistent with the VR (UI goes through the UIDMap; SQ is dummied inside).
_TEXT = "ANONYMIZED"
DUMMY: dict[str, object] = {
    **dict.fromkeys(("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"), _TEXT),
    "AS": "000Y", "DA": "19000101", "DT": "19000101000000", "TM": "000000", "DS": "0", "IS": "0",
    "UR": "http://anonymized.invalid", "AT": 0,
    **dict.fromkeys(("FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"), 0),
    **dict.fromkeys(("OB", "OD", "OF", "OL", "OV", "OW", "UN"), b"\0" * 8),  # a multiple of 8 bytes
}
_PATIENT_ID = tag_for_keyword("PatientID")

# Modalities whose pixels often carry burned-in text when BurnedInAnnotation is absent.
BURN_IN_MODALITIES = frozenset({"US", "IVUS", "XA", "RF", "ES", "XC", "GM", "OP", "SM", "OT", "SC"})
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its .1 to .4 multi-frame variants
_DICOMDIR = "1.2.840.10008.1.3.10"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _load_table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    db = dicom_anonymization_database_selector(f"dicomfields_{TABLE_EDITION}")
    table: dict[int, str] = {}
    masks = []
    for category, action in _CATEGORIES.items():
        for tag in db[category]:
            if len(tag) == 2:
                table[(tag[0] << 16) | tag[1]] = action
            else:
                masks.append((*tag, action))
    overrides = {tag_for_keyword(k): a for k, a in OVERRIDES.items()}
    assert None not in overrides, "an OVERRIDES keyword is unknown to pydicom"
    table.update(overrides)
    return table, OVERRIDE_MASKS + masks  # overrides first: the first matching mask wins


TABLE, MASKS = _load_table()


def action_for(tag: int) -> str | None:
    """The table's action for a standard tag (after overrides); None means keep (K)."""
    action = TABLE.get(tag)
    if action is None and 0x5000 <= tag >> 16 <= 0x60FF:
        for group, element, gmask, emask, masked in MASKS:
            if (tag >> 16) & gmask == group and tag & 0xFFFF & emask == element:
                return masked
    return action


class UIDMap:
    """Old UID -> new UID, the same for every file of a run. New UIDs are a keyed hash of the old
    one under pydicom's root: a fresh random key per run unless `key` is given (then the mapping
    is repeatable across runs, and only as secret as the key). Well-known UIDs are kept."""

    def __init__(self, key: str | bytes | None = None) -> None:
        if key is None:
            self._key = secrets.token_hex(32)
        else:
            raw = key.encode() if isinstance(key, str) else key
            self._key = hashlib.sha256(b"medlava-deid" + raw).hexdigest()
        self._map: dict[str, str] = {}

    def __call__(self, uid: object) -> str:
        old = str(uid).rstrip("\0 ")
        if not old or old in UID_dictionary:  # transfer syntaxes, SOP classes, well-known frames
            return old
        if old not in self._map:
            self._map[old] = str(generate_uid(entropy_srcs=[self._key, old]))
        return self._map[old]

    def __len__(self) -> int:
        return len(self._map)

    def pseudonym(self, value: object) -> str:
        """A 16-character dummy that keeps equal inputs equal (Patient ID: one per patient)."""
        digest = hmac.new(self._key.encode(), str(value).encode(), hashlib.sha256).hexdigest()
        return "ANON" + digest[:12].upper()


def _map_uids(elem: DataElement, uid_map: UIDMap) -> None:
    values = elem.value if elem.VM > 1 else [elem.value]
    new = [uid_map(v) for v in values if v is not None]
    elem.value = new if elem.VM > 1 else (new[0] if new else None)


def _dummy(ds: Dataset, elem: DataElement, uid_map: UIDMap) -> None:
    """D: a non-empty dummy; for a sequence, every attribute inside it (PS3.15 E.1.1)."""
    if elem.VR == "SQ":
        for item in elem.value:
            _dummy_dataset(item, uid_map)
    elif elem.VR == "UI":
        _map_uids(elem, uid_map)
    elif elem.tag == _PATIENT_ID and elem.value:
        elem.value = uid_map.pseudonym(elem.value)
    elif elem.VR in DUMMY:
        elem.value = DUMMY[elem.VR]
    else:  # an unresolved VR such as "US or SS": no safe dummy, so remove it
        del ds[elem.tag]


def _dummy_dataset(ds: Dataset, uid_map: UIDMap) -> None:
    for tag in list(ds.keys()):
        elem = ds[tag]
        if elem.tag.is_private:
            del ds[tag]
        else:
            _dummy(ds, elem, uid_map)


def _walk(ds: Dataset, uid_map: UIDMap) -> None:
    """Apply the table to every attribute of `ds` and, recursively, of its sequences."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        if elem.tag.is_private:  # the table's "Private Attributes: X"
            del ds[tag]
            continue
        action = action_for(int(tag))
        action = BASIC_RESOLUTION.get(action, action)
        if action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = Sequence() if elem.VR == "SQ" else None  # zero length
        elif action == "D":
            _dummy(ds, elem, uid_map)
        elif elem.VR == "SQ":  # K, U* (keep the sequence, replace the UIDs it holds): walk it
            for item in elem.value:
                _walk(item, uid_map)
        elif action in ("U", "U*"):
            if elem.VR == "UI":
                _map_uids(elem, uid_map)
            else:
                del ds[tag]


def burned_in_warnings(ds: Dataset) -> list[str]:
    """Why this dataset's pixels may show identifying text (the profile does not clean pixels)."""
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        return []
    burned = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    if burned == "YES":
        return ["BurnedInAnnotation is YES: the pixels may show identifying text, which was not removed"]
    modality = str(ds.get("Modality", "")).strip().upper()
    sc = str(ds.get("SOPClassUID", "")).startswith(_SECONDARY_CAPTURE)
    if not burned and (modality in BURN_IN_MODALITIES or sc):
        kind = "secondary capture" if sc else modality
        return [f"BurnedInAnnotation is absent and {kind} images often have text burned in: check the pixels"]
    return []


def deidentify_dataset(ds: Dataset, uid_map: UIDMap) -> list[str]:
    """De-identify `ds` in place (its File Meta Information too); returns warnings (no PHI)."""
    with warnings.catch_warnings():  # pydicom's warnings quote element values
        warnings.simplefilter("ignore")
        found = burned_in_warnings(ds)
        old_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        _walk(ds, uid_map)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = [code]
    if "LongitudinalTemporalInformationModified" in ds:
        ds.LongitudinalTemporalInformationModified = "REMOVED"  # dates were removed or dummied
    # E.1.1 item 7: the File Meta Information and preamble may leak too; rebuild them.
    meta = FileMetaDataset()
    sop_class = ds.get("SOPClassUID") or old_meta.get("MediaStorageSOPClassUID")
    if sop_class:
        meta.MediaStorageSOPClassUID = sop_class
    instance = ds.get("SOPInstanceUID") or uid_map(old_meta.get("MediaStorageSOPInstanceUID", ""))
    if instance:
        meta.MediaStorageSOPInstanceUID = instance
    if "TransferSyntaxUID" in old_meta:
        meta.TransferSyntaxUID = old_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDLAVA_DEID"
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    return found


def _require_complete(ds: Dataset, size: int, label: str) -> None:
    """pydicom stops quietly at a truncated element; writing that would drop data unnoticed."""
    if not len(ds):
        raise ImagingError(f"{label} is truncated or corrupt (no data set)")
    if "Rows" in ds and not any(k in ds for k in _PIXEL_KEYWORDS):  # cut off before its pixels
        raise ImagingError(f"{label} is truncated or corrupt (an image without pixel data)")
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return  # offsets are into the inflated stream
    last = ds.get_item(next(reversed(ds.keys())))
    if isinstance(last, RawDataElement):  # sequences are parsed already, and raise on truncation
        undefined = last.length == 0xFFFFFFFF
        end = last.value_tell + (len(last.value or b"") + 8 if undefined else last.length)
        if end != size or (not undefined and len(last.value or b"") != last.length):
            raise ImagingError(f"{label} is truncated or corrupt")


def deidentify_file(src: str | os.PathLike, dst: str | os.PathLike, uid_map: UIDMap,
                    name: str | None = None) -> list[str]:
    """Read, de-identify and write one file; `dst` appears whole or not at all. `name` is what
    error messages call the file (default: `src` as given; file names can hold PHI)."""
    src, dst = Path(src), Path(dst)
    label = name or str(src)
    with warnings.catch_warnings():  # pydicom's warnings quote element values
        warnings.simplefilter("ignore")
        ds = read_dataset(src, label)
        _require_complete(ds, src.stat().st_size, label)
        if str(ds.get("SOPClassUID", ds.file_meta.get("MediaStorageSOPClassUID", ""))) == _DICOMDIR:
            raise ImagingError(f"{label} is a DICOMDIR: de-identify the images, then build a new DICOMDIR")
        try:
            found = deidentify_dataset(ds, uid_map)
        except Exception as e:
            raise ImagingError(f"{label} could not be de-identified ({type(e).__name__})") from None
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".deid-", suffix=".tmp")
        os.close(fd)
        try:
            ds.save_as(tmp, enforce_file_format="MediaStorageSOPInstanceUID" in ds.file_meta
                       and "MediaStorageSOPClassUID" in ds.file_meta)
            os.replace(tmp, dst)
        except Exception as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise ImagingError(f"cannot write {dst}: {e.strerror or 'I/O error'}") from None
            raise ImagingError(f"{label} could not be written ({type(e).__name__})") from None
    return found


@dataclass
class DeidSummary:
    """What one run did. Counts only: file names can hold PHI, so none are kept."""

    written: int = 0
    not_dicom: int = 0
    failed: int = 0
    warnings: Counter[str] = field(default_factory=Counter)  # message -> files

    def __str__(self) -> str:
        n_warn = sum(self.warnings.values())
        return (f"de-identified {self.written} file{'s' * (self.written != 1)}; skipped {self.not_dicom} "
                f"not DICOM, {self.failed} unreadable or unsupported; {n_warn} warning{'s' * (n_warn != 1)}")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def deidentify_tree(src: str | os.PathLike, dst: str | os.PathLike, key: str | bytes | None = None) -> DeidSummary:
    """A file to `dst` (a file, or into an existing folder), or a folder to a mirror tree at
    `dst`, with one UIDMap for the whole run. Non-DICOM files are skipped and counted, never
    copied; files that look like DICOM but cannot be read are counted as failed."""
    src_in, dst_in = Path(src), Path(dst)
    if not src_in.exists():
        raise ImagingError(f"no such file or folder: {src}")
    src_path, dst_path = src_in.resolve(), dst_in.resolve()
    uid_map = UIDMap(key)
    summary = DeidSummary()
    if src_path.is_file():
        target = dst_path / src_path.name if dst_path.is_dir() else dst_path
        if target == src_path:
            raise ImagingError(f"{dst} is the input file; choose another output")
        summary.warnings.update(deidentify_file(src_path, target, uid_map, name=str(src)))
        summary.written = 1
        return summary
    if _is_within(dst_path, src_path):
        raise ImagingError(f"{dst} is inside the input folder {src}; choose an output outside it")
    if dst_path.exists() and (not dst_path.is_dir() or any(dst_path.iterdir())):
        raise ImagingError(f"{dst} exists and is not an empty folder; choose a new folder")
    files = sorted(Path(root, f) for root, _, names in os.walk(src_path) for f in names)
    dicom = []
    for path in files:
        try:
            with open(path, "rb") as f:
                is_dicom = looks_like_dicom(f.read(132))
        except OSError:
            is_dicom = False
        if is_dicom:
            dicom.append(path)
        else:
            summary.not_dicom += 1
    if not dicom:  # decided before anything is written
        raise ImagingError(f"{src} contains no DICOM files" if files else f"{src} is an empty folder")
    for i, path in enumerate(dicom):
        try:
            found = deidentify_file(path, dst_path / path.relative_to(src_path), uid_map, name=f"file {i + 1}")
        except ImagingError:
            summary.failed += 1
            continue
        summary.written += 1
        summary.warnings.update(found)
    return summary
