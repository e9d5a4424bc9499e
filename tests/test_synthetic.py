"""The synthetic phantom world (`medlava synth`): files, ground truth, conventions, determinism."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian

from medlava.imaging import apply_window, load_study
from medlava.train.phantoms.study import FINDING_KINDS, PROTOCOL_KINDS
from medlava.train.phantoms.text import NAMES
from medlava.train.synthetic import INSTITUTION, generate_world, main, make_study

SEED, N = 11, 80
OUTPUTS = ("studies.jsonl", "questions.jsonl", "instruct.json", "captions.json", "reports.jsonl")
STUDY_KEYS = {"id", "image", "modality", "modality_name", "body_part", "findings", "size"}
QUESTION_KEYS = {"question_id", "image", "text", "answer", "answer_type", "question_kind", "modality",
                 "finding_kinds", "study_id"}
IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber", "InstitutionName",
               "ReferringPhysicianName")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, N, SEED)
    return out


@pytest.fixture(scope="module")
def studies(world) -> list[dict]:
    return read_jsonl(world / "studies.jsonl")


@pytest.fixture(scope="module")
def shown(world, studies) -> dict[str, np.ndarray]:
    """Every study's displayed key image (grey), as load_study shows it."""
    return {s["id"]: np.asarray(load_study(world / "images" / s["image"]).key_image().convert("L"))
            for s in studies}


def test_world_covers_every_kind_of_study(studies):
    assert {s["modality"] for s in studies} == {"CR", "DX", "CT", "MR"}
    assert {(s["modality_name"], s["body_part"]) for s in studies} == {
        ("x-ray", "chest"), ("ct", "chest"), ("ct", "abdomen"), ("mri", "head")}
    kinds = Counter(f["kind"] for s in studies for f in s["findings"])
    assert set(kinds) == set(FINDING_KINDS)
    counts = Counter(len(s["findings"]) for s in studies)
    assert 0.15 < counts[0] / N < 0.45 and counts[2] > 0
    suffixes = Counter(s["image"].split(".", 1)[1] for s in studies)
    assert set(suffixes) == {"dcm", "png", "nii.gz"}


def test_output_files_parse_with_their_schemas(world, studies):
    ids = [s["id"] for s in studies]
    assert ids == [f"syn-{SEED}-{i:05d}" for i in range(N)]
    for s in studies:
        assert STUDY_KEYS <= set(s) and (world / "images" / s["image"]).is_file()
        assert ("ctr" in s) == (s["modality_name"] == "x-ray")
        for f in s["findings"]:
            assert f["kind"] in PROTOCOL_KINDS[{"x-ray": "chest_xray", "mri": "brain_mri"}.get(
                s["modality_name"], f"{s['body_part']}_ct")]
            assert f["side"] in ("left", "right", None) and f["zone"] in ("upper", "middle", "lower", None)
            assert (f["zone"] is not None) == (f["kind"] in ("nodule", "mass"))
            assert (f["side"] is None) == (f["kind"] in ("cardiomegaly", "hydrocephalus"))
            assert f["size_mm"] > 0
        assert len({f["kind"] for f in s["findings"]}) == len(s["findings"])

    questions = read_jsonl(world / "questions.jsonl")
    assert len({q["question_id"] for q in questions}) == len(questions)
    per_study = Counter(q["study_id"] for q in questions)
    assert set(per_study) == set(ids) and 5 <= min(per_study.values()) and max(per_study.values()) <= 9
    for q in questions:
        assert set(q) == QUESTION_KEYS and "<image>" not in q["text"] and q["text"].endswith("?")
        assert q["answer"] == q["answer"].lower() and q["answer"]
        assert q["answer_type"] == ("CLOSED" if q["answer"] in ("yes", "no") else "OPEN")
    by_id = {s["id"]: s for s in studies}
    for q in questions:
        s = by_id[q["study_id"]]
        kinds = [f["kind"] for f in s["findings"]]
        assert q["image"] == s["image"] and q["modality"] == s["modality_name"]
        assert sorted(q["finding_kinds"]) == sorted(kinds)
        if q["question_kind"] == "modality":
            assert q["answer"] == s["modality_name"]
        elif q["question_kind"] == "body_part":
            assert q["answer"] == s["body_part"]
        elif q["question_kind"].startswith("presence:"):
            assert q["answer"] == ("yes" if q["question_kind"].split(":")[1] in kinds else "no")
        elif q["question_kind"] == "finding":
            assert (q["answer"] == "no abnormality") == (not kinds)
        elif q["question_kind"] == "location":
            assert re.fullmatch(r"(left|right) (upper|middle|lower) zone", q["answer"])

    for name in ("instruct.json", "captions.json"):
        entries = json.loads((world / name).read_text(encoding="utf-8"))
        assert [e["id"] for e in entries] == ids
        for e in entries:
            turns = e["conversations"]
            assert e["image"] == by_id[e["id"]]["image"] and len(turns) % 2 == 0
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert all(t["value"].strip() for t in turns)
    instruct = json.loads((world / "instruct.json").read_text(encoding="utf-8"))
    assert all(e["conversations"][-1]["value"].startswith("Findings: ") for e in instruct)
    # The Q/A turns carry exactly the short answers of questions.jsonl.
    first = instruct[0]["conversations"]
    qs = [q for q in questions if q["study_id"] == ids[0]]
    assert [t["value"] for t in first[1:-2:2]] == [q["answer"] for q in qs]

    reports = read_jsonl(world / "reports.jsonl")
    assert [r["id"] for r in reports] == ids
    assert all(set(r) == {"id", "image", "findings", "impression"} and r["impression"] for r in reports)


