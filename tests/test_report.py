"""Structured reports: parsing, the pydantic Report, FHIR and DICOM SR exports, `medlava report`."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError
from typer.testing import CliRunner

from medlava.analysis.fhir import report_bundle
from medlava.analysis.report import Report, ReportFinding, build_report
from medlava.analysis.report_text import extract_findings, split_sections
from medlava.analysis.sr import report_sr
from medlava.cli import app
from medlava.errors import ImagingError
from medlava.eval.reports import evaluate_reports, kind_of, score_labels

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CHEST = SAMPLES / "phantom_chest_effusion.dcm"  # a right pleural effusion
BRAIN = SAMPLES / "phantom_brain_mass.nii.gz"

XRAY_TEXT = ("Findings: There is a 12 mm nodule in the right upper zone. There is a left pneumothorax with a "
             "visible pleural edge. No pleural effusion. The heart is enlarged, with a cardiothoracic ratio of "
             "0.62.\nImpression: Right upper zone pulmonary nodule. Left pneumothorax. Cardiomegaly.")


def names(findings) -> list[tuple]:
    return [(f.name, f.side) for f in findings]


def test_sections_split_on_headings_including_markdown():
    s = split_sections("**Technique**: PA chest.\n## Findings\nNo effusion.\nIMPRESSION: Normal chest.")
    assert s == {"technique": "PA chest.", "findings": "No effusion.", "impression": "Normal chest."}
    assert split_sections("Just prose, no headings.") == {"findings": "Just prose, no headings."}


def test_findings_are_what_is_present_with_side_location_and_size():
    s = split_sections(XRAY_TEXT)
    found = extract_findings(s["findings"], s["impression"])
    assert names(found) == [("lung nodule", "right"), ("pneumothorax", "left"), ("cardiomegaly", None)]
    nodule = found[0]
    assert (nodule.location, nodule.size_mm) == ("upper zone", 12.0)  # merged from both sections


@pytest.mark.parametrize("text", [
    "No pleural effusion or pneumothorax.",
    "There is no evidence of a mass.",
    "The previously seen nodule is not seen.",
    "Lungs are clear without consolidation.",
    "The ventricles are normal in size.",
])
def test_negated_statements_are_not_findings(text):
    assert extract_findings(text) == []


def test_organ_qualifies_generic_terms_and_cm_becomes_mm():
    found = extract_findings("There is a 2.5 cm hypodense lesion in the right lobe of the liver. "
                             "There is a 6 mm stone in the left kidney. A 31 mm enhancing mass in the left cerebral "
                             "hemisphere with surrounding edema.")
    assert names(found) == [("liver lesion", "right"), ("kidney stone", "left"), ("brain mass", "left")]
    assert [f.size_mm for f in found] == [25.0, 6.0, 31.0]
    assert found[0].location == "right lobe of the liver"  # anatomy keeps its side word
    assert found[2].location == "cerebral hemisphere"  # and edema, an attribute after "with", is no finding


def test_report_model_validates():
    r = build_report(XRAY_TEXT, modality="DX", body_part="chest", model="m")
    assert Report.model_validate_json(r.model_dump_json()) == r
    with pytest.raises(ValidationError):
        ReportFinding(name="nodule", side="middle")
    with pytest.raises(ValidationError):
        ReportFinding(name="nodule", box=[1, 2, 3])
    assert "AI-generated draft" in r.to_markdown() and "review" in r.disclaimer


def test_fhir_bundle_validates_and_carries_every_finding():
    r = build_report(XRAY_TEXT, modality="DX", body_part="chest", model="medlava-tiny")
    bundle = Bundle.model_validate_json(report_bundle(r).model_dump_json())
    resources = [e.resource for e in bundle.entry]
    report = next(x for x in resources if x.get_resource_type() == "DiagnosticReport")
    observations = [x for x in resources if x.get_resource_type() == "Observation"]
    assert report.status == "preliminary" and report.category[0].coding[0].code == "RAD"
    assert report.conclusion.startswith("Right upper zone pulmonary nodule.")
    assert len(report.result) == len(observations) == 3
    assert [o.code.text for o in observations] == ["lung nodule", "pneumothorax", "cardiomegaly"]
    assert observations[1].code.coding[0].code == "36118008"  # SNOMED CT pneumothorax, from DICOM's dictionary
    assert observations[0].component[0].valueQuantity.value == 12.0
    text = report.presentedForm[0].data.decode()  # fhir.resources decodes base64Binary
    assert "AI-generated draft" in text and "Cardiomegaly" in text
    device = next(x for x in resources if x.get_resource_type() == "Device")
    assert device.deviceName[0].name == "medlava-tiny"


def test_sr_reads_back_in_the_source_study_naming_every_finding(tmp_path):
    r = build_report(XRAY_TEXT, modality="DX", body_part="chest", model="medlava-tiny")
    r.findings[0].box = [30, 40, 60, 70]
    path = tmp_path / "sr.dcm"
    report_sr(r, CHEST).save_as(path, enforce_file_format=True)
    sr, src = pydicom.dcmread(path), pydicom.dcmread(CHEST, stop_before_pixels=True)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == ("UNVERIFIED", "PARTIAL", "PRELIMINARY")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert any(e.get("ManufacturerModelName") == "medlava-tiny" for e in sr.ContributingEquipmentSequence)

    import highdicom as hd

    doc = hd.sr.srread(path)
    groups = doc.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1  # the one finding with a box
    region = groups[0].roi
    assert region.value.tolist() == [[30, 40], [60, 40], [60, 70], [30, 70], [30, 40]]
    ref = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    dump = str(sr)
    for finding in ("Nodule", "Pneumothorax", "Cardiomegaly"):  # SNOMED meanings in the evaluations
        assert finding in dump
    assert "AI-generated draft" in dump


def test_sr_refuses_a_non_dicom_source():
    r = build_report(XRAY_TEXT, modality="MR", body_part="head", model="m")
    with pytest.raises(ImagingError, match="needs a DICOM source"):
        report_sr(r, BRAIN)


def test_world_kinds_and_micro_f1():
    assert kind_of("lung nodule", "chest_xray") == "nodule"
    assert kind_of("lung nodule", "chest_ct") == "lung_nodule"
    assert kind_of("brain mass", "brain_mri") == "brain_mass"
    assert kind_of("pneumonia", "chest_xray") is None
    s = score_labels([({"mass": "left", "nodule": "right"}, {"mass": "right"}), ({}, {"hydrocephalus": None})])
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 1)
    assert s["f1"] == pytest.approx(0.5) and s["side_accuracy"] == 0.0


@pytest.fixture(scope="module")
def analyzer():
    from medlava import Analyzer

    return Analyzer()


def test_demo_model_reports_the_phantom_effusion(analyzer):
    r = analyzer.report(str(CHEST))
    assert (r.modality, r.body_part) == ("DX", "chest")
    assert names(r.findings) == [("pleural effusion", "right")]
    assert r.sections.technique.startswith("X-ray of the chest")
    x0, y0, x1, y1 = r.findings[0].box  # grounded: on the patient's right, the image's left half
    assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224 and (x0 + x1) / 2 < 112
    assert analyzer.report(str(CHEST), grounding=None).findings[0].box is None


def test_report_scores_on_a_small_held_out_world(analyzer, tmp_path):
    from medlava.train.synthetic import generate_world

    studies = generate_world(tmp_path, n=16, seed=777)
    reports = analyzer.report_many([str(tmp_path / "images" / s.image) for s in studies])
    result = evaluate_reports(tmp_path, reports)
    assert result["model"]["f1"] > result["baseline"]["f1"] + 0.3


runner = CliRunner()


def test_cli_formats(tmp_path):
    res = runner.invoke(app, ["report", str(CHEST), "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) == {"modality", "body_part", "sections", "impression", "findings", "model", "disclaimer"}
    assert data["findings"][0]["name"] == "pleural effusion"
    res = runner.invoke(app, ["report", str(CHEST), "--format", "fhir", "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 0 and Bundle.model_validate_json((tmp_path / "r.json").read_text())
    res = runner.invoke(app, ["report", str(CHEST), "--format", "sr", "--out", str(tmp_path / "r.dcm")])
    assert res.exit_code == 0 and pydicom.dcmread(tmp_path / "r.dcm").Modality == "SR"
    res = runner.invoke(app, ["report", str(BRAIN)])
    assert res.exit_code == 0 and "## Impression" in res.stdout and "AI-generated draft" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--format", "sr"], "cannot go to stdout"),
    (["--format", "pdf"], "--format must be one of"),
])
def test_cli_refuses_bad_options(args, message):
    res = runner.invoke(app, ["report", str(CHEST), *args])
    assert res.exit_code == 2 and message in res.output


def test_cli_bad_inputs_get_one_line(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("not dicom")
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(CHEST.read_bytes()[:2000])
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [([str(text)], "not a DICOM file"), ([str(corrupt)], "corrupt"), ([str(empty)], "no DICOM images"),
             ([str(BRAIN), "--format", "sr", "--out", str(tmp_path / "x.dcm")], "needs a DICOM source")]
    for args, message in cases:
        res = runner.invoke(app, ["report", *args])
        assert res.exit_code == 2, args
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
