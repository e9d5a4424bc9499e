"""VQA scoring maths, chunking, resume and the image-shuffle control."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medlava.errors import MedlavaError
from medlava.eval.metrics import closed_correct, exact_match, open_recall, token_f1
from medlava.eval.vqa import chunk, run_vqa, score, shuffled_images

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_closed_questions_match_whole_words():
    assert closed_correct("Yes.", "yes")
    assert not closed_correct("a nodule", "no")  # "no" inside "nodule" is not an answer
    assert not closed_correct("yes and no", "yes")
    assert closed_correct("no, there is none", "no")


def test_open_recall_exact_and_f1():
    assert open_recall("the right upper zone", "right upper zone") == 1.0
    assert open_recall("right lower zone", "right upper zone") == pytest.approx(2 / 3)
    assert exact_match("Right upper zone.", "right upper zone")
    assert not exact_match("right upper zone nodule", "right upper zone")
    assert token_f1("right upper", "right upper zone") == pytest.approx(0.8)
    assert token_f1("left", "right") == 0.0


def test_chunks_cover_every_item_once():
    items = list(range(10))
    parts = [chunk(items, 3, i) for i in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(MedlavaError):
        chunk(items, 3, 3)


def test_shuffled_images_never_keep_their_own():
    qs = [{"question_id": i, "image": f"s{i % 4}.png"} for i in range(12)]
    swap = shuffled_images(qs, seed=1)
    assert all(swap[q["question_id"]] != q["image"] for q in qs)
    assert {swap[q["question_id"]] for q in qs if q["image"] == "s0.png"} == {swap[0]}  # a study stays together


def gold_questions() -> list[dict]:
    return [
        {"question_id": 1, "image": "chest_xray.dcm", "text": "Is there a nodule?", "answer": "yes",
         "answer_type": "CLOSED", "question_kind": "presence:nodule", "modality": "x-ray", "finding_kinds": ["nodule"]},
        {"question_id": 2, "image": "head_ct.dcm", "text": "What modality is this?", "answer": "ct",
         "answer_type": "OPEN", "question_kind": "modality", "modality": "ct", "finding_kinds": []},
        {"question_id": 3, "image": "chest_xray.png", "text": "Is there an effusion?", "answer": "no",
         "answer_type": "CLOSED", "question_kind": "presence:pleural_effusion", "modality": "x-ray",
         "finding_kinds": ["nodule"]},
    ]


def test_score_by_group_and_majority_baseline(tmp_path):
    gold = tmp_path / "q.jsonl"
    gold.write_text("\n".join(json.dumps(q) for q in gold_questions()))
    answers = tmp_path / "a.jsonl"
    answers.write_text("\n".join(json.dumps({"question_id": i, "text": t}) for i, t in [(1, "yes"), (2, "mri")]))
    result = score(answers, gold)
    assert result["answered"] == 2 and result["unanswered"] == 1
    model = result["model"]
    assert model["overall"]["closed_acc"] == 1.0 and model["overall"]["open_recall"] == 0.0
    assert model["by_modality"]["ct"]["open_recall"] == 0.0
    assert model["by_finding"]["nodule"]["n"] == 1 and model["by_finding"]["none"]["n"] == 1
    # The majority answer of each kind among answered questions is the gold answer itself here.
    assert result["majority_baseline"]["overall"]["exact_match"] == 1.0
    answers.write_text(json.dumps({"question_id": 99, "text": "x"}))
    with pytest.raises(MedlavaError, match="not in the gold file"):
        score(answers, gold)


class CountingAnalyzer:
    """Stands in for the model: records what it was asked (the model itself is tested elsewhere)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.batches: list[int] = []

    def ask_many(self, items, params, volumes="auto"):
        from medlava.analysis.vqa import Answer

        self.batches.append(len(items))
        answers = []
        for image, question in items:
            self.calls.append((Path(image).name, question))
            answers.append(Answer("p", f"answer {len(self.calls)}", [1], "stop", "counting", None))
        return answers


def test_run_resumes_and_chunks(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in gold_questions()))
    answers = tmp_path / "a.jsonl"
    first = CountingAnalyzer()
    assert run_vqa(questions, SAMPLES, answers, first, num_chunks=2, chunk_idx=0) == 2
    assert run_vqa(questions, SAMPLES, answers, first, num_chunks=2, chunk_idx=0) == 0  # resumed: nothing left
    second = CountingAnalyzer()
    assert run_vqa(questions, SAMPLES, answers, second) == 1  # only question 3 was missing
    assert second.calls == [("chest_xray.png", "Is there an effusion?")]
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [a["question_id"] for a in lines] == [1, 2, 3]
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


def test_run_batches_in_order(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in gold_questions()))
    answers = tmp_path / "a.jsonl"
    analyzer, seen = CountingAnalyzer(), []
    assert run_vqa(questions, SAMPLES, answers, analyzer, batch_size=2, progress=lambda d, t: seen.append((d, t))) == 3
    assert analyzer.batches == [2, 1] and seen == [(2, 3), (3, 3)]
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [(a["question_id"], a["text"]) for a in lines] == [(1, "answer 1"), (2, "answer 2"), (3, "answer 3")]
    with pytest.raises(MedlavaError, match="batch-size"):
        run_vqa(questions, SAMPLES, answers, analyzer, batch_size=0)


def test_resume_drops_a_torn_last_line_and_bad_questions_are_named(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in gold_questions()))
    answers = tmp_path / "a.jsonl"
    run_vqa(questions, SAMPLES, answers, CountingAnalyzer(), num_chunks=3, chunk_idx=0)
    with open(answers, "a") as f:
        f.write('{"question_id": 2, "te')  # what a kill in the middle of a write leaves
    assert run_vqa(questions, SAMPLES, answers, CountingAnalyzer()) == 2
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == [1, 2, 3]
    questions.write_text(json.dumps({"question_id": 9, "text": "no image"}))
    with pytest.raises(MedlavaError, match="line 1: .* missing image"):
        run_vqa(questions, SAMPLES, tmp_path / "b.jsonl", CountingAnalyzer())


def test_shuffle_control_uses_other_images(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in gold_questions()))
    analyzer = CountingAnalyzer()
    run_vqa(questions, SAMPLES, tmp_path / "a.jsonl", analyzer, shuffle_images_seed=0)
    asked = dict(zip([q["text"] for q in gold_questions()], [c[0] for c in analyzer.calls], strict=True))
    assert all(asked[q["text"]] != q["image"] for q in gold_questions())
