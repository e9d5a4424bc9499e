"""LLaVA-Med's GPT-review evaluation: a judge model scores the reference answer and the model's answer.

The prompt is LLaVA-Med's (`llava/eval/eval_multimodal_chat_gpt_score.py`), byte for byte: its system
message (leading quote included), its `[Context]` / `[Question]` / `[Assistant 1]` / `[Assistant 2]` /
`[System]` layout and instruction text. As there, the context is the figure's label, caption and
in-text mention, formatted with Python's `str()` whatever their type; the question is the question's
`text` as it stands (LLaVA-Med does not remove `<image>` here); Assistant 1 is the reference answer
(`gpt4_answer`; `answer` for VQA question files) and Assistant 2 the model's answer. It is sent at
temperature 0 through the `openai` SDK to any OpenAI-compatible endpoint.

Differences from LLaVA-Med, on purpose: answers are paired with questions by `question_id` (LLaVA-Med
zips the two files by line order, which pairs the wrong answers after a resumed or chunked run); the
reviews file is appended one line per question and a rerun skips question ids already in it; a reply
whose first line is not two numbers is kept, counted and shown rather than crashing the summary; and
the relative score leaves out items whose judge score is 0 (LLaVA-Med would divide by zero).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from medlava.errors import MedlavaError
from medlava.eval.vqa import answered_ids, read_jsonl

INSTRUCT_PROMPT = """We would like to request your feedback on the performance of two AI assistants in response to the user question displayed above. The user asks the question on observing an image. For your reference, the visual content in the image is represented with caption describing the same image.
  Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.
  Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the responses were presented does not affect your judgment."""  # noqa: E501
SYSTEM_MESSAGE = "'You are a helpful and precise assistant for checking the quality of the answer."
ROLE = "Assistant"
DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")  # summarize_gpt_review.py's order
QUESTION_TYPES = ("conversation", "detailed_description")


def review_prompt(fig_label, fig_caption, fig_context, question, ans1, ans2) -> str:
    """The user message LLaVA-Med sends (its `conv_to_str`)."""
    return (f"[Context]\n"
            f"Figure Caption:\n{fig_label}: {fig_caption}\n\n"
            f"Figure Context:\n\t- {fig_context}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{ROLE} 1]\n{ans1}\n\n[End of {ROLE} 1]\n\n"
            f"[{ROLE} 2]\n{ans2}\n\n[End of {ROLE} 2]\n\n"
            f"[System]\n{INSTRUCT_PROMPT}\n\n")


def reference_answer(question: dict):
    for key in ("gpt4_answer", "answer"):
        if key in question:
            return question[key]
    raise MedlavaError(f"question {question.get('question_id')!r} has no reference answer (gpt4_answer or answer)")


def review_messages(question: dict, answer_text: str) -> list[dict]:
    """System + user message for one question (a LLaVA-Med question row) and the model's answer text."""
    prompt = review_prompt(question.get("fig_label", ""), question.get("fig_caption", question.get("caption", "")),
                           question.get("in_text_mention", ""), question["text"], reference_answer(question),
                           answer_text)
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt}]


def parse_scores(reply: str) -> tuple[float, float] | None:
    """(reference score, model score) from the reply's first line, or None when it is not two numbers."""
    first = reply.strip().split("\n")[0].split()
    if len(first) != 2:
        return None
    try:
        a, b = float(first[0]), float(first[1])
    except ValueError:
        return None
    return (a, b) if math.isfinite(a) and math.isfinite(b) else None


def _read_pairs(questions: Path, answers: Path) -> tuple[list[dict], dict]:
    qs = read_jsonl(questions)
    for i, q in enumerate(qs, 1):
        missing = [f for f in ("question_id", "text") if not isinstance(q, dict) or f not in q]
        if missing:
            raise MedlavaError(f"{questions} line {i}: a question needs question_id and text; missing "
                               f"{', '.join(missing)}")
        reference_answer(q)
    ans = read_jsonl(answers)
    for i, a in enumerate(ans, 1):
        if not isinstance(a, dict) or "question_id" not in a or "text" not in a:
            raise MedlavaError(f"{answers} line {i}: an answer needs question_id and text")
    by_id = {a["question_id"]: a for a in ans}
    unknown = set(by_id) - {q["question_id"] for q in qs}
    if unknown:
        raise MedlavaError(f"{len(unknown)} answers have question ids not in {questions}, e.g. "
                           f"{min(unknown, key=str)}")
    return qs, by_id


