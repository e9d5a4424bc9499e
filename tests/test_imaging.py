"""medlava.imaging: DICOM / NIfTI / PNG / JPEG into 8-bit key images, with clear errors."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIB_DATA
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medlava.errors import ImagingError
from medlava.imaging import (
    WINDOW_PRESETS,
    Study,
    apply_window,
    key_slice_indices,
    load_study,
    minmax_to_uint8,
)
from medlava.imaging.study import SAFE_METADATA_KEYS

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


def pydicom_file(name: str) -> str:
    path = get_testdata_file(name, download=False)  # bundled files only: tests stay offline
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled")
    return path


def write_dicom(path: Path, frames: np.ndarray, **elements: object) -> Path:
    """A minimal uint16 MONOCHROME2 image (frames: HxW or FxHxW), extra elements by keyword."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "SECRET^NAME"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = frames.shape[-2:]
    if frames.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = frames.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def assert_no_identifiers(study: Study, *secrets: str) -> None:
    assert set(study.metadata) <= SAFE_METADATA_KEYS
    text = repr(study) + repr(study.metadata)
    for secret in secrets:
        assert secret.lower() not in text.lower()


# --- window maths -----------------------------------------------------------------------------

def test_apply_window_matches_hand_computed_dicom_linear_function():
    # c=40, w=400: 0 at or below c-0.5-(w-1)/2 = -160, 255 above c-0.5+(w-1)/2 = 239,
    # else ((x-39.5)/399 + 0.5) * 255: x=40 -> 127.82, x=139.25 -> 191.25, x=-60.25 -> 63.75.
    x = np.array([-1000, -160.5, -160, -60.25, 40, 139.25, 239, 240, 3000])
    assert apply_window(x, 40, 400).tolist() == [0, 0, 0, 64, 128, 191, 255, 255, 255]
    assert apply_window(x, 40, 400).dtype == np.uint8
    # w=1 is a step at c-0.5.
    assert apply_window(np.array([9.4, 9.5, 9.6]), 10, 1).tolist() == [0, 0, 255]


def test_window_presets_are_the_standard_ct_windows():
    assert WINDOW_PRESETS == {"lung": (-600, 1500), "mediastinum": (40, 400), "bone": (400, 1800),
                              "brain": (40, 80)}


def test_minmax_is_robust_and_safe_on_constant_images():
    flat = minmax_to_uint8(np.full((4, 4), 7.0))
    assert flat.dtype == np.uint8 and not flat.any()
    ramp = np.arange(1000, dtype=float)
    ramp[0] = -1e9  # one cold and one hot pixel must not squash the rest
    ramp[-1] = 1e9
    out = minmax_to_uint8(ramp)
    assert out[0] == 0 and out[-1] == 255
    assert 120 <= out[500] <= 135
    spot = np.zeros((50, 50))
    spot[10, 10] = 5.0  # a tiny object on a flat background still shows
    assert minmax_to_uint8(spot)[10, 10] == 255


def test_key_slice_indices_come_from_the_middle_sixty_percent():
    assert key_slice_indices(1, 3) == [0]
    assert key_slice_indices(11) == [5]
    assert key_slice_indices(11, 3) == [2, 5, 8]
    idx = key_slice_indices(100, 5)
    assert 50 in idx and len(idx) == 5 and min(idx) >= 20 and max(idx) <= 80


# --- DICOM ------------------------------------------------------------------------------------

def test_ct_small_loads_as_windowed_ct_without_identifiers():
    path = pydicom_file("CT_small.dcm")
    study = load_study(path)
    img = study.images[0]
    assert study.modality == "CT" and study.source == "CT_small.dcm"
    assert img.shape == (128, 128) and img.dtype == np.uint8 and img.std() > 10
    assert study.metadata["Window"].startswith("mediastinum")  # CT without a file window
    assert study.spacing == pytest.approx((0.661468, 0.661468))
    assert "PatientName" not in study.metadata
    assert_no_identifiers(study, str(pydicom.dcmread(path).PatientName), "PatientID")


