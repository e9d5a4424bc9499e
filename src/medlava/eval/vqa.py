"""Run a model over a LLaVA-Med `model_vqa` question file, and score answers against gold.

Questions: JSONL with `question_id`, `image`, `text` (gold files add `answer`, `answer_type`).
Answers: JSONL with LLaVA-Med's fields `question_id`, `prompt`, `text`, `answer_id`, `model_id`,
`metadata` (medlava's extra fields live inside `metadata`), written one batch at a time so an
interrupted run resumes where it stopped. As in LLaVA-Med's `model_vqa.py`, every `<image>` in a
question's text is removed and the text stripped; the prompt puts the one image first itself.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from pathlib import Path

from medlava.engine.sampling import SamplingParams
from medlava.errors import MedlavaError
from medlava.eval.metrics import majority_answers, score_one, summarise


def read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise MedlavaError(f"no such file: {path}") from None
    except json.JSONDecodeError as e:
        raise MedlavaError(f"{path} is not valid JSONL: {e}") from None


def chunk(items: list, num_chunks: int, index: int) -> list:
    """LLaVA's split: ceil-sized consecutive chunks, so parallel workers cover every question once."""
    if not 0 <= index < num_chunks:
        raise MedlavaError(f"--chunk-idx {index} must be in [0, {num_chunks})")
    size = math.ceil(len(items) / num_chunks)
    return items[index * size : (index + 1) * size]


def shuffled_images(questions: list[dict], seed: int) -> dict[int, str]:
    """Each question gets an image of a different study: a control that the answers use the image."""
    images = sorted({q["image"] for q in questions})
    rng = random.Random(seed)
    moved = images[:]
    while len(images) > 1 and any(a == b for a, b in zip(images, moved, strict=True)):
        rng.shuffle(moved)
    mapping = dict(zip(images, moved, strict=True))
    return {q["question_id"]: mapping[q["image"]] for q in questions}


QUESTION_FIELDS = ("question_id", "image", "text")
IMAGE_PLACEHOLDER = "<image>"