def test_images_load_with_right_modality_and_size(world, studies, shown):
    for s in studies:
        study = load_study(world / "images" / s["image"])
        expected = "OT" if s["image"].endswith(".png") else s["modality"]  # PNG carries no modality
        assert study.modality == expected
        assert study.key_image().size == (s["size"], s["size"])
        assert shown[s["id"]].std() > 20  # a picture, not a blank
    assert {s["size"] for s in studies} == {224, 112}  # MRI is half the size


def _core_minus_ring(img: np.ndarray, box: list[int], width: int = 2) -> float:
    """Mean of the box's central half minus the mean of a ring just outside the box."""
    x0, y0, x1, y1 = box
    h, w = img.shape
    outer = img[max(0, y0 - width):min(h, y1 + width), max(0, x0 - width):min(w, x1 + width)].astype(float)
    inner = img[y0:y1, x0:x1].astype(float)
    ring = (outer.sum() - inner.sum()) / (outer.size - inner.size)
    bw, bh = x1 - x0, y1 - y0
    core = img[y0 + bh // 4:y1 - bh // 4, x0 + bw // 4:x1 - bw // 4].astype(float)
    return float(core.mean() - ring)


def test_boxes_lie_inside_and_stand_out(studies, shown):
    checked = Counter()
    for s in studies:
        for f in s["findings"]:
            x0, y0, x1, y1 = f["box"]
            assert 0 <= x0 < x1 <= s["size"] and 0 <= y0 < y1 <= s["size"], f
            assert abs(_core_minus_ring(shown[s["id"]], f["box"])) >= 5, (s["id"], f)
            checked[f["kind"]] += 1
    assert set(checked) == set(FINDING_KINDS)
    # A wrong convention (flipped, transposed) would put boxes on ordinary anatomy: check the
    # same boxes on other studies of the protocol stand out much less on average.
    diffs, shuffled = [], []
    for s, other in zip(studies, studies[1:] + studies[:1], strict=True):
        for f in s["findings"]:
            diffs.append(abs(_core_minus_ring(shown[s["id"]], f["box"])))
            if other["size"] == s["size"] and other["modality_name"] == s["modality_name"]:
                shuffled.append(abs(_core_minus_ring(shown[other["id"]], f["box"])))
    assert np.mean(diffs) > 2 * np.mean(shuffled)


def test_patient_right_is_on_the_image_left(studies):
    seen = Counter()
    for s in studies:
        for f in s["findings"]:
            if f["side"] is None:
                continue
            centre = (f["box"][0] + f["box"][2]) / 2
            assert (centre < s["size"] / 2) == (f["side"] == "right"), (s["id"], f)
            seen[(s["modality_name"], f["side"])] += 1
    assert {m for m, _ in seen} == {"x-ray", "ct", "mri"} and {side for _, side in seen} == {"left", "right"}
    for s in studies:  # the liver lies on the patient's right: the image's left
        if s["body_part"] == "abdomen":
            assert all(f["side"] == "right" for f in s["findings"] if f["kind"] == "liver_lesion")


def test_mri_mass_side_in_scanner_coordinates(world, studies):
    """Independent of the display: in RAS+ world coordinates the patient's right is +x."""
    masses = [(s, f) for s in studies for f in s["findings"] if f["kind"] == "brain_mass"]
    assert {f["side"] for _, f in masses} == {"left", "right"}
    for s, f in masses:
        img = nib.load(world / "images" / s["image"])
        data = np.asarray(img.dataobj)
        assert data.dtype == np.int16 and data.shape == (112, 112, 24)
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), [2.0, 2.0, 4.0])
        voxels = np.argwhere(data > 900)  # the enhancing mass is the brightest thing in the head
        x = (img.affine @ np.append(voxels.mean(axis=0), 1.0))[0]
        assert (x > 0) == (f["side"] == "right"), (s["id"], f, x)
        assert abs(voxels.mean(axis=0)[2] - 12) < 1.5  # centred on the key (middle) slice


