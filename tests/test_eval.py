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


def image_tagged_questions() -> list[dict]:
    """LLaVA-Med's own question files end each text in "\\n<image>"; one here holds two placeholders."""
    return [
        {"question_id": "a", "image": "chest_xray.png", "text": "Is there a nodule?\n<image>"},
        {"question_id": "b", "image": "chest_xray.png", "text": "<image>\nWhat modality is this?\n<image>"},
    ]


def test_image_placeholders_are_removed_as_model_vqa_does(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in image_tagged_questions()))
    analyzer = CountingAnalyzer()
    run_vqa(questions, SAMPLES, tmp_path / "a.jsonl", analyzer)
    assert [c[1] for c in analyzer.calls] == ["Is there a nodule?", "What modality is this?"]
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [a["prompt"] for a in lines] == ["Is there a nodule?", "What modality is this?"]


def test_eval_vqa_cli_runs_llava_med_question_files_to_the_end(tmp_path, model_dir):
    """Before: a second placeholder stopped the run ("200 image-token positions but 1 image(s) give 100")."""
    from typer.testing import CliRunner

    from medlava.cli import app

    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in image_tagged_questions()))
    answers = tmp_path / "a.jsonl"
    result = CliRunner().invoke(app, ["eval", "vqa", "--questions", str(questions), "--image-folder", str(SAMPLES),
                                      "--answers", str(answers), "--model", str(model_dir()), "--max-tokens", "3",
                                      "--temperature", "0.2", "--top-p", "0.9", "--seed", "1"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [a["question_id"] for a in lines] == ["a", "b"]
    assert [list(a) for a in lines] == [["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]] * 2
    assert lines[1]["prompt"] == "What modality is this?" and lines[0]["metadata"]["image"] == "chest_xray.png"
    bad = CliRunner().invoke(app, ["eval", "vqa", "--questions", str(questions), "--image-folder", str(SAMPLES),
                                   "--answers", str(tmp_path / "b.jsonl"), "--model", str(model_dir()),
                                   "--conv-mode", "no_such_template"])
    assert bad.exit_code == 2 and "error:" in bad.output


def test_llava_med_normalisation():
    from medlava.eval.llava_med_metrics import normalize_word

    assert normalize_word("yes, there is.") == "yes there is"  # ", " present: punctuation dropped, period stripped
    assert normalize_word("the right upper lobe.") == "right upper lobe"  # articles go
    assert normalize_word("chest x-ray") == "chest x ray"  # no "- "/" -": the hyphen becomes a space
    assert normalize_word("1,000 cells") == "1000 cells"  # a number's comma
    assert normalize_word("two lesions 1.5 cm") == "2 lesions 1.5 cm"  # number words; a decimal point stays
    assert normalize_word("isnt") == "isn't"


# A hand-checked answer file. Texts after run_eval.py's lower-case + normalize_word, and each item's numbers:
# CLOSED (hit = "yes" or "no" is a substring of the prediction, and so is the gold answer):
#  1 gold yes, "Yes, there is."     -> "yes there is"      hit 1   (medlava: 1)
#  2 gold no,  "There is a nodule." -> "there is nodule"   hit 1   (medlava: 0, "no" is not a word of it)
#  3 gold yes, "No."                -> "no"                hit 0   (medlava: 0)
#  4 gold left, "left"              -> no yes/no in it     hit 0   (medlava: 1)
#  5 gold no,  "not present"        -> "no" inside "not"   hit 1   (medlava: 0)
#  closed accuracy = 3/5 = 0.6 (medlava: 2/5 here, 3/6 with item 11, whose lower-case type it accepts)
# OPEN (recall = tp/(tp+fn), tp summing the prediction's counts; exact = distinct gold words found / prediction words;
#       precision = tp/(tp+fp)):
#  6 gold "right upper lobe", "The right upper lobe." -> "right upper lobe": recall 1, exact 3/3, precision 1, f1 1
#  7 gold "two" -> "2", "2 lesions":        recall 1, exact 1/2, precision 1/2, f1 2/3          (medlava recall 0)
#  8 gold "pleural effusion", "effusion effusion": tp 2, fn 1: recall 2/3, exact 1/2, precision 1, f1 0.8  (medlava 1/2)
#  9 gold "x-ray" -> "x ray", "chest x-ray" -> "chest x ray": recall 1, exact 2/3, precision 2/3, f1 0.8  (medlava 1)
# 10 gold "ct", "MRI": all 0
#  open recall = (1 + 1 + 2/3 + 1 + 0)/5 = 11/15; exact = (1 + 1/2 + 1/2 + 2/3 + 0)/5 = 8/15;
#  f1 = (1 + 2/3 + 0.8 + 0.8)/5 = 49/75; precision = (1 + 1/2 + 1 + 2/3)/5 = 19/30   (medlava open recall 2.5/5 = 0.5)
# 11 answer_type "closed" (lower case): run_eval.py scores neither; 12 has no answer.
LLAVA_MED_CASES = [
    (1, "yes", "CLOSED", "Yes, there is."), (2, "no", "CLOSED", "There is a nodule."), (3, "yes", "CLOSED", "No."),
    (4, "left", "CLOSED", "left"), (5, "no", "CLOSED", "not present"),
    (6, "right upper lobe", "OPEN", "The right upper lobe."), (7, "two", "OPEN", "2 lesions"),
    (8, "pleural effusion", "OPEN", "effusion effusion"), (9, "x-ray", "OPEN", "chest x-ray"), (10, "ct", "OPEN", "MRI"),
    (11, "yes", "closed", "yes"), (12, "no", "CLOSED", None),
]


def test_llava_med_metrics_on_a_hand_checked_file(tmp_path):
    from typer.testing import CliRunner

    from medlava.cli import app
    from medlava.eval.vqa import score_llava_med

    gold, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    gold.write_text("\n".join(json.dumps({"question_id": i, "image": "x.png", "text": "q", "answer": a,
                                          "answer_type": t}) for i, a, t, _ in LLAVA_MED_CASES))
    answered = [(i, p) for i, _, _, p in LLAVA_MED_CASES if p is not None][::-1]  # reversed: paired by id, not order
    answers.write_text("\n".join(json.dumps({"question_id": i, "text": p}) for i, p in answered))
    result = score_llava_med(answers, gold)
    assert result["closed_acc"] == pytest.approx(0.6)
    assert result["open_recall"] == pytest.approx(11 / 15)
    assert result["exact_match"] == pytest.approx(8 / 15)
    assert result["f1"] == pytest.approx(49 / 75) and result["precision"] == pytest.approx(19 / 30)
    assert (result["n_closed"], result["n_open"], result["n_ignored"]) == (5, 5, 1)
    assert (result["answered"], result["unanswered"]) == (11, 1)
    medlava = score(answers, gold)["model"]["overall"]  # medlava's own whole-word rules differ on the same file
    assert medlava["open_recall"] == pytest.approx(0.5) and medlava["closed_acc"] == pytest.approx(3 / 6)
    cli = CliRunner().invoke(app, ["eval", "score", "--answers", str(answers), "--gold", str(gold),
                                   "--metrics", "llava-med"])
    assert cli.exit_code == 0, cli.output
    assert "60.0" in cli.output and "73.3" in cli.output and "53.3" in cli.output
    saved = json.loads(answers.with_suffix(".llava-med.scores.json").read_text())
    assert saved["closed_acc"] == pytest.approx(0.6)
    bad = CliRunner().invoke(app, ["eval", "score", "--answers", str(answers), "--gold", str(gold), "--metrics", "x"])
    assert bad.exit_code == 2 and "error:" in bad.output
