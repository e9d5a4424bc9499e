"""Volumes and series: every slice read, candidate slices by content, answers on the most telling
slice (by the model's own confidence), slice numbers and positions on answers and report findings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medlava import LLM, SamplingParams
from medlava.analysis.volumes import SliceAnswer, candidate_positions, choose, slice_measures
from medlava.imaging import key_slice_indices, load_study
from medlava.train.synthetic import make_study, write_image

# Study 131 of world 4242 drawn with --volumes: a left brain mass centred on slice 6 of 24,
# which the middle slice (12) misses, and hydrocephalus. Study 16: a head with no mass. Study 192:
# hydrocephalus and a right brain mass on slice 18, which the demo model reports cleanly (on
# study 131's slice 5 it writes a chest report: a false "lung nodule" and "pleural effusion").
WORLD, MASS_STUDY, NORMAL_STUDY, REPORT_STUDY = 4242, 131, 16, 192


def phantom(tmp_path: Path, index: int) -> tuple[Path, object]:
    study, rendering, plan = make_study(WORLD, index, volumes=True)
    return write_image(tmp_path, study, rendering, plan, WORLD, index), study


def as_dicom_series(nifti: Path, folder: Path) -> Path:
    """The phantom's display slices as an MR DICOM series, one file per slice, z = 4 mm x index."""
    folder.mkdir()
    stack = load_study(nifti, key_slices=None).images
    study_uid, series_uid = generate_uid(), generate_uid()
    for k, img in enumerate(stack):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series_uid, "MR"
        ds.PatientName, ds.PatientID, ds.BodyPartExamined = "PHANTOM^VOLUME", "SYN-1", "HEAD"
        ds.InstanceNumber, ds.ImagePositionPatient = 24 - k, [0, 0, 4.0 * k]  # files out of order on purpose
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.Rows, ds.Columns = img.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = img.tobytes()
        ds.save_as(folder / f"{(k * 7) % 24:03d}.dcm", enforce_file_format=True)
    return folder


def test_all_slices_on_request_and_their_positions(tmp_path):
    assert key_slice_indices(5, None) == [0, 1, 2, 3, 4]
    nifti, _ = phantom(tmp_path, MASS_STUDY)
    assert len(load_study(nifti).images) == 1
    volume = load_study(nifti, key_slices=None)
    assert len(volume.images) == 24 and volume.metadata["KeySlices"] == ",".join(map(str, range(24)))
    series = load_study(as_dicom_series(nifti, tmp_path / "series"), key_slices=None)
    assert series.metadata["SlicePositions"].split(",")[:3] == ["0", "4", "8"]
    assert all(np.array_equal(a, b) for a, b in zip(series.images, volume.images, strict=True))


def test_candidates_find_the_mass_slice_and_leave_a_normal_head_alone(tmp_path):
    nifti, truth = phantom(tmp_path, MASS_STUDY)
    mass = next(f for f in truth.findings if f.kind == "brain_mass")
    assert mass.slice == 6
    volume = load_study(nifti, key_slices=None)
    scores, _ = slice_measures(volume)
    assert abs(int(np.argmax(scores)) - mass.slice) <= 1
    candidates = candidate_positions(volume)
    assert 12 in candidates and any(abs(c - mass.slice) <= 1 for c in candidates)
    normal = load_study(phantom(tmp_path, NORMAL_STUDY)[0], key_slices=None)
    assert candidate_positions(normal) == [12]  # nothing stands out: the middle slice only


def test_a_finding_on_any_slice_counts_then_confidence_decides():
    a = SliceAnswer(3, "no", [1], "stop", -0.01)
    b = SliceAnswer(6, "yes", [2], "stop", -0.4)
    c = SliceAnswer(9, "yes", [2], "stop", -0.2)
    assert choose("Is there a mass?", [a, b, c]) is c
    assert choose("Is there a mass?", [a, replace(b, text="no")]) is a
    assert choose("Is this study normal?", [replace(a, text="yes"), replace(b, text="no")]).position == 6