def clean_question(text: str) -> str:
    """`model_vqa`'s rule: drop every `<image>` (LLaVA-Med's files end questions in `\n<image>`), strip."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def read_questions(path: Path) -> list[dict]:
    questions = read_jsonl(path)
    for i, q in enumerate(questions, 1):
        missing = [f for f in QUESTION_FIELDS if not isinstance(q, dict) or f not in q]
        if missing:
            raise MedlavaError(f"{path} line {i}: a question needs {', '.join(QUESTION_FIELDS)}; missing {', '.join(missing)}")
    return questions


def answered_ids(answers: Path) -> set:
    """Question ids already answered; a last line cut short by a killed run is dropped first."""
    path = Path(answers)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])
    return {a["question_id"] for a in read_jsonl(path)}


def run_vqa(
    questions: Path,
    image_folder: Path,
    answers: Path,
    analyzer,
    *,
    num_chunks: int = 1,
    chunk_idx: int = 0,
    max_tokens: int = 1024,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    batch_size: int = 64,
    shuffle_images_seed: int | None = None,
    volumes: str = "auto",
    progress=lambda done, total: None,
) -> int:
    """Answer every question of this chunk not yet in `answers`; returns how many were added.

    Questions go to the engine `batch_size` at a time; each batch's answers are written (in question
    order) before the next starts, so an interrupted run loses at most one batch. `volumes` is
    `Analyzer.ask_many`'s: "auto" reads a series or volume whole, "middle" its middle slice only.
    Sampling follows `model_vqa`: greedy at temperature 0, else temperature/top-p sampling; `max_tokens`
    1024 is its `max_new_tokens`, `seed` 0 its `set_seed(0)`.
    """
    if batch_size < 1:
        raise MedlavaError(f"--batch-size must be at least 1, got {batch_size}")
    chunk_questions = chunk(read_questions(questions), num_chunks, chunk_idx)
    done = answered_ids(answers)
    swap = shuffled_images(chunk_questions, shuffle_images_seed) if shuffle_images_seed is not None else {}
    todo = [q for q in chunk_questions if q["question_id"] not in done]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    Path(answers).parent.mkdir(parents=True, exist_ok=True)
    with open(answers, "a") as out:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = [swap.get(q["question_id"], q["image"]) for q in batch]
            texts = [clean_question(q["text"]) for q in batch]
            items = [(Path(image_folder) / image, text) for text, image in zip(texts, images, strict=True)]
            lines = [
                json.dumps(
                    {
                        "question_id": q["question_id"],
                        "prompt": text,
                        "text": result.answer,
                        "answer_id": uuid.uuid4().hex,
                        "model_id": result.model,
                        "metadata": {"image": image, "finish_reason": result.finish_reason,
                                     **({"slice": result.slice} if result.slice is not None else {})},
                    }
                )
                + "\n"
                for q, text, image, result in zip(batch, texts, images,
                                                  analyzer.ask_many(items, params, volumes=volumes), strict=True)
            ]
            out.write("".join(lines))  # one write per batch: a kill leaves at most a torn last line
            out.flush()
            progress(len(chunk_questions) - len(todo) + start + len(batch), len(chunk_questions))
    return len(todo)


def _paired(answers: Path, gold: Path) -> tuple[dict, dict, list[dict]]:
    """(gold by id, answer text by id, the gold questions answered, in gold order); pairs by question_id."""
    gold_rows = read_jsonl(gold)
    for i, g in enumerate(gold_rows, 1):
        missing = [f for f in ("question_id", "answer", "answer_type") if not isinstance(g, dict) or f not in g]
        if missing:
            raise MedlavaError(f"{gold} line {i}: a gold question needs question_id, answer, answer_type; "
                               f"missing {', '.join(missing)}")
    gold_by_id = {g["question_id"]: g for g in gold_rows}
    rows = read_jsonl(answers)
    for i, a in enumerate(rows, 1):
        if not isinstance(a, dict) or "question_id" not in a or "text" not in a:
            raise MedlavaError(f"{answers} line {i}: an answer needs question_id and text")
    preds = {a["question_id"]: a["text"] for a in rows}
    unknown = set(preds) - set(gold_by_id)
    if unknown:
        raise MedlavaError(f"{len(unknown)} answers have question ids not in the gold file, e.g. "
                           f"{min(unknown, key=str)}")
    answered = [gold_by_id[qid] for qid in gold_by_id if qid in preds]
    if not answered:
        raise MedlavaError("no answer matches a gold question")
    return gold_by_id, preds, answered


def score_llava_med(answers: Path, gold: Path) -> dict:
    """LLaVA-Med v1.0 run_eval.py's numbers (`eval/llava_med_metrics.py`), answers paired by question_id."""
    from medlava.eval.llava_med_metrics import llava_med_scores

    gold_by_id, preds, answered = _paired(answers, gold)
    return {
        "metrics": "llava-med",
        **llava_med_scores([(preds[g["question_id"]], g) for g in answered]),
        "answered": len(answered),
        "unanswered": len(gold_by_id) - len(answered),
    }


def score(answers: Path, gold: Path) -> dict:
    """Scores of `answers` against `gold`, beside the majority-answer baseline on the same questions."""
    gold_by_id, preds, answered = _paired(answers, gold)
    majority = majority_answers(answered)

    def rows(pred_of) -> list[dict]:
        return [
            {
                **score_one(pred_of(g), g),
                "question_kind": g.get("question_kind"),
                "modality": g.get("modality"),
                "finding": g.get("finding_kinds") or ["none"],
            }
            for g in answered
        ]

    return {
        "model": summarise(rows(lambda g: preds[g["question_id"]])),
        "majority_baseline": summarise(rows(lambda g: majority[g.get("question_kind", g["answer_type"])])),
        "answered": len(answered),
        "unanswered": len(gold_by_id) - len(answered),
    }
