"""De-identification (imaging/deid.py, `medlava deid`): the PS3.15 Basic Profile table walked on
real files, UID consistency, untouched pixels, the burned-in warning, and the CLI's errors."""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_ROOT_UID, UID_dictionary
from typer.testing import CliRunner

from medlava.cli import app
from medlava.errors import ImagingError
from medlava.imaging import load_study
from medlava.imaging.deid import (
    DUMMY,
    MASKS,
    PROFILE_CODE,
    TABLE,
    UIDMap,
    action_for,
    burned_in_warnings,
    deidentify_dataset,
    deidentify_file,
    deidentify_tree,
)
from medlava.train.synthetic import generate_world

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # the inputs, not us
PIXELS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


# ---------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate_world(root, n=12, seed=5, size=64)
    return root


def world_dicoms(world: Path) -> list[Path]:
    paths = sorted((world / "images").glob("*.dcm"))
    assert len(paths) >= 4 and {pydicom.dcmread(p).Modality for p in paths} >= {"CT"}
    return paths


def read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def pydicom_files() -> list[tuple[Path, Dataset]]:
    """Every bundled pydicom test file that dcmread can read (images and non-images)."""
    found = []
    for f in get_testdata_files():
        path = Path(f)
        if not path.is_file():
            continue
        try:
            ds = read(path)
        except Exception:
            continue
        if len(ds):
            found.append((path, ds))
    assert len(found) > 100
    return found


# ---------------------------------------------------------------- the table walker


def _norm(value: object) -> object:
    if isinstance(value, MultiValue | list | tuple):
        return tuple(str(v) for v in value)
    return value if isinstance(value, bytes) else str(value)


def _empty(value: object) -> bool:
    return value is None or (hasattr(value, "__len__") and len(value) == 0)


def _values(ds: Dataset, into: dict[int, set] | None = None) -> dict[int, set]:
    """tag -> every non-empty value it has anywhere in ds (sequences included)."""
    into = {} if into is None else into
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _values(item, into)
        elif not _empty(elem.value):
            into.setdefault(int(elem.tag), set()).add(_norm(elem.value))
    return into


def leaks(original: Dataset, out: Dataset) -> list[str]:
    """Names of attributes in `out` that the table (with overrides) protects but that still hold
    a value they had in `original`, anywhere; plus private tags and missing identity markers."""
    before = _values(original)
    if hasattr(original, "file_meta"):
        _values(original.file_meta, before)
    uids = {v for tag, values in before.items() for v in values
            if isinstance(v, str) and pydicom.datadict.dictionary_has_tag(tag)
            and pydicom.datadict.dictionary_VR(tag) == "UI"}
    problems: list[str] = []

    def is_original(elem) -> bool:
        value = _norm(elem.value)
        if _empty(elem.value) or value == _norm(DUMMY.get(elem.VR)):
            return False
        if elem.VR == "UI" and all(v in UID_dictionary for v in (value if isinstance(value, tuple) else [value])):
            return False  # well-known UIDs (SOP classes, transfer syntaxes) identify nobody
        if elem.VR == "UI":  # an original UID is a leak under any tag
            return value in uids or (isinstance(value, tuple) and bool(uids.intersection(value)))
        return value in before.get(int(elem.tag), set())

    def check(ds: Dataset, path: str, replaced: bool) -> None:
        # replaced: inside a sequence whose action (D, Z, ...) covers all of its contents
        for elem in ds:
            name = path + (elem.keyword or str(elem.tag))
            if elem.tag.is_private:
                problems.append(f"{name} (private)")
                continue
            action = "D" if replaced else action_for(int(elem.tag))
            if action is None:  # K: kept; kept sequences are checked inside
                if elem.VR == "SQ":
                    for item in elem.value:
                        check(item, name + ">", False)
                continue
            if action == "X":
                problems.append(f"{name} (X but present)")
            elif elem.VR == "SQ":
                for item in elem.value:  # U*: remapped inside; the others: nothing original inside
                    check(item, name + ">", action != "X/Z/U*")
            elif action == "U" and _empty(elem.value):
                problems.append(f"{name} (U but empty)")
            elif is_original(elem):
                problems.append(f"{name} ({action} but original value)")

    check(out, "", False)
    if hasattr(out, "file_meta"):
        check(out.file_meta, "meta:", False)
    if out.get("PatientIdentityRemoved") != "YES":
        problems.append("PatientIdentityRemoved not YES")
    if not out.get("DeidentificationMethod"):
        problems.append("DeidentificationMethod missing")
    codes = [(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning)
             for c in out.get("DeidentificationMethodCodeSequence", [])]
    if PROFILE_CODE not in codes:
        problems.append("DeidentificationMethodCodeSequence lacks 113100")
    return problems