def test_mr_small_uses_the_files_window():
    path = pydicom_file("MR_small.dcm")
    study = load_study(path)
    ds = pydicom.dcmread(path)
    assert study.modality == "MR" and study.images[0].shape == (64, 64) and study.images[0].std() > 10
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    assert np.array_equal(study.images[0], apply_window(hu, 600, 1600))  # file says 600/1600
    assert_no_identifiers(study, str(ds.PatientName))
    img = study.key_image()
    assert img.mode == "RGB" and img.size == (64, 64)
    assert study.to_pil(0).mode == "L"


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    normal = load_study(pydicom_file("MR_small.dcm")).images[0]
    inverted = load_study(tmp_path / "mono1.dcm").images[0]
    assert np.array_equal(inverted, 255 - normal)


def _tiny_ct(path: Path, **extra: object) -> Path:
    # slope 2, intercept -1024: stored 0, 512, 532, 1024 are -1024, 0, 40, 1024 HU.
    stored = np.array([[0, 512], [532, 1024]])
    return write_dicom(path, stored, Modality="CT", RescaleSlope=2, RescaleIntercept=-1024, **extra)


def test_ct_rescale_then_default_soft_tissue_window(tmp_path):
    img = load_study(_tiny_ct(tmp_path / "ct.dcm")).images[0]
    # 40/400 by hand: -1024 -> 0; 0 -> ((0-39.5)/399+0.5)*255 = 102.26; 40 -> 127.82; 1024 -> 255.
    assert img.tolist() == [[0, 102], [128, 255]]


def test_window_preset_by_name_and_unknown_preset(tmp_path):
    path = _tiny_ct(tmp_path / "ct.dcm")
    lung = load_study(path, window="lung")
    # -600/1500: -1024 -> ((-1024+600.5)/1499+0.5)*255 = 55.46; 0 -> 229.66; 40 -> 236.46; 1024 -> 255.
    assert lung.images[0].tolist() == [[55, 230], [236, 255]]
    assert lung.metadata["Window"].startswith("lung")
    with pytest.raises(ImagingError) as err:
        load_study(path, window="liver")
    assert "liver" in str(err.value) and "mediastinum" in str(err.value) and "lung" in str(err.value)


def test_file_window_wins_over_ct_default_and_first_value_is_used(tmp_path):
    path = _tiny_ct(tmp_path / "ct.dcm", WindowCenter=[0, 500], WindowWidth=[100, 2000])
    # 0/100: 0 -> ((0+0.5)/99+0.5)*255 = 128.79; 40 -> ((40.5)/99+0.5)*255 = 231.82.
    assert load_study(path).images[0].tolist() == [[0, 129], [232, 255]]


def test_multiframe_is_a_volume_with_middle_key_slice(tmp_path):
    frames = np.stack([np.full((4, 6), 100 * k) for k in range(5)])
    frames[:, 0, 0] = 0  # not constant, so every frame is a real image
    path = write_dicom(tmp_path / "mf.dcm", frames, WindowCenter=250.5, WindowWidth=501)
    one = load_study(path)  # window maps x -> x * 255 / 500 here
    assert len(one.images) == 1 and one.images[0][1, 1] == 102  # frame 2 of 0..4
    three = load_study(path, key_slices=3)
    assert [img[1, 1] for img in three.images] == [51, 102, 153]
    assert three.metadata["SliceCount"] == "5" and three.metadata["KeySlices"] == "1,2,3"
    assert np.array_equal(np.asarray(three.to_pil()), three.images[1])


def test_pydicom_multiframe_rtdose_loads():
    study = load_study(pydicom_file("rtdose.dcm"))
    assert study.metadata["SliceCount"] == "15" and study.metadata["KeySlices"] == "7"


