"""`medlava synth`: the synthetic phantom world every later step trains and evaluates on.

    generate_world(out_dir, n, seed, size=224) writes into out_dir:
      images/<id>.dcm|.png|.nii.gz  chest radiographs (CR/DX DICOM or PNG), CT DICOM, brain MRI NIfTI
      studies.jsonl    ground truth per study (findings with boxes on the displayed key image)
      questions.jsonl  LLaVA-Med model_vqa questions with VQA-RAD style short answers
      instruct.json    LLaVA instruction-tuning conversations (the Q/A pairs, then a report)
      captions.json    LLaVA stage-1 alignment pairs (one-sentence captions)
      reports.jsonl    template reports (findings, impression)

Deterministic: study i draws only from generators seeded with (seed, i, stream), so it is the
same whatever n is, and DICOM UIDs are hashes of (seed, i). Patient identifiers are synthetic
(PHANTOM^..., SYN-......) and exist so that de-identification has something to remove.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from medlava.imaging.windowing import apply_window
from medlava.train.phantoms import text
from medlava.train.phantoms.ct import draw_abdomen_ct, draw_chest_ct, draw_ct_series
from medlava.train.phantoms.mri import draw_brain_mri
from medlava.train.phantoms.radiograph import draw_chest_radiograph
from medlava.train.phantoms.study import PROTOCOL_KINDS, PhantomStudy, Rendering

# Approximate mix: radiographs 50 %, CT 30 % (half chest, half abdomen), brain MRI 20 %.
PROTOCOLS: tuple[tuple[str, float], ...] = (
    ("chest_xray", 0.50), ("chest_ct", 0.15), ("abdomen_ct", 0.15), ("brain_mri", 0.20))
DRAWERS: dict[str, Callable[[np.random.Generator, int, list[str]], Rendering]] = {
    "chest_xray": draw_chest_radiograph, "chest_ct": draw_chest_ct,
    "abdomen_ct": draw_abdomen_ct, "brain_mri": draw_brain_mri,
}
P_NORMAL, P_TWO = 0.30, 0.10
P_PNG, P_MONOCHROME1 = 0.25, 0.30  # of radiographs; MONOCHROME1 of the DICOM ones
MIN_SIZE = 64
IMAGE_STREAM, TEXT_STREAM = 0, 1  # independent generators: rewording text never changes pixels

SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
}
SURNAMES = ("ABBOTT", "BAKER", "CARTER", "DALTON", "ELLIS", "FOSTER", "GRANT", "HAYES", "IVERSON", "JENKINS",
            "KEMP", "LAWSON", "MORGAN", "NASH", "OWENS", "PRICE", "QUINN", "REYES", "SUTTON", "TATE", "UPTON",
            "VANCE", "WALSH", "YOUNG", "ZIMMER")
INSTITUTION = "Phantom General Hospital"


@dataclass
class Plan:
    """How one study's file is written (drawn from the study's own generator)."""

    fmt: str  # "dcm" / "png" / "nii.gz"
    monochrome1: bool
    identity: dict[str, str]


def study_id(seed: int, index: int) -> str:
    return f"syn-{seed}-{index:05d}"


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    return f"{value:.8g}"


def _identity(rng: np.random.Generator) -> dict[str, str]:
    """Synthetic patient identifiers, random per study but reproducible."""
    def day(start: dt.date, span_days: int) -> str:
        return (start + dt.timedelta(days=int(rng.integers(span_days)))).strftime("%Y%m%d")

    return {
        "PatientName": f"PHANTOM^{SURNAMES[int(rng.integers(len(SURNAMES)))]}",
        "PatientID": f"SYN-{int(rng.integers(10**6)):06d}",
        "PatientBirthDate": day(dt.date(1930, 1, 1), 75 * 365),
        "PatientSex": str(rng.choice(["F", "M"])),
        "StudyDate": day(dt.date(2015, 1, 1), 10 * 365),
        "StudyTime": f"{int(rng.integers(7, 20)):02d}{int(rng.integers(60)):02d}00",
        "AccessionNumber": f"SYNACC{int(rng.integers(10**8)):08d}",
        "InstitutionName": INSTITUTION,
        "ReferringPhysicianName": f"SYNTHETIC^{SURNAMES[int(rng.integers(len(SURNAMES)))]}",
    }


def _choose(rng: np.random.Generator) -> tuple[str, list[str]]:
    """The protocol and the finding kinds (0, 1 or 2 different ones) of one study."""
    names, weights = zip(*PROTOCOLS, strict=True)
    protocol = str(rng.choice(names, p=np.asarray(weights) / sum(weights)))
    roll = rng.random()
    count = 0 if roll < P_NORMAL else 2 if roll >= 1.0 - P_TWO else 1
    return protocol, [str(k) for k in rng.choice(PROTOCOL_KINDS[protocol], size=count, replace=False)]


def make_study(seed: int, index: int, size: int = 224, volumes: bool = False) -> tuple[PhantomStudy, Rendering, Plan]:
    """Draw study `index` of world `seed`: its ground truth, its pixels and how to write them.

    volumes: CT studies are series (draw_ct_series) and brain MRI masses lie off the middle slice
    (draw_brain_mri), focal lesions on the slice their finding records.
    """
    rng = np.random.default_rng([seed, index, IMAGE_STREAM])
    protocol, kinds = _choose(rng)
    if volumes and protocol.endswith("_ct"):
        rendering = draw_ct_series(DRAWERS[protocol], rng, size, kinds)
    else:
        options = {"off_centre": True} if volumes and protocol == "brain_mri" else {}
        rendering = DRAWERS[protocol](rng, size, kinds, **options)
    sid = study_id(seed, index)
    if protocol == "chest_xray":
        modality, name, part = str(rng.choice(["CR", "DX"])), "x-ray", "chest"
        fmt = "png" if rng.random() < P_PNG else "dcm"
        mono1 = fmt == "dcm" and rng.random() < P_MONOCHROME1
    elif protocol == "brain_mri":
        modality, name, part, fmt, mono1 = "MR", "mri", "head", "nii.gz", False
    else:
        modality, name, part, fmt, mono1 = "CT", "ct", protocol.split("_")[0], "dcm", False
    image = sid if rendering.pixels.ndim == 3 and modality == "CT" else f"{sid}.{fmt}"  # a series: a folder
    study = PhantomStudy(id=sid, image=image, modality=modality, modality_name=name, body_part=part,
                         findings=rendering.findings, size=rendering.display_size, ctr=rendering.ctr)
    return study, rendering, Plan(fmt, mono1, _identity(rng))


def _uid(seed: int, index: int, what: str) -> str:
    return generate_uid(entropy_srcs=["medlava-synth", str(seed), str(index), what])


def _write_dicom(path: Path, study: PhantomStudy, stored: np.ndarray, plan: Plan, seed: int, index: int,
                 instance: int = 1, **elements: object) -> None:
    sop_class = SOP_CLASSES[study.modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = _uid(seed, index, "sop" if instance == 1 else f"sop{instance}")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(seed, index, "study")
    ds.SeriesInstanceUID = _uid(seed, index, "series")
    for keyword, value in plan.identity.items():
        setattr(ds, keyword, value)
    ds.StudyID = "1"
    ds.StudyDescription = "SYNTHETIC PHANTOM - NOT A REAL PATIENT"
    ds.Manufacturer = "medlava synthetic"
    ds.Modality = study.modality
    ds.BodyPartExamined = study.body_part.upper()
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _write_radiograph(path: Path, study: PhantomStudy, r: Rendering, plan: Plan, seed: int, index: int) -> None:
    assert r.window is not None
    center, width = r.window
    if plan.fmt == "png":  # exactly what load_study shows for the DICOM version
        Image.fromarray(apply_window(r.pixels, center, width)).save(path)
        return
    stored = r.pixels
    if plan.monochrome1:
        # Stored inverted with the window mirrored: after medlava's MONOCHROME1 inversion the
        # displayed image equals the MONOCHROME2 one (c' = 4096 - c makes the ramps coincide).
        stored, center = 4095 - stored, 4096 - center
    spacing = [_ds(r.spacing_mm[0]), _ds(r.spacing_mm[1])]
    extra: dict[str, object] = {"PresentationIntentType": "FOR PRESENTATION"} if study.modality == "DX" else {}
    _write_dicom(path, study, stored, plan, seed, index, PhotometricInterpretation=(
        "MONOCHROME1" if plan.monochrome1 else "MONOCHROME2"), ViewPosition="PA", PatientOrientation=["L", "F"],
        PixelSpacing=spacing, ImagerPixelSpacing=spacing, WindowCenter=_ds(center), WindowWidth=_ds(width), **extra)


def _write_ct(path: Path, study: PhantomStudy, r: Rendering, plan: Plan, seed: int, index: int) -> None:
    """One CT slice file, or for a series (3-D pixels) a folder of slice files, 5 mm apart."""
    assert r.window is not None
    slices = r.pixels if r.pixels.ndim == 3 else r.pixels[None]
    n = slices.shape[1]
    sp = r.spacing_mm[0]
    if r.pixels.ndim == 3:
        path.mkdir(exist_ok=True)
    for k, hu in enumerate(slices):
        z = (k - len(slices) // 2) * 5.0
        stored = np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)  # slope 1, intercept -1024
        _write_dicom(path / f"CT{k + 1:04d}.dcm" if r.pixels.ndim == 3 else path, study, stored, plan, seed, index,
                     instance=k + 1, PhotometricInterpretation="MONOCHROME2", RescaleSlope="1",
                     RescaleIntercept="-1024", RescaleType="HU", PixelSpacing=[_ds(sp), _ds(sp)], SliceThickness="5",
                     ImagePositionPatient=[_ds(-(n - 1) / 2 * sp), _ds(-(n - 1) / 2 * sp), _ds(z)],
                     ImageOrientationPatient=["1", "0", "0", "0", "1", "0"],
                     FrameOfReferenceUID=_uid(seed, index, "frame"), KVP="120",
                     WindowCenter=_ds(r.window[0]), WindowWidth=_ds(r.window[1]))


def _write_nifti(path: Path, r: Rendering) -> None:
    img = nib.Nifti1Image(r.pixels, r.affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"medlava synthetic phantom"
    # gzip ourselves: mtime 0 keeps files byte-identical; level 1 is 5x faster than nibabel's 9
    # and, on noisy voxels, barely bigger.
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def write_image(images_dir: Path, study: PhantomStudy, rendering: Rendering, plan: Plan, seed: int,
                index: int) -> Path:
    """Write one study's image file into images_dir and return its path."""
    path = images_dir / study.image
    if study.modality_name == "x-ray":
        _write_radiograph(path, study, rendering, plan, seed, index)
    elif study.modality_name == "ct":
        _write_ct(path, study, rendering, plan, seed, index)
    else:
        _write_nifti(path, rendering)
    return path