def test_table_is_the_standards_table_e1_1():
    """The table is the full E.1-1 (not a short list), with the standard's actions and the overrides."""
    assert len(TABLE) > 650
    kw = pydicom.datadict.tag_for_keyword
    expected = {
        "PatientName": "Z", "PatientID": "Z/D", "PatientBirthDate": "Z", "PatientSex": "Z",
        "PatientAge": "X", "OtherPatientIDs": "X", "PatientAddress": "X", "StudyDate": "Z",
        "StudyTime": "Z", "AccessionNumber": "Z", "StudyID": "Z", "ReferringPhysicianName": "Z",
        "InstitutionName": "X/Z/D", "StationName": "X/Z/D", "StudyDescription": "X",
        "SeriesDescription": "X", "SeriesDate": "X/D", "ContentDate": "Z/D", "AcquisitionDate": "X/Z",
        "DeviceSerialNumber": "X/Z/D", "SOPInstanceUID": "U", "StudyInstanceUID": "U",
        "SeriesInstanceUID": "U", "FrameOfReferenceUID": "U", "MediaStorageSOPInstanceUID": "U",
        "ReferencedSOPInstanceUID": "U", "ReferencedImageSequence": "X/Z/U*", "SourceImageSequence": "X/Z/U*",
        "ContentSequence": "D", "IconImageSequence": "X", "RequestAttributesSequence": "X",
        "SecondaryCaptureDeviceID": "X", "UnformattedTextValue": "D",  # added after 2024b (2026c)
        "MultiFrameSourceSOPInstanceUID": "U",  # an override
        # K: not in the table, kept
        "SOPClassUID": None, "Modality": None, "BodyPartExamined": None, "PixelData": None,
        "Rows": None, "WindowCenter": None, "ReferencedSOPClassUID": None, "BurnedInAnnotation": None,
    }
    assert {k: action_for(kw(k)) for k in expected} == expected
    assert action_for(0x00100011) == "X"  # Person Names to Use Sequence: newer than pydicom 3.0's dictionary
    assert action_for(0x50001234) == "X" and action_for(0x60103000) == "X" and action_for(0x60001500) == "X"
    assert MASKS and action_for(0x70001234) is None


# ---------------------------------------------------------------- 1. nothing protected survives


def test_walker_catches_what_deid_must_remove(world):
    """The walker is not vacuous: an un-de-identified dataset, or one mutation of a good one, fails."""
    original = read(world_dicoms(world)[0])
    assert {"PatientName (Z but original value)", "PatientID (Z/D but original value)",
            "SOPInstanceUID (U but original value)", "PatientIdentityRemoved not YES"} <= set(
        leaks(original, copy.deepcopy(original)))
    out = copy.deepcopy(original)
    deidentify_dataset(out, UIDMap())
    assert leaks(original, out) == []
    for mutate, problem in [
        (lambda d: setattr(d, "PatientID", original.PatientID), "PatientID (Z/D but original value)"),
        (lambda d: setattr(d, "StudyDescription", "anything"), "StudyDescription (X but present)"),
        (lambda d: d.add_new(0x00091010, "LO", "x"), "(0009,1010) (private)"),
        (lambda d: setattr(d.file_meta, "MediaStorageSOPInstanceUID", original.SOPInstanceUID),
         "meta:MediaStorageSOPInstanceUID (U but original value)"),
        (lambda d: d.ReferencedImageSequence.append(Dataset()) or setattr(
            d.ReferencedImageSequence[0], "ReferencedSOPInstanceUID", original.SOPInstanceUID),
         "ReferencedImageSequence>ReferencedSOPInstanceUID (U but original value)"),
    ]:
        bad = copy.deepcopy(out)
        if "ReferencedImageSequence" in problem:
            bad.ReferencedImageSequence = []
        mutate(bad)
        assert problem in leaks(original, bad)