def run_judge(
    questions: Path,
    answers: Path,
    reviews: Path,
    *,
    judge_model: str,
    base_url: str | None = None,
    api_key: str | None = None,
    max_retries: int = 6,
    timeout: float = 120.0,
    client=None,
    progress=lambda done, total: None,
) -> dict:
    """Review every answered question not yet in `reviews`; returns counts and the malformed replies' ids.

    Retries (429, 5xx, lost connections) are the `openai` SDK's: exponential backoff with jitter,
    honouring Retry-After, up to `max_retries` times. Each review is appended and flushed at once.
    """
    import openai

    qs, by_id = _read_pairs(questions, answers)
    done = answered_ids(reviews)
    todo = [q for q in qs if q["question_id"] in by_id and q["question_id"] not in done]
    if client is None:
        client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=max_retries,
                               timeout=timeout)
    malformed: list = []
    Path(reviews).parent.mkdir(parents=True, exist_ok=True)
    with open(reviews, "a") as out:
        for n, q in enumerate(todo, 1):
            answer = by_id[q["question_id"]]
            messages = review_messages(q, answer["text"])
            try:
                response = client.chat.completions.create(model=judge_model, messages=messages, temperature=0.0)
            except openai.APIStatusError as e:
                raise MedlavaError(f"judge endpoint answered HTTP {e.status_code} on question "
                                   f"{q['question_id']!r}: {e.message}") from None
            except openai.APIError as e:  # connection errors and timeouts, after the retries
                raise MedlavaError(f"judge endpoint failed on question {q['question_id']!r}: {e}") from None
            reply = (response.choices[0].message.content or "").strip()
            if parse_scores(reply) is None:
                malformed.append(q["question_id"])
            row = {**q, "question": q["text"], "ans1": reference_answer(q), "ans2": answer["text"],
                   "gpt_eval": reply, "answer_id": answer.get("answer_id"), "judge_model": judge_model}
            out.write(json.dumps(row) + "\n")
            out.flush()
            progress(n, len(todo))
    return {
        "reviewed": len(todo),
        "already_reviewed": sum(1 for q in qs if q["question_id"] in done),
        "unanswered": sum(1 for q in qs if q["question_id"] not in by_id),
        "malformed": malformed,
    }


def domain_of(review: dict) -> str | None:
    """LLaVA-Med's `get_domain`: the first of its five domains flagged true; a plain string is taken as is."""
    domain = review.get("domain")
    if isinstance(domain, str):
        return domain or None
    if isinstance(domain, dict):
        return next((d for d in DOMAINS if domain.get(d)), None)
    return None


def summarize(reviews: Path) -> dict:
    """summarize_gpt_review.py's table: per question type, per domain and overall, the judge's mean score
    for the reference, for the model, the relative score 100 × mean(model / judge) over items whose judge
    score is not 0, and the count. Malformed replies are left out of every group and listed."""
    rows = read_jsonl(reviews)
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    malformed = []
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "gpt_eval" not in r:
            raise MedlavaError(f"{reviews} line {i} is not a review (no gpt_eval)")
        scores = parse_scores(str(r["gpt_eval"]))
        if scores is None:
            malformed.append(r.get("question_id"))
            continue
        names = [f"type:{r['type']}" if r.get("type") else None, f"domain:{domain_of(r)}" if domain_of(r) else None]
        for name in [n for n in names if n] + ["overall"]:
            groups[name].append(scores)

    def block(pairs: list[tuple[float, float]]) -> dict:
        ratios = [m / j for j, m in pairs if j != 0]
        return {
            "judge_score": sum(j for j, _ in pairs) / len(pairs),
            "model_score": sum(m for _, m in pairs) / len(pairs),
            "relative_score": 100 * sum(ratios) / len(ratios) if ratios else None,
            "count": len(pairs),
            "skipped_judge_zero": len(pairs) - len(ratios),
        }

    def order(name: str) -> tuple:
        kind, _, value = name.partition(":")
        known = QUESTION_TYPES if kind == "type" else DOMAINS
        return ({"type": 0, "domain": 1, "overall": 2}[kind], known.index(value) if value in known else len(known),
                value)

    return {"groups": {name: block(groups[name]) for name in sorted(groups, key=order)},
            "reviews": len(rows), "malformed": malformed}