def text_records(study: PhantomStudy, seed: int, index: int) -> tuple[list[dict], dict, dict, dict]:
    """(questions, instruct entry, caption entry, report record) of one study."""
    rng = np.random.default_rng([seed, index, TEXT_STREAM])
    qas = text.questions(study, rng)
    questions = [{
        "question_id": index * 100 + j, "image": study.image, "text": qa.text, "answer": qa.answer,
        "answer_type": qa.answer_type, "question_kind": qa.kind, "modality": study.modality_name,
        "finding_kinds": study.kinds(), "study_id": study.id,
    } for j, qa in enumerate(qas)]
    turns = []
    for j, qa in enumerate(qas):
        turns.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + qa.text})
        turns.append({"from": "gpt", "value": qa.answer})
    turns.append({"from": "human", "value": text.report_prompt(rng)})
    turns.append({"from": "gpt", "value": text.report_text(study)})
    instruct = {"id": study.id, "image": study.image, "conversations": turns}
    cap = {"id": study.id, "image": study.image, "conversations": [
        {"from": "human", "value": "<image>\n" + text.caption_prompt(rng)},
        {"from": "gpt", "value": text.caption(study)}]}
    findings, impression = text.report(study)
    rep = {"id": study.id, "image": study.image, "findings": findings, "impression": impression}
    return questions, instruct, cap, rep