def test_no_protected_value_survives_on_phantoms_and_pydicom_files(world, tmp_path):
    """Every phantom DICOM and every readable pydicom test file: after de-identification (written
    to disk and read back where the file is writable), the table walk finds nothing left."""
    uid_map = UIDMap()
    failures = {}
    inputs = [(p, read(p)) for p in world_dicoms(world)] + pydicom_files()
    written = 0
    for i, (path, original) in enumerate(inputs):
        try:
            deidentify_file(path, tmp_path / f"{i}.dcm", uid_map)
            out = read(tmp_path / f"{i}.dcm")
            written += 1
        except ImagingError:  # DICOMDIRs and truncated files are refused: check the dataset walk
            out = copy.deepcopy(original)
            deidentify_dataset(out, uid_map)
        problems = leaks(original, out)
        if problems:
            failures[path.name] = problems
    assert failures == {}
    assert written > 120
    # The test files hold what the table targets, so the walk had real work to do.
    seen = set().union(*(_values(ds) for _, ds in inputs))
    assert {pydicom.datadict.tag_for_keyword(k) for k in ("PatientName", "PatientID", "StudyDate")} <= seen
    assert any(ds.get("ReferencedImageSequence") for _, ds in inputs)
    assert any(any(e.tag.is_private for e in ds) for _, ds in inputs)


# ---------------------------------------------------------------- 2. UIDs


def _series(world: Path, folder: Path) -> list[Path]:
    """Two slices of one series (the second references the first) and an unrelated study."""
    folder.mkdir()
    first, other = world_dicoms(world)[:2]
    a = read(first)
    b = copy.deepcopy(a)
    b.SOPInstanceUID = b.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    b.InstanceNumber = 2
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = a.SOPClassUID, a.SOPInstanceUID
    b.ReferencedImageSequence = [ref]
    b.SourceImageSequence = [copy.deepcopy(ref)]
    a.FrameOfReferenceUID = b.FrameOfReferenceUID = pydicom.uid.generate_uid()
    paths = [folder / "a.dcm", folder / "sub" / "b.dcm", folder / "c.dcm"]
    paths[1].parent.mkdir()
    a.save_as(paths[0])
    b.save_as(paths[1])
    shutil.copy(other, paths[2])
    return paths


def test_uids_are_replaced_consistently_across_files(world, tmp_path):
    src = _series(world, tmp_path / "in")
    summary = deidentify_tree(tmp_path / "in", tmp_path / "out")
    assert (summary.written, summary.not_dicom, summary.failed) == (3, 0, 0)
    (a, b, c), (a2, b2, c2) = [read(p) for p in src], [read(tmp_path / "out" / p.relative_to(src[0].parent))
                                                      for p in src]
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert a2[key].value == b2[key].value != a[key].value
    assert a2.SOPInstanceUID != b2.SOPInstanceUID and c2.StudyInstanceUID != a2.StudyInstanceUID
    for old, new in [(a, a2), (b, b2), (c, c2)]:
        assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID != old.SOPInstanceUID
        assert new.SOPClassUID == old.SOPClassUID == new.file_meta.MediaStorageSOPClassUID
        assert new.file_meta.TransferSyntaxUID == old.file_meta.TransferSyntaxUID
        assert new.SOPInstanceUID.startswith(PYDICOM_ROOT_UID) and new.SOPInstanceUID.is_valid
    for seq in ("ReferencedImageSequence", "SourceImageSequence"):
        assert b2[seq].value[0].ReferencedSOPInstanceUID == a2.SOPInstanceUID
        assert b2[seq].value[0].ReferencedSOPClassUID == a.SOPClassUID  # well-known: kept
    # Patient ID: a dummy per patient, so slices of one patient stay together.
    assert a2.PatientID == b2.PatientID != c2.PatientID and a.PatientID not in (a2.PatientID, c2.PatientID)
    # A new run draws a new key; a given key repeats.
    again = deidentify_tree(tmp_path / "in", tmp_path / "out2")
    assert again.written == 3 and read(tmp_path / "out2" / "a.dcm").SOPInstanceUID != a2.SOPInstanceUID
    assert UIDMap("k")(a.SOPInstanceUID) == UIDMap("k")(a.SOPInstanceUID) != UIDMap("j")(a.SOPInstanceUID)