def test_monochrome1_displays_like_monochrome2(world, studies, shown, tmp_path):
    variants = Counter()
    for index, s in enumerate(studies):
        if s["modality_name"] != "x-ray":
            continue
        # Whatever the storage (MONOCHROME1, MONOCHROME2, PNG), the display is the drawn film.
        _, rendering, plan = make_study(SEED, index)
        expected = apply_window(rendering.pixels, *rendering.window).astype(int)
        assert np.abs(shown[s["id"]].astype(int) - expected).max() <= 1, s["id"]
        variants["png" if plan.fmt == "png" else "mono1" if plan.monochrome1 else "mono2"] += 1
        lungs = shown[s["id"]][s["size"] // 3:s["size"] // 2, s["size"] // 5:s["size"] // 3]  # right lung
        assert lungs.mean() < shown[s["id"]].mean()  # lungs dark, as on any chest film
    assert set(variants) == {"png", "mono1", "mono2"}

    for s in studies:  # and independently of the generator: the file's own twin, stored the usual way
        path = world / "images" / s["image"]
        if s["modality_name"] != "x-ray" or path.suffix != ".dcm":
            continue
        ds = pydicom.dcmread(path)
        if ds.PhotometricInterpretation != "MONOCHROME1":
            continue
        ds.PixelData = (4095 - ds.pixel_array).astype("<u2").tobytes()
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.WindowCenter = f"{4096 - float(ds.WindowCenter):g}"
        twin = tmp_path / f"{s['id']}-mono2.dcm"
        ds.save_as(twin)
        b = np.asarray(load_study(twin).key_image().convert("L"), dtype=int)
        assert np.abs(shown[s["id"]].astype(int) - b).max() <= 1


def test_ct_stores_hounsfield_units(world, studies):
    cts = [s for s in studies if s["modality"] == "CT"]
    assert {s["body_part"] for s in cts} == {"chest", "abdomen"}
    for s in cts:
        ds = pydicom.dcmread(world / "images" / s["image"])
        assert ds.pixel_array.dtype == np.uint16 and ds.PhotometricInterpretation == "MONOCHROME2"
        assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
        assert ds.BodyPartExamined == s["body_part"].upper()
        hu = apply_modality_lut(ds.pixel_array, ds)
        assert hu.min() >= -1024 and np.percentile(hu, 99.5) > 500  # bone
        assert abs(np.median(hu[hu < -950]) + 1000) < 20  # air
        if s["body_part"] == "chest":
            assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (-600, 1500)
            assert np.mean(np.abs(hu + 850) < 40) > 0.1  # lung
        else:
            assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40, 400)
            assert np.mean(np.abs(hu - 60) < 20) > 0.05  # liver
            assert np.mean(np.abs(hu + 100) < 30) > 0.05  # fat