def _jsonl(f, record: dict) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _build(job: tuple[Path, int, int, int, bool]) -> tuple[PhantomStudy, list[dict], dict, dict, dict]:
    """Draw, write and describe one study (runs in a worker process when workers > 1)."""
    images, seed, index, size, volumes = job
    study, rendering, plan = make_study(seed, index, size, volumes)
    write_image(images, study, rendering, plan, seed, index)
    return (study, *text_records(study, seed, index))


def generate_world(out_dir: str | Path, n: int, seed: int, size: int = 224, workers: int = 1,
                   volumes: bool = False) -> list[PhantomStudy]:
    """Write an n-study phantom world into out_dir (see the module docstring); returns the studies.

    workers > 1 draws studies in that many processes; the output is identical either way.
    volumes: CT series and off-centre MRI masses (see make_study), for volume analysis.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    jobs = [(images, seed, index, size, volumes) for index in range(n)]
    studies: list[PhantomStudy] = []
    instruct: list[dict] = []
    captions: list[dict] = []
    with (ExitStack() as stack,
          open(out / "studies.jsonl", "w", encoding="utf-8") as f_studies,
          open(out / "questions.jsonl", "w", encoding="utf-8") as f_questions,
          open(out / "reports.jsonl", "w", encoding="utf-8") as f_reports):
        if workers > 1 and n > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=min(workers, n)))
            results = pool.map(_build, jobs, chunksize=max(1, min(16, n // (4 * workers))))
        else:
            results = map(_build, jobs)
        for study, questions, conv, cap, rep in results:  # in index order, whatever the pool did
            _jsonl(f_studies, study.to_record())
            for q in questions:
                _jsonl(f_questions, q)
            _jsonl(f_reports, rep)
            instruct.append(conv)
            captions.append(cap)
            studies.append(study)
    for name, items in (("instruct.json", instruct), ("captions.json", captions)):
        with open(out / name, "w", encoding="utf-8") as f:
            json.dump(items, f, ensure_ascii=False, indent=1)
    return studies


def main(argv: Sequence[str] | None = None) -> int:
    """`medlava synth --out DIR --n N --seed S [--size PX]`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="medlava synth", description="Write a synthetic phantom world "
                                     "(images, ground truth, VQA questions, instructions, captions, reports).")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--n", type=int, default=1000, help="number of studies (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--size", type=int, default=224, help="radiograph/CT side in pixels; MRI is half (default 224)")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="processes drawing studies (default: the CPU count, at most 8); same output for any")
    parser.add_argument("--volumes", action="store_true",
                        help="CT as 11-slice series and brain MRI masses off the middle slice, lesions away from the middle slice (a test world for volume analysis)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        studies = generate_world(args.out, args.n, args.seed, args.size, workers=args.workers, volumes=args.volumes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write to {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    mix = Counter(s.modality_name for s in studies)
    normal = sum(s.normal for s in studies)
    print(f"wrote {len(studies)} studies to {args.out} in {time.perf_counter() - start:.1f} s "
          f"({', '.join(f'{k} {v}' for k, v in sorted(mix.items()))}; {normal} normal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
