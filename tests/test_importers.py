"""VQA-RAD, SLAKE and PathVQA importers, on small files in each release's format written here."""

from __future__ import annotations

import json
import pickle
import re

import pytest
from typer.testing import CliRunner

from medlava.cli import app
from medlava.errors import MedlavaError
from medlava.eval.importers import import_questions

runner = CliRunner()

VQA_RAD = [  # the fields of "VQA_RAD Dataset Public.json" (some releases pad answer_type)
    {"qid": 1, "image_name": "synpic54610.jpg", "image_case_url": "https://example.invalid/1", "image_organ": "HEAD",
     "answer": "Yes", "answer_type": "CLOSED", "question_type": "PRES", "question": "Are regions of the brain infarcted?",
     "phrase_type": "freeform", "qid_linked_id": "03f451ca", "evaluation": "not evaluated"},
    {"qid": 2, "image_name": "synpic29265.jpg", "image_organ": "CHEST", "answer": 2, "answer_type": "OPEN ",
     "question_type": "COUNT", "question": "How many kidneys are seen? ", "phrase_type": "para"},
]
SLAKE = [  # the fields of SLAKE's test.json; English and Chinese versions of a question
    {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "What modality is used to take this image?",
     "answer": "MRI", "q_lang": "en", "location": "Abdomen", "modality": "MRI", "answer_type": "OPEN",
     "base_type": "vqa", "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 11934},
    {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "这张图片的成像方式是什么?", "answer": "MRI",
     "q_lang": "zh", "location": "腹部", "modality": "MRI", "answer_type": "OPEN", "base_type": "vqa",
     "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 12115},
    {"img_id": 5, "img_name": "xmlab5/source.jpg", "question": "Is the lung healthy?", "answer": "No", "q_lang": "en",
     "modality": "X-Ray", "answer_type": "CLOSED", "content_type": "Abnormality", "qid": 11935},
]
PATHVQA = [  # pvqa/qas/test/test_qa.pkl: a list of {image, question, answer}
    {"image": "test_0000", "question": "What is present?", "answer": "neutrophils"},
    {"image": "test_0000", "question": "Is there inflammation?", "answer": "yes"},
    {"image": "test_0001", "question": "Does this show fibrosis?", "answer": "no"},
]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_vqa_rad(tmp_path):
    src, out = tmp_path / "VQA_RAD Dataset Public.json", tmp_path / "q.jsonl"
    src.write_text(json.dumps(VQA_RAD))
    result = runner.invoke(app, ["eval", "import", "vqa-rad", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 questions (1 closed, 1 open)" in result.output
    assert read(out) == [
        {"question_id": 1, "image": "synpic54610.jpg", "text": "Are regions of the brain infarcted?", "answer": "Yes",
         "answer_type": "CLOSED", "question_kind": "PRES", "organ": "HEAD"},
        {"question_id": 2, "image": "synpic29265.jpg", "text": "How many kidneys are seen?", "answer": "2",
         "answer_type": "OPEN", "question_kind": "COUNT", "organ": "CHEST"},
    ]


def test_slake_keeps_english_only(tmp_path):
    src, out = tmp_path / "test.json", tmp_path / "q.jsonl"
    src.write_text(json.dumps(SLAKE, ensure_ascii=False))
    result = runner.invoke(app, ["eval", "import", "slake", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 skipped (not English)" in result.output
    rows = read(out)
    assert [r["question_id"] for r in rows] == [11934, 11935]
    assert rows[0] == {"question_id": 11934, "image": "xmlab102/source.jpg",
                       "text": "What modality is used to take this image?", "answer": "MRI", "answer_type": "OPEN",
                       "question_kind": "Modality", "modality": "mri"}
    assert rows[1]["answer_type"] == "CLOSED" and rows[1]["modality"] == "x-ray"


@pytest.mark.parametrize("suffix", [".pkl", ".json"])
def test_pathvqa_pickle_and_json(tmp_path, suffix):
    src, out = tmp_path / f"test_qa{suffix}", tmp_path / "q.jsonl"
    src.write_bytes(pickle.dumps(PATHVQA) if suffix == ".pkl" else json.dumps(PATHVQA).encode())
    counts = import_questions("pathvqa", src, out)
    assert counts == {"questions": 3, "closed": 2, "open": 1, "skipped": 0, "skipped_why": ""}
    assert read(out) == [
        {"question_id": 0, "image": "test_0000.jpg", "text": "What is present?", "answer": "neutrophils",
         "answer_type": "OPEN"},
        {"question_id": 1, "image": "test_0000.jpg", "text": "Is there inflammation?", "answer": "yes",
         "answer_type": "CLOSED"},
        {"question_id": 2, "image": "test_0001.jpg", "text": "Does this show fibrosis?", "answer": "no",
         "answer_type": "CLOSED"},
    ]


def test_pathvqa_lxmert_rows(tmp_path):
    src, out = tmp_path / "test_vqa.pkl", tmp_path / "q.jsonl"
    src.write_bytes(pickle.dumps([{"answer_type": "yes/no", "img_id": "test_0002", "label": {"no": 1},
                                   "question_id": 100, "sent": "Is this benign?"}]))
    import_questions("pathvqa", src, out)
    assert read(out) == [{"question_id": 100, "image": "test_0002.jpg", "text": "Is this benign?", "answer": "no",
                          "answer_type": "CLOSED"}]


class NotPlain:
    pass


def test_bad_input_is_one_error_line(tmp_path):
    out = tmp_path / "q.jsonl"
    wrong_json = tmp_path / "bad.json"
    wrong_json.write_text("{not json")
    missing_fields = tmp_path / "fields.json"
    missing_fields.write_text(json.dumps([{"qid": 1, "question": "q", "answer": "a", "answer_type": "OPEN"}]))
    bad_type = tmp_path / "type.json"
    bad_type.write_text(json.dumps([{**VQA_RAD[0], "answer_type": "MAYBE"}]))
    dupes = tmp_path / "dupes.json"
    dupes.write_text(json.dumps([VQA_RAD[0], VQA_RAD[0]]))
    not_a_list = tmp_path / "obj.json"
    not_a_list.write_text(json.dumps({"a": 1}))
    class_pickle = tmp_path / "evil.pkl"
    class_pickle.write_bytes(pickle.dumps([NotPlain()]))
    cases = [
        (["vqa-rad", str(tmp_path / "none.json")], "no such file"),
        (["vqa-rad", str(wrong_json)], "not valid JSON"),
        (["vqa-rad", str(missing_fields)], "item 0: a VQA-RAD question needs .* missing image_name"),
        (["vqa-rad", str(bad_type)], "answer_type must be CLOSED or OPEN"),
        (["vqa-rad", str(dupes)], "appears twice"),
        (["slake", str(not_a_list)], "not a slake question file"),
        (["slake", str(missing_fields)], "missing img_name, q_lang"),
        (["pathvqa", str(class_pickle)], "only plain lists and dicts"),
        (["mimic", str(wrong_json)], "unknown dataset"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["eval", "import", *args, "--out", str(out)])
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, result.output)
        assert re.search(message, lines[0]), (args, lines[0])
    assert not out.exists()
    chinese_only = tmp_path / "zh.json"
    chinese_only.write_text(json.dumps([SLAKE[1]], ensure_ascii=False))
    with pytest.raises(MedlavaError, match="no English questions"):
        import_questions("slake", chinese_only, out)