def test_dicoms_carry_synthetic_identifiers_that_never_reach_the_study(world, studies):
    dicoms = [s for s in studies if s["image"].endswith(".dcm")]
    uids = set()
    for s in dicoms:
        path = world / "images" / s["image"]
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert str(ds.PatientName).startswith("PHANTOM^") and re.fullmatch(r"SYN-\d{6}", ds.PatientID)
        assert ds.InstitutionName == INSTITUTION and ds.PatientSex in ("F", "M")
        assert re.fullmatch(r"\d{8}", ds.PatientBirthDate) and re.fullmatch(r"\d{8}", ds.StudyDate)
        assert ds.AccessionNumber and str(ds.ReferringPhysicianName)
        assert ds.BodyPartExamined in ("CHEST", "ABDOMEN") and ds.Modality == s["modality"]
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid.is_valid
            uids.add(str(uid))
        study = load_study(path)
        visible = repr(study) + " ".join(study.metadata.values()) + " ".join(study.metadata)
        for keyword in IDENTIFIERS:
            value = str(ds.get(keyword))
            for part in value.split("^"):
                assert part not in visible, (keyword, part)
    assert len(uids) == 3 * len(dicoms)


def test_cardiothoracic_ratio(studies):
    films = [s for s in studies if s["modality_name"] == "x-ray"]
    for s in films:
        if any(f["kind"] == "cardiomegaly" for f in s["findings"]):
            assert 0.55 <= s["ctr"] <= 0.7
        else:
            assert 0.38 <= s["ctr"] <= 0.48
    for s in films:  # the heart sits left of the patient's midline: its box is right of centre
        for f in s["findings"]:
            if f["kind"] == "cardiomegaly":
                assert (f["box"][0] + f["box"][2]) / 2 > s["size"] / 2


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_independent_of_n(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_world(a, 5, 3)
    generate_world(b, 5, 3)
    generate_world(c, 10, 3, workers=2)
    files_a, files_c = _all_files(a), _all_files(c)
    assert files_a == _all_files(b)
    for name, data in files_a.items():
        if name.startswith("images/"):
            assert files_c[name] == data
    for name in ("studies.jsonl", "reports.jsonl"):
        assert read_jsonl(c / name)[:5] == read_jsonl(a / name)
    assert [q for q in read_jsonl(c / "questions.jsonl") if int(q["study_id"][-5:]) < 5] == \
        read_jsonl(a / "questions.jsonl")
    assert json.loads((c / "instruct.json").read_text())[:5] == json.loads((a / "instruct.json").read_text())


def test_different_seed_gives_a_different_world(tmp_path):
    generate_world(tmp_path / "a", 5, 1, size=96)
    generate_world(tmp_path / "b", 5, 2, size=96)
    a, b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert a["studies.jsonl"] != b["studies.jsonl"]
    images_a = sorted(v for k, v in a.items() if k.startswith("images/"))
    images_b = sorted(v for k, v in b.items() if k.startswith("images/"))
    assert not set(images_a) & set(images_b)


def test_closed_answers_are_balanced(tmp_path):
    generate_world(tmp_path, 200, 5, size=64)
    questions = read_jsonl(tmp_path / "questions.jsonl")
    closed = [q["answer"] == "yes" for q in questions if q["answer_type"] == "CLOSED"]
    presence = [q["answer"] == "yes" for q in questions if q["question_kind"].startswith("presence:")]
    assert 0.35 <= np.mean(closed) <= 0.65 and 0.35 <= np.mean(presence) <= 0.65
    # Paraphrases: several wordings per question kind (finding names replaced by a placeholder).
    names = sorted(NAMES.values(), key=len, reverse=True)
    wordings: dict[str, set[str]] = {}
    for q in questions:
        wording = re.sub("|".join(names), "X", q["text"])
        wordings.setdefault(q["question_kind"].split(":")[0], set()).add(wording)
    for kind in ("modality", "body_part", "presence", "normal", "finding", "side", "location"):
        assert len(wordings[kind]) >= 3, (kind, wordings.get(kind))


def test_main_writes_a_world(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["--out", str(out), "--n", "5", "--seed", "3"]) == 0
    assert all((out / name).is_file() for name in OUTPUTS)
    assert len(list((out / "images").iterdir())) == 5
    assert "wrote 5 studies" in capsys.readouterr().out
    assert main(["--out", str(out), "--n", "0", "--seed", "3"]) == 2
    assert "error:" in capsys.readouterr().err