def test_folder_of_slices_sorted_by_position_largest_series(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    series = generate_uid()
    zs = [10.0, 0.0, 20.0, 5.0, 15.0]  # file order differs from anatomical order
    for i, z in enumerate(zs):
        pixels = np.full((8, 8), int(z * 10))
        pixels[0, 0] = 0
        write_dicom(folder / f"IM{i:04d}", pixels, SeriesInstanceUID=series, ImagePositionPatient=[0, 0, z],
                    ImageOrientationPatient=[1, 0, 0, 0, 1, 0], InstanceNumber=5 - i, PixelSpacing=[0.5, 0.5],
                    WindowCenter=100.5, WindowWidth=201)
    write_dicom(folder / "scout", np.full((8, 8), 7), SeriesInstanceUID=generate_uid())  # other series
    (folder / "README.txt").write_text("not a dicom file")
    study = load_study(folder)
    assert study.source == "series" and study.metadata["SliceCount"] == "5"
    assert study.images[0][1, 1] == 128  # z = 10, the middle: ((100-100)/200 + 0.5) * 255 = 127.5
    assert study.spacing == (0.5, 0.5, 5.0)
    three = load_study(folder, key_slices=3)
    assert [img[1, 1] for img in three.images] == [64, 128, 191]  # z = 5, 10, 15


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ImagingError, match="no DICOM images"):
        load_study(tmp_path)


def test_rgb_and_ybr_dicom_become_rgb():
    rgb = load_study(pydicom_file("SC_rgb_rle.dcm")).images[0]  # RLE decodes natively
    ybr = load_study(pydicom_file("SC_ybr_full_422_uncompressed.dcm")).images[0]
    assert rgb.shape == ybr.shape == (100, 100, 3) and rgb.dtype == ybr.dtype == np.uint8
    assert rgb[5, 50].tolist() == [255, 0, 0]  # the top colour bar is red
    bands = np.s_[5::10, 50]  # centres of the colour bars
    assert np.abs(rgb[bands].astype(int) - ybr[bands].astype(int)).max() <= 6


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_compressed_dicom_decodes_or_names_the_plugin(name):
    try:
        study = load_study(pydicom_file(name))
    except ImagingError as err:
        assert name in str(err) and "pylibjpeg" in str(err) and "gdcm" in str(err)
    else:
        assert study.images[0].dtype == np.uint8 and study.images[0].std() > 1


# --- NIfTI ------------------------------------------------------------------------------------

def test_nifti_3d_and_4d_from_nibabel_test_data():
    anat = load_study(os.path.join(NIB_DATA, "anatomical.nii"))
    assert anat.modality == "MR" and anat.images[0].shape == (41, 33)  # x/y plane, anterior up
    assert anat.spacing == (2.0, 2.0, 2.0) and anat.images[0].std() > 10
    four = load_study(os.path.join(NIB_DATA, "example4d.nii.gz"), modality="CT")
    assert four.modality == "CT" and four.images[0].shape == (96, 128)
    two = load_study(os.path.join(NIB_DATA, "example_nifti2.nii.gz"))
    assert two.images[0].dtype == np.uint8


@pytest.mark.parametrize("x_flip", [False, True])
def test_nifti_is_shown_anterior_up_patient_right_on_the_left(tmp_path, x_flip):
    data = np.zeros((6, 8, 3, 2), dtype=np.float32)  # x, y, z, time
    right_x = 0 if x_flip else 5  # LAS stores patient right at x=0, RAS at x=5
    data[right_x, 7, 1, 0] = 100.0  # right-anterior corner of the middle slice, first volume
    data[:, :, :, 1] = 50.0  # the second volume must be ignored
    affine = np.diag([-2.0 if x_flip else 2.0, 3.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "vol.nii.gz")
    study = load_study(tmp_path / "vol.nii.gz")
    img = study.images[0]
    assert img.shape == (8, 6) and img[0, 0] == 255 and img.sum() == 255
    assert study.spacing == (3.0, 2.0, 4.0)


def test_nifti_bytes_and_corrupt_nifti(tmp_path):
    raw = Path(NIB_DATA, "example4d.nii.gz").read_bytes()
    assert load_study(raw).metadata["SourceFormat"] == "NIfTI"
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ImagingError, match="cut.nii.gz is truncated or corrupt"):
        load_study(cut)
    plain = tmp_path / "plain.nii"
    plain.write_bytes(gzip.decompress(raw)[:600])
    with pytest.raises(ImagingError, match="plain.nii is truncated or corrupt"):
        load_study(plain)