# ---------------------------------------------------------------- 3. pixels


def test_pixel_data_is_byte_identical_and_loads_the_same(world, tmp_path):
    paths = world_dicoms(world) + [p for p, ds in pydicom_files() if any(k in ds for k in PIXELS)]
    uid_map = UIDMap()
    compared = loaded = 0
    for i, path in enumerate(paths):
        dst = tmp_path / f"{i}.dcm"
        try:
            deidentify_file(path, dst, uid_map)
        except ImagingError:
            continue  # refused (truncated): covered by the CLI tests
        before, after = read(path), read(dst)
        for k in PIXELS:
            if k in before:
                assert after[k].value == before[k].value, path.name
        compared += 1
        try:
            want = load_study(path)
        except ImagingError:
            continue  # no decoder for this transfer syntax, or not an image medlava reads
        got = load_study(dst)
        assert got.modality == want.modality and len(got.images) == len(want.images)
        assert all(np.array_equal(g, w) for g, w in zip(got.images, want.images, strict=True)), path.name
        loaded += 1
    assert compared > 60 and loaded >= len(world_dicoms(world)) + 20


# ---------------------------------------------------------------- 4. burned-in text


@pytest.mark.parametrize(("changes", "warned"), [
    ({"Modality": "US"}, "US images"),
    ({"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "secondary capture"),
    ({"Modality": "XA", "BurnedInAnnotation": "YES"}, "is YES"),
    ({"Modality": "CT", "BurnedInAnnotation": "YES"}, "is YES"),
    ({"Modality": "US", "BurnedInAnnotation": "NO"}, None),
    ({"Modality": "CT"}, None),
])
def test_burned_in_annotation_warning(world, changes, warned):
    ds = read(world_dicoms(world)[0])
    assert "BurnedInAnnotation" not in ds
    for k, v in changes.items():
        setattr(ds, k, v)
    assert burned_in_warnings(ds) == (found := deidentify_dataset(ds, UIDMap()))
    if warned:
        assert len(found) == 1 and warned in found[0]
    else:
        assert found == []


# ---------------------------------------------------------------- 5. CLI


def invoke(*args):
    return runner.invoke(app, ["deid", *(str(a) for a in args)])


def names_in(world: Path) -> set[str]:
    return {str(read(p).PatientName) for p in world_dicoms(world)} | {
        str(read(p).PatientID) for p in world_dicoms(world)}


def test_cli_folder_writes_a_mirror_tree(world, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(world, src)
    us = read(world_dicoms(world)[0])
    us.Modality = "US"
    us.save_as(src / "images" / "us.dcm")
    # A corrupt DICOM named after its patient: counted, never named.
    bad = src / f"{us.PatientName}.dcm"
    bad.write_bytes((src / "images" / "us.dcm").read_bytes()[:-100])
    dicoms = sorted(p.relative_to(src) for p in src.rglob("*.dcm") if p != bad)
    others = [p for p in src.rglob("*") if p.is_file() and p.suffix != ".dcm"]
    result = invoke(src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == dicoms  # same relative paths, DICOM only
    line = f"de-identified {len(dicoms)} files; skipped {len(others)} not DICOM, 1 unreadable or unsupported"
    assert result.stdout.strip().startswith(line)
    assert result.stdout.count("\n") == 1
    assert "warning: BurnedInAnnotation is absent and US images" in result.stderr and "(1 file)" in result.stderr
    for secret in names_in(world) | {bad.name}:
        assert secret not in result.stdout + result.stderr
    assert str(us.PatientName) not in (tmp_path / "out" / "images" / "us.dcm").read_bytes().decode("latin-1")


def test_cli_single_file_to_file_and_into_folder(world, tmp_path):
    path = world_dicoms(world)[0]
    result = invoke(path, tmp_path / "new" / "x.dcm")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("de-identified 1 file; skipped 0 not DICOM")
    assert read(tmp_path / "new" / "x.dcm").PatientIdentityRemoved == "YES"
    assert invoke(path, tmp_path / "new").exit_code == 0
    assert read(tmp_path / "new" / path.name).PatientName == ""
    assert [p.name for p in (tmp_path / "new").iterdir() if p.name.startswith(".")] == []  # no temp files


def _bad_inputs(world: Path, tmp: Path) -> dict[str, tuple[Path, Path, str]]:
    dcm = world_dicoms(world)[0]
    (tmp / "text.dcm").write_text("not dicom at all")
    raw = read(dcm)
    data = dcm.read_bytes()
    (tmp / "truncated.dcm").write_bytes(data[:-100])  # inside Pixel Data
    (tmp / "header_cut.dcm").write_bytes(data[:raw.get_item(0x00100040).value_tell - 5])  # inside a header
    (tmp / "no_pixels.dcm").write_bytes(data[:raw.get_item(0x7FE00010).value_tell - 12])  # at an element's end
    (tmp / "empty").mkdir()
    (tmp / "tree").mkdir()
    shutil.copy(dcm, tmp / "tree" / "a.dcm")
    (tmp / "notes").mkdir()
    (tmp / "notes" / "readme.txt").write_text("hello")
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("x")
    return {
        "missing": (tmp / "nope.dcm", tmp / "o.dcm", "no such file"),
        "not DICOM": (tmp / "text.dcm", tmp / "o.dcm", "not a DICOM file"),
        "PNG": (next((world / "images").glob("*.png")), tmp / "o.dcm", "not a DICOM file"),
        "truncated pixels": (tmp / "truncated.dcm", tmp / "o.dcm", "truncated or corrupt"),
        "truncated header": (tmp / "header_cut.dcm", tmp / "o.dcm", "truncated or corrupt"),
        "truncated before pixels": (tmp / "no_pixels.dcm", tmp / "o.dcm", "truncated or corrupt"),
        "empty folder": (tmp / "empty", tmp / "o", "empty folder"),
        "no DICOM in folder": (tmp / "notes", tmp / "o", "no DICOM files"),
        "OUT inside IN": (tmp / "tree", tmp / "tree" / "out", "inside the input folder"),
        "OUT equal to IN (folder)": (tmp / "tree", tmp / "tree", "inside the input folder"),
        "OUT equal to IN (file)": (tmp / "tree" / "a.dcm", tmp / "tree" / "a.dcm", "is the input file"),
        "OUT not empty": (tmp / "tree", tmp / "full", "not an empty folder"),
    }


@pytest.mark.parametrize("case", ["missing", "not DICOM", "PNG", "truncated pixels", "truncated header",
                                  "truncated before pixels", "empty folder", "no DICOM in folder", "OUT inside IN",
                                  "OUT equal to IN (folder)", "OUT equal to IN (file)", "OUT not empty"])
def test_cli_bad_input_is_one_error_line(world, tmp_path, case):
    src, dst, message = _bad_inputs(world, tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))
    original = src.read_bytes() if src.is_file() else None
    result = invoke(src, dst)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even a temp file
    if original is not None:
        assert src.read_bytes() == original
    for secret in names_in(world):
        assert secret not in result.stderr
