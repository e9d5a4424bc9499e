"""A `Report` as a DICOM Comprehensive 3D SR (TID 1500 Measurement Report), written with highdicom
in the shape IHE AI Results (AIR) uses: one measurement group per finding with its qualitative
evaluation, its box as an image region on the source image and its size; the Findings and
Impression text; flags PARTIAL / PRELIMINARY / UNVERIFIED; the model as the observing device,
as the algorithm of every group and in Contributing Equipment; filed in the source study.
"""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medlava import __version__
from medlava.analysis.codes import SIDES, finding_code, site_code
from medlava.analysis.report import Report, ReportFinding
from medlava.errors import ImagingError
from medlava.imaging.dicom import looks_like_dicom, read_dataset, series_stack

SERIES_NUMBER = 9901  # AI results sort after the acquired series in a viewer
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


def source_frames(source: str | Path) -> list[tuple[Dataset, int | None]]:
    """The source study's images in the order medlava numbers slices: (header, frame index or None).

    Only DICOM can be the source of an SR; anything else is refused here with one clear line."""
    path = Path(source)
    if path.is_dir():
        return [(ds, frame) for _, ds, frame in series_stack(path)[0]]
    if not path.is_file():
        raise ImagingError(f"no such file: {path.name}")
    with open(path, "rb") as f:
        if not looks_like_dicom(f.read(132)):
            raise ImagingError(f"a DICOM SR needs a DICOM source study; {path.name} is not DICOM "
                               "(use --format json or fhir for other images)")
    ds = read_dataset(path, path.name, stop_before_pixels=True)
    frames = int(ds.get("NumberOfFrames") or 1)
    return [(ds, None)] if frames == 1 else [(ds, i) for i in range(frames)]


# Patient and General Study attributes of type 2 (present, maybe empty) that an SR copies.
TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime", "ReferringPhysicianName")


def _evidence(frames: list[tuple[Dataset, int | None]], name: str) -> list[Dataset]:
    """The distinct source datasets, with missing type-2 attributes present and empty, as the
    standard allows (files in the wild omit them)."""
    unique = list({id(ds): ds for ds, _ in frames}.values())
    if not unique[0].get("StudyInstanceUID"):
        raise ImagingError(f"{name} has no Study Instance UID, so an SR cannot be filed in its study")
    out = []
    for ds in unique:
        ds = copy.copy(ds)
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, None)
        out.append(ds)
    return out


def _group(f: ReportFinding, index: int, frames: list[tuple[Dataset, int | None]], body_part: str | None,
           algorithm: hd.sr.AlgorithmIdentification):
    code = finding_code(f.name)
    site = site_code(f.name, f.location, body_part)
    sites = [hd.sr.FindingSite(site, laterality=SIDES.get(f.side))] if site else None
    measurements = [hd.sr.Measurement(name=codes.SCT.Diameter, value=f.size_mm, unit=codes.UCUM.Millimeter,
                                      algorithm_id=algorithm)] if f.size_mm else None
    common = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"Finding {index}: {f.name}"),
        finding_type=code, finding_sites=sites, algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.DCM.Finding, code)],
    )
    ds, frame = frames[f.slice if f.slice is not None and f.slice < len(frames) else len(frames) // 2]
    if f.box is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    x0, y0, x1, y1 = (float(v) for v in f.box)
    outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])  # a closed polyline
    image = hd.sr.SourceImageForRegion.from_source_image(
        ds, referenced_frame_numbers=None if frame is None else [frame + 1])
    region = hd.sr.ImageRegion(hd.sr.GraphicTypeValues.POLYLINE, outline, image)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)


def report_sr(report: Report, source: str | Path) -> hd.sr.Comprehensive3DSR:
    """The SR of `report` about the DICOM file or series folder `source` (same study, new series)."""
    frames = source_frames(source)
    algorithm = hd.sr.AlgorithmIdentification(name=report.model, version=__version__, manufacturer="medlava")
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["medlava", report.model]), name=report.model,
        manufacturer_name="medlava", model_name=report.model)
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device))
    groups = [_group(f, i, frames, report.body_part, algorithm) for i, f in enumerate(report.findings, 1)]
    content = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups)
    # TID 1500's Qualitative Evaluations container holds the narrative: findings, impression, disclaimer.
    texts = hd.sr.ContainerContentItem(QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    texts.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name, value[:9000], relationship_type="CONTAINS")  # the UT limit is far off
        for name, value in ((codes.DCM.Finding, report.sections.findings or "(none written)"),
                            (codes.DCM.Impression, report.impression or "(none written)"),
                            (codes.DCM.Impression, report.disclaimer))
    ])
    content[0].ContentSequence.append(texts)
    equipment = hd.ContributingEquipment(
        manufacturer="medlava", purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=report.model, software_versions=__version__,
        contribution_description="AI-generated draft report, to be reviewed by a clinician")
    evidence = _evidence(frames, Path(source).name)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=content, series_instance_uid=generate_uid(), series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="medlava",
        is_complete=False, is_final=False, is_verified=False, contributing_equipment=[equipment],
        series_description="AI draft report (medlava) - not verified")
    return sr
