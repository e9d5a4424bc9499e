"""VQA scores as LLaVA-Med reports them (closed accuracy, open recall) plus exact match and token F1."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

_WORD = re.compile(r"[a-z0-9\-]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def closed_correct(pred: str, gold: str) -> bool:
    """The gold yes/no appears as a word and the opposite does not (whole words: "no" ≠ "nodule")."""
    w = set(words(pred))
    other = {"yes": "no", "no": "yes"}.get(gold.lower())
    return gold.lower() in w and (other is None or other not in w)


def open_recall(pred: str, gold: str) -> float:
    """Share of the gold answer's words found in the prediction (LLaVA-Med's open-question recall)."""
    g, p = words(gold), set(words(pred))
    return sum(t in p for t in g) / len(g) if g else 0.0


def exact_match(pred: str, gold: str) -> bool:
    return words(pred) == words(gold)


def token_f1(pred: str, gold: str) -> float:
    p, g = Counter(words(pred)), Counter(words(gold))
    common = sum((p & g).values())
    if not common:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(g.values())
    return 2 * precision * recall / (precision + recall)


def score_one(pred: str, gold: dict) -> dict[str, float]:
    answer = gold["answer"]
    row = {"exact_match": float(exact_match(pred, answer)), "token_f1": token_f1(pred, answer)}
    if gold["answer_type"].upper() == "CLOSED":
        row["closed_acc"] = float(closed_correct(pred, answer))
    else:
        row["open_recall"] = open_recall(pred, answer)
    return row


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def summarise(rows: list[dict]) -> dict:
    """Means over `rows` (each a score_one result plus grouping keys), overall and per group."""
    metrics = ("closed_acc", "open_recall", "exact_match", "token_f1")

    def block(subset: list[dict]) -> dict:
        return {"n": len(subset), **{m: _mean(subset, m) for m in metrics}}

    out = {"overall": block(rows)}
    for key in ("question_kind", "modality", "finding"):
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            for value in r.get(key) if isinstance(r.get(key), list) else [r.get(key)]:
                if value is not None:
                    groups[str(value)].append(r)
        out[f"by_{key}"] = {k: block(v) for k, v in sorted(groups.items())}
    return out


def majority_answers(gold: list[dict]) -> dict[str, str]:
    """The most frequent gold answer of each question kind: what a model that ignores the image can do best."""
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for g in gold:
        by_kind[g.get("question_kind", g["answer_type"])][g["answer"]] += 1
    return {kind: counts.most_common(1)[0][0] for kind, counts in by_kind.items()}