def test_engine_logprobs_are_the_generated_tokens_log_probabilities(model_dir, xray_image):
    llm = LLM(str(model_dir()))
    prompt = "USER: <image>\nDescribe. ASSISTANT:"
    out = llm.generate({"prompt": prompt, "images": [xray_image]},
                       SamplingParams(max_tokens=6, ignore_eos=True, logprobs=0), use_tqdm=False)[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    # Scoring the same continuation as a prompt gives the same values (prompt_logprobs is tested
    # against the plain model's log_softmax in test_prompt_logprobs.py).
    prompt_ids = list(llm.generate({"prompt": prompt, "images": [xray_image]},
                                   SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids)
    rescored = llm.generate({"prompt_token_ids": prompt_ids + out.token_ids, "images": [xray_image]},
                            SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert np.allclose(rescored.prompt_logprobs[len(prompt_ids):], out.logprobs, atol=1e-4)
    assert all(v <= 0 for v in out.logprobs)
    plain = llm.generate({"prompt": prompt, "images": [xray_image]}, SamplingParams(max_tokens=2),
                         use_tqdm=False)[0]
    assert plain.logprobs is None


@pytest.fixture(scope="module")
def analyzer():
    from medlava import Analyzer

    return Analyzer()


def test_volume_question_is_answered_on_the_slice_that_shows_it(analyzer, tmp_path):
    nifti, _ = phantom(tmp_path, MASS_STUDY)
    auto = analyzer.ask(str(nifti), "Is there a brain mass?")
    middle = analyzer.ask_many([(str(nifti), "Is there a brain mass?")], volumes="middle")[0]
    assert (middle.answer, middle.slice) == ("no", None)  # the middle slice misses it
    assert auto.answer == "yes" and abs(auto.slice - 6) <= 1
    normal = analyzer.ask(str(phantom(tmp_path, NORMAL_STUDY)[0]), "Is there a brain mass?")
    assert (normal.answer, normal.slice) == ("no", 12)


def test_slice_reports_merge_each_finding_on_its_own_slice(tmp_path):
    from medlava.analysis.reporting import merge_slice_reports

    volume = load_study(as_dicom_series(phantom(tmp_path, MASS_STUDY)[0], tmp_path / "series"), key_slices=None)
    reads = [
        SliceAnswer(12, "Findings: No mass lesion. The ventricles are enlarged.\nImpression: Hydrocephalus.",
                    [1], "stop", -0.01),
        SliceAnswer(6, "Findings: There is a 27 mm enhancing mass in the right cerebral hemisphere. The ventricles "
                       "are normal in size.\nImpression: Right cerebral mass.", [1], "stop", -0.2),
        SliceAnswer(9, "Findings: No mass lesion.\nImpression: Normal mri of the brain.", [1], "stop", -0.001),
    ]
    report = merge_slice_reports(reads, volume, modality="MR", body_part="head", model="m")
    found = {(f.name, f.side): (f.slice, f.slice_z_mm) for f in report.findings}
    assert found == {("hydrocephalus", None): (12, 48.0), ("brain mass", "right"): (6, 24.0)}
    assert "No mass lesion" not in report.sections.findings  # the other slice showed one
    assert "Right brain mass (slice 6)." in report.impression


def test_report_of_a_series_gives_slices_and_an_sr_on_the_right_file(analyzer, tmp_path):
    folder = as_dicom_series(phantom(tmp_path, REPORT_STUDY)[0], tmp_path / "series")
    report = analyzer.report(str(folder))
    assert report.findings and all(f.slice is not None and f.slice_z_mm == 4.0 * f.slice for f in report.findings)
    assert any(f.name == "brain mass" and abs(f.slice - 18) <= 1 for f in report.findings)  # off the middle slice
    assert all(f.box is not None for f in report.findings)  # grounded on their slices

    from medlava.analysis.sr import report_sr

    path = tmp_path / "sr.dcm"
    report_sr(report, folder).save_as(path, enforce_file_format=True)
    source = {float(pydicom.dcmread(p).ImagePositionPatient[2]): pydicom.dcmread(p).SOPInstanceUID
              for p in folder.iterdir()}
    refs = [item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in _walk(pydicom.dcmread(path)) if item.ValueType == "SCOORD"]
    assert refs == [source[f.slice_z_mm] for f in report.findings]  # each box on its finding's slice file


def _walk(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)
