"""A `Report` as a FHIR R4B Bundle: a preliminary radiology DiagnosticReport, one Observation per
finding and the Device (the model) that made them, built and validated with fhir.resources.

No Patient is included: medlava never copies identifiers out of the image; the receiving system
links `subject` when it files the draft.
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid

from fhir.resources.R4B.bundle import Bundle
from pydicom.sr.codedict import codes

from medlava import __version__
from medlava.analysis.codes import snomed_code
from medlava.analysis.report import Report, ReportFinding, describe

SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
AI_TAG = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST",
          "display": "Artificial Intelligence asserted"}
RADIOLOGY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                         "display": "Radiology"}]}
IMAGING = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging",
                       "display": "Imaging"}]}
REPORT_CODE = {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
               "text": "Radiology report (AI draft)"}


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _observation(f: ReportFinding, device_ref: str, issued: str) -> dict:
    code = snomed_code(f.name)
    obs = {
        "resourceType": "Observation",
        "meta": {"tag": [AI_TAG]},
        "status": "preliminary",
        "category": [IMAGING],
        "code": {"text": f.name, **({"coding": [{"system": SNOMED, "code": code.value, "display": code.meaning}]}
                                    if code else {})},
        "issued": issued,
        "device": {"reference": device_ref},
        "note": [{"text": f"{describe(f)}. AI-generated finding; to be reviewed by a clinician."}],
    }
    site = " ".join(filter(None, [f.side, f.location]))
    if site:
        obs["bodySite"] = {"text": site}
    if f.size_mm:
        diameter = codes.SCT.Diameter
        obs["component"] = [{
            "code": {"coding": [{"system": SNOMED, "code": diameter.value, "display": diameter.meaning}]},
            "valueQuantity": {"value": f.size_mm, "unit": "mm", "system": UCUM, "code": "mm"},
        }]
    return obs


def report_bundle(report: Report) -> Bundle:
    """The validated Bundle (type collection) for `report`."""
    issued = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    device_ref = _urn()
    device = {"resourceType": "Device", "manufacturer": "medlava", "version": [{"value": __version__}],
              "deviceName": [{"name": report.model, "type": "model-name"}],
              "note": [{"text": "Vision-language model that drafted this report"}]}
    observations = [(_urn(), _observation(f, device_ref, issued)) for f in report.findings]
    text = report.to_markdown()
    diagnostic = {
        "resourceType": "DiagnosticReport",
        "meta": {"tag": [AI_TAG]},
        "status": "preliminary",
        "category": [RADIOLOGY],
        "code": REPORT_CODE,
        "issued": issued,
        "result": [{"reference": ref} for ref, _ in observations],
        "conclusion": f"{report.impression} ({report.disclaimer})" if report.impression else report.disclaimer,
        "presentedForm": [{"contentType": "text/markdown", "language": "en", "title": "AI draft radiology report",
                           "data": base64.b64encode(text.encode()).decode()}],
    }
    entries = [{"fullUrl": _urn(), "resource": diagnostic}, {"fullUrl": device_ref, "resource": device}]
    entries += [{"fullUrl": ref, "resource": obs} for ref, obs in observations]
    return Bundle.model_validate({"resourceType": "Bundle", "type": "collection", "timestamp": issued,
                                  "entry": entries})


def report_fhir_json(report: Report) -> str:
    return report_bundle(report).model_dump_json(exclude_none=True, indent=2)
