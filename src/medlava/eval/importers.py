"""VQA-RAD, SLAKE and PathVQA question files → LLaVA-Med `model_vqa` question JSONL.

Each output line has `question_id`, `image` (relative to the dataset's image folder, which
`eval vqa --image-folder` names), `text`, `answer`, `answer_type` (CLOSED or OPEN), plus the
dataset's grouping fields where it has them (`question_kind`, `modality`, `organ`).

- VQA-RAD (`VQA_RAD Dataset Public.json`): a JSON list of objects with `qid`, `image_name`,
  `question`, `answer`, `answer_type` (CLOSED/OPEN; some releases pad it with spaces),
  `question_type`, `image_organ`.
- SLAKE (`train.json` / `validate.json` / `test.json`): a JSON list with `qid`, `img_name`
  (e.g. `xmlab102/source.jpg`), `question`, `answer`, `answer_type`, `q_lang`, `modality`,
  `content_type`; only English questions (`q_lang == "en"`) are kept.
- PathVQA (the released `pvqa/qas/{train,val,test}/{split}_qa.pkl`, or the same as JSON): a list of
  objects with `image` (e.g. `test_0000`, stored as `images/test/test_0000.jpg`), `question`,
  `answer`; yes/no answers are CLOSED, all others OPEN, and question ids are the row numbers.
  The LXMERT-style `{split}_vqa.pkl` rows (`img_id`, `sent`, `label` {answer: score},
  `question_id`) are read too. Pickles are read with an unpickler that refuses every class, so a
  file can only give back plain lists, dicts, strings and numbers.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

from medlava.errors import MedlavaError

DATASETS = ("vqa-rad", "slake", "pathvqa")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise MedlavaError(f"the pickle names {module}.{name}; only plain lists and dicts are read")


def _load(path: Path):
    path = Path(path)
    if not path.is_file():
        raise MedlavaError(f"no such file: {path}")
    data = path.read_bytes()
    if path.suffix.lower() in (".pkl", ".pickle"):
        try:
            return _PlainUnpickler(io.BytesIO(data)).load()
        except MedlavaError:
            raise
        except Exception as e:  # a truncated or foreign pickle can raise almost anything
            raise MedlavaError(f"{path} is not a readable pickle: {e}") from None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedlavaError(f"{path} is not valid JSON: {e}") from None


def _rows(data, path: Path, dataset: str) -> list[dict]:
    if isinstance(data, dict):  # some re-releases wrap the list, e.g. {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise MedlavaError(f"{path} is not a {dataset} question file: expected a list of question objects")
    return data


def _need(row: dict, i: int, fields: tuple[str, ...], path: Path, dataset: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise MedlavaError(f"{path} item {i}: a {dataset} question needs {', '.join(fields)}; "
                           f"missing {', '.join(missing)}")


def _answer_type(value, i: int, path: Path) -> str:
    kind = str(value).strip().upper()
    if kind not in ("CLOSED", "OPEN"):
        raise MedlavaError(f"{path} item {i}: answer_type must be CLOSED or OPEN, got {value!r}")
    return kind


def _text(value) -> str:
    return str(value).strip()


def _vqa_rad(rows: list[dict], path: Path) -> tuple[list[dict], int]:
    out = []
    for i, r in enumerate(rows):
        _need(r, i, ("qid", "image_name", "question", "answer", "answer_type"), path, "VQA-RAD")
        q = {"question_id": r["qid"], "image": r["image_name"], "text": _text(r["question"]),
             "answer": _text(r["answer"]), "answer_type": _answer_type(r["answer_type"], i, path)}
        if r.get("question_type"):
            q["question_kind"] = _text(r["question_type"]).upper()
        if r.get("image_organ"):
            q["organ"] = _text(r["image_organ"]).upper()
        out.append(q)
    return out, 0


def _slake(rows: list[dict], path: Path) -> tuple[list[dict], int]:
    out = []
    for i, r in enumerate(rows):
        _need(r, i, ("qid", "img_name", "question", "answer", "answer_type", "q_lang"), path, "SLAKE")
        if r["q_lang"] != "en":
            continue
        q = {"question_id": r["qid"], "image": r["img_name"], "text": _text(r["question"]),
             "answer": _text(r["answer"]), "answer_type": _answer_type(r["answer_type"], i, path)}
        if r.get("content_type"):
            q["question_kind"] = _text(r["content_type"])
        if r.get("modality"):
            q["modality"] = _text(r["modality"]).lower()
        out.append(q)
    return out, len(rows) - len(out)


def _pathvqa(rows: list[dict], path: Path) -> tuple[list[dict], int]:
    out = []
    for i, r in enumerate(rows):
        if "img_id" in r and "sent" in r:  # LXMERT-style {split}_vqa.pkl
            _need(r, i, ("img_id", "sent", "label"), path, "PathVQA")
            label = r["label"]
            if not isinstance(label, dict) or not label:
                raise MedlavaError(f"{path} item {i}: label must be a non-empty {{answer: score}} object")
            image, question, answer = r["img_id"], r["sent"], max(label, key=label.get)
        else:
            _need(r, i, ("image", "question", "answer"), path, "PathVQA")
            image, question, answer = r["image"], r["question"], r["answer"]
        image = str(image)
        answer = _text(answer)
        out.append({"question_id": r.get("question_id", i), "image": image if Path(image).suffix else f"{image}.jpg",
                    "text": _text(question), "answer": answer,
                    "answer_type": "CLOSED" if answer.lower() in ("yes", "no") else "OPEN"})
    return out, 0


def import_questions(dataset: str, source: Path, out: Path) -> dict:
    """Convert `source` (a `dataset` release file) to model_vqa questions at `out`; returns the counts."""
    readers = {"vqa-rad": _vqa_rad, "slake": _slake, "pathvqa": _pathvqa}
    if dataset not in readers:
        raise MedlavaError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    rows = _rows(_load(source), source, dataset)
    questions, skipped = readers[dataset](rows, Path(source))
    if not questions:
        raise MedlavaError(f"{source} holds no {'English ' if dataset == 'slake' else ''}questions")
    seen: set = set()
    for q in questions:
        if isinstance(q["question_id"], bool) or not isinstance(q["question_id"], int | str):
            raise MedlavaError(f"{source}: question id {q['question_id']!r} is not a number or a string")
        if q["question_id"] in seen:
            raise MedlavaError(f"{source}: question id {q['question_id']!r} appears twice; answers are paired by id")
        seen.add(q["question_id"])
        if not q["text"]:
            raise MedlavaError(f"{source}: question {q['question_id']!r} has an empty question")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions))
    closed = sum(q["answer_type"] == "CLOSED" for q in questions)
    return {"questions": len(questions), "closed": closed, "open": len(questions) - closed, "skipped": skipped,
            "skipped_why": "not English" if skipped else ""}