def test_nifti_with_ct_preset(tmp_path):
    hu = np.full((4, 4, 1), 40.0, dtype=np.float32)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "ct.nii")
    assert load_study(tmp_path / "ct.nii", window="mediastinum").images[0][0, 0] == 128


# --- PNG / JPEG -------------------------------------------------------------------------------

def test_png_grey_rgba_palette_and_16_bit(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    g = load_study(tmp_path / "grey.png")
    assert g.modality == "OT" and np.array_equal(g.images[0], grey) and g.spacing is None

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped, not composited
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert load_study(tmp_path / "rgba.png").images[0][0, 0].tolist() == [200, 0, 0]

    pal = Image.new("P", (3, 3))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "pal.png")
    assert load_study(tmp_path / "pal.png").images[0][1, 1].tolist() == [10, 20, 30]

    deep = np.linspace(1000, 60000, 400).reshape(20, 20).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    d = load_study(tmp_path / "deep.png").images[0]
    assert d.dtype == np.uint8 and d.min() == 0 and d.max() == 255 and d.shape == (20, 20)


def test_jpeg_and_bytes_with_mime(tmp_path):
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 1] = 180
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    j = load_study(tmp_path / "photo.jpg")
    assert j.images[0].shape == (16, 16, 3) and abs(int(j.images[0][8, 8, 1]) - 180) <= 3

    png = png_bytes(Image.fromarray(np.full((5, 7), 9, dtype=np.uint8)))
    b = load_study(png, mime="image/png")
    assert b.images[0].shape == (5, 7) and b.source == "<bytes>"

    dcm = Path(pydicom_file("CT_small.dcm")).read_bytes()
    assert np.array_equal(load_study(dcm, mime="application/dicom").images[0],
                          load_study(pydicom_file("CT_small.dcm")).images[0])


def test_bare_dicom_without_preamble_via_suffixless_path_and_bytes(tmp_path):
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    bare = tmp_path / "bare"
    ds.preamble, ds.file_meta = None, FileMetaDataset()  # a bare dataset, as old archives hold
    ds.save_as(bare, implicit_vr=True, little_endian=True)
    raw = bare.read_bytes()
    assert raw[128:132] != b"DICM"
    expected = load_study(pydicom_file("MR_small.dcm")).images[0]
    assert np.array_equal(load_study(bare).images[0], expected)
    assert np.array_equal(load_study(raw, mime="application/dicom").images[0], expected)


# --- errors -----------------------------------------------------------------------------------

def test_truncated_dicom(tmp_path):
    raw = Path(pydicom_file("CT_small.dcm")).read_bytes()
    (tmp_path / "half.dcm").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImagingError) as err:
        load_study(tmp_path / "half.dcm")
    assert str(err.value) == "half.dcm is truncated or corrupt"


def test_text_file_renamed_dcm(tmp_path):
    (tmp_path / "notes.dcm").write_text("Patient looked well.\n" * 20)
    with pytest.raises(ImagingError, match=r"^notes\.dcm is not a DICOM file$"):
        load_study(tmp_path / "notes.dcm")


def test_size_limits_png_and_dicom_checked_before_decoding(tmp_path):
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImagingError, match=r"big\.png is too large \(400 pixels > limit 100\)"):
        load_study(tmp_path / "big.png", max_pixels=100)
    # Header claims 10000x10000 but holds 4 pixels: the limit must trip before any decoding.
    path = write_dicom(tmp_path / "huge.dcm", np.zeros((2, 2)))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 10000
    ds.save_as(path)
    with pytest.raises(ImagingError, match=r"huge\.dcm is too large \(100000000 pixels > limit 64000000\)"):
        load_study(path)
    with pytest.raises(ImagingError, match="too large"):
        load_study(pydicom_file("CT_small.dcm"), max_pixels=1000)


