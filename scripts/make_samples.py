"""Write the bundled sample studies into samples/ (synthetic phantoms, never real patients).

    python scripts/make_samples.py [OUT_DIR]

Deterministic: a fixed RNG seed and UIDs derived from fixed strings, so reruns give
byte-identical files. The identifiers (PHANTOM^DEMO, SYN-0001, ...) are fake on purpose:
de-identification code needs something to strip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from medlava.imaging.windowing import apply_window

SEED = 20240611
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
CXR_WINDOW = (1600.0, 3000.0)  # center, width in stored values


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["medlava-sample", *parts])


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (v, u) coordinates in [-1, 1]: v down the rows, u across the columns."""
    c = (np.arange(n) - (n - 1) / 2) / (n / 2)
    return np.meshgrid(c, c, indexing="ij")


def _ellipse(v: np.ndarray, u: np.ndarray, cv: float, cu: float, rv: float, ru: float) -> np.ndarray:
    return ((v - cv) / rv) ** 2 + ((u - cu) / ru) ** 2 <= 1.0


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (softens the phantom's hard edges like real anatomy)."""
    r = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(img, r, mode="edge")
    rows = np.apply_along_axis(lambda m: np.convolve(m, k, mode="valid"), 1, padded)
    return np.apply_along_axis(lambda m: np.convolve(m, k, mode="valid"), 0, rows)


def chest_radiograph(rng: np.random.Generator, n: int = 256) -> np.ndarray:
    """PA chest film, 12-bit, bright = attenuating. Patient right is on the image left."""
    v, u = _grid(n)
    img = np.full((n, n), 200.0)  # air
    img[_ellipse(v, u, 0.15, 0.0, 0.95, 0.86)] = 2400.0  # thorax soft tissue
    img[_ellipse(v, u, -0.95, 0.0, 0.3, 0.22)] = 2400.0  # neck
    for cu in (-0.4, 0.4):  # lung fields
        img[_ellipse(v, u, -0.02, cu, 0.62, 0.27)] = 900.0
    img[_ellipse(v, u, 0.32, 0.1, 0.3, 0.3)] = 2600.0  # heart shadow, slightly to the left
    img[(np.abs(u) < 0.09) & (v < 0.3) & (v > -0.9)] = 2550.0  # mediastinum / spine
    img[(np.abs(u) < 0.025) & (v < -0.3) & (v > -0.95)] = 1500.0  # trachea
    thorax = _ellipse(v, u, 0.15, 0.0, 0.95, 0.86)
    for k in range(7):  # posterior rib arcs, each side bowing downwards laterally
        centre = -0.55 + 0.15 * k + 0.35 * (np.abs(u) - 0.4) ** 2
        rib = (np.abs(v - centre) < 0.025) & (np.abs(u) > 0.1) & (np.abs(u) < 0.75) & thorax
        img[rib] += 450.0
    nodule = (v - 0.0) ** 2 + (u + 0.42) ** 2 <= (7 / (n / 2)) ** 2  # right lung, ~7 px radius
    img[nodule] += 700.0
    img = _blur(img, 1.5) + rng.normal(0.0, 40.0, img.shape)
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def head_ct_hu(rng: np.random.Generator, n: int = 128) -> np.ndarray:
    """Axial head CT in HU: air, scalp, skull ring, brain, two lateral ventricles."""
    v, u = _grid(n)
    hu = np.full((n, n), -1000.0)
    hu[_ellipse(v, u, 0.0, 0.0, 0.9, 0.75)] = 40.0  # scalp
    hu[_ellipse(v, u, 0.0, 0.0, 0.86, 0.71)] = 1000.0  # skull
    hu[_ellipse(v, u, 0.0, 0.0, 0.76, 0.61)] = 35.0  # brain
    for cu in (-0.12, 0.12):
        hu[_ellipse(v, u, -0.05, cu, 0.22, 0.07)] = 5.0  # ventricles (CSF)
    hu = _blur(hu, 0.7) + rng.normal(0.0, 4.0, hu.shape)
    return np.rint(hu)


def _dicom(path: Path, sop_class: str, pixels: np.ndarray, **elements: object) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = _uid(path.name, "sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(path.name, "study")
    ds.SeriesInstanceUID = _uid(path.name, "series")
    # Synthetic identifiers, present so de-identification has something to remove.
    ds.PatientName = "PHANTOM^DEMO"
    ds.PatientID = "SYN-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "SYN-ACC-0001"
    ds.InstitutionName = "SYNTHETIC PHANTOM LAB"
    ds.ReferringPhysicianName = "DOCTOR^SYNTHETIC"
    ds.StudyDescription = "SYNTHETIC PHANTOM - NOT A REAL PATIENT"
    ds.ImageComments = "Synthetic phantom from medlava scripts/make_samples.py"
    ds.Manufacturer = "medlava synthetic"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    cxr = chest_radiograph(rng)
    _dicom(out / "chest_xray.dcm", DX_STORAGE, cxr, Modality="DX", BodyPartExamined="CHEST",
           ViewPosition="PA", PatientOrientation=["L", "F"], PresentationIntentType="FOR PRESENTATION",
           PixelSpacing=[1.4, 1.4], WindowCenter=CXR_WINDOW[0], WindowWidth=CXR_WINDOW[1])
    # The PNG is exactly what load_study shows for the DICOM (same window maths).
    Image.fromarray(apply_window(cxr, *CXR_WINDOW)).save(out / "chest_xray.png", optimize=True)

    hu = head_ct_hu(rng)
    stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)  # slope 1, intercept -1024
    _dicom(out / "head_ct.dcm", CT_STORAGE, stored, Modality="CT", BodyPartExamined="HEAD",
           RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU", PixelSpacing=[1.8, 1.8],
           SliceThickness=5.0, ImagePositionPatient=[-115.2, -115.2, 40.0],
           ImageOrientationPatient=[1, 0, 0, 0, 1, 0], FrameOfReferenceUID=_uid("head_ct.dcm", "frame"))

    for f in sorted(out.iterdir()):
        print(f"{f}  {f.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "samples")