def test_missing_path_unknown_format_and_messages_name_only_the_file(tmp_path):
    with pytest.raises(ImagingError, match=r"^no such file: nope\.dcm$"):
        load_study(tmp_path / "nope.dcm")
    (tmp_path / "data.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ImagingError) as err:
        load_study(tmp_path / "data.bin")
    msg = str(err.value)
    assert "data.bin is not a supported image format" in msg and "NIfTI" in msg and "PNG" in msg
    assert str(tmp_path) not in msg and "\n" not in msg
    with pytest.raises(ImagingError, match="not a supported image format"):
        load_study(b"GIF89a" + bytes(64), mime="image/gif")
    with pytest.raises(ImagingError, match="not a PNG or JPEG"):
        load_study(b"\x89PNG\r\n\x1a\n" + bytes(64), mime="image/png")


def test_sr_document_has_no_pixel_data():
    with pytest.raises(ImagingError, match=r"test-SR\.dcm has no pixel data"):
        load_study(pydicom_file("test-SR.dcm"))


def test_study_refuses_identifying_metadata():
    with pytest.raises(ValueError, match="PatientName"):
        Study(images=[np.zeros((2, 2), np.uint8)], modality="OT", metadata={"PatientName": "X"})


# --- bundled samples and package hygiene ---------------------------------------------------------

def test_samples_load_with_expected_modality():
    cxr = load_study(SAMPLES / "chest_xray.dcm")
    assert cxr.modality == "DX" and cxr.images[0].shape == (256, 256) and cxr.images[0].std() > 20
    assert cxr.metadata["BodyPartExamined"] == "CHEST" and cxr.metadata["Window"].startswith("file")
    assert_no_identifiers(cxr, "PHANTOM", "SYN-0001", "19700101")
    assert pydicom.dcmread(SAMPLES / "chest_xray.dcm").PatientName == "PHANTOM^DEMO"  # for de-id work
    png = load_study(SAMPLES / "chest_xray.png")
    assert png.modality == "OT" and np.array_equal(png.images[0], cxr.images[0])
    head = load_study(SAMPLES / "head_ct.dcm")
    assert head.modality == "CT" and head.metadata["Window"].startswith("brain")
    img = head.images[0]
    assert img[0, 0] == 0 and img[64, 64] > 60 and img.max() == 255  # air, brain, skull
    for f in ("chest_xray.dcm", "head_ct.dcm", "chest_xray.png"):
        assert (SAMPLES / f).stat().st_size < 200_000


def test_make_samples_is_deterministic(tmp_path):
    script = ROOT / "scripts" / "make_samples.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True)
    for f in ("chest_xray.dcm", "head_ct.dcm", "chest_xray.png"):
        assert (tmp_path / f).read_bytes() == (SAMPLES / f).read_bytes()


def test_imaging_does_not_import_torch(tmp_path):
    # Load medlava.imaging without the package __init__ (which may pull in the model).
    code = (
        "import sys, types; pkg = types.ModuleType('medlava'); pkg.__path__ = [sys.argv[1]];"
        "sys.modules['medlava'] = pkg; import medlava.imaging;"
        "medlava.imaging.load_study(sys.argv[2]); assert 'torch' not in sys.modules, 'torch imported'"
    )
    src = ROOT / "src" / "medlava"
    shutil.copy(SAMPLES / "chest_xray.png", tmp_path / "x.png")
    subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "x.png")], check=True)


def test_pillow_decompression_bomb_is_a_size_error():
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    # Only a header: 20000 x 20000 greyscale, over Pillow's own limit, refused at open().
    header = (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    with pytest.raises(ImagingError, match="too large"):
        load_study(bomb, max_pixels=10**12)
    with pytest.raises(ImagingError, match=r"too large \(400000000 pixels > limit"):
        load_study(bomb)
