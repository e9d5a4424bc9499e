"""The paper's VQA numbers, computed the way LLaVA-Med v1.0's `llava/eval/run_eval.py` computes them.

Reimplemented from its definitions (commit b9a98a7, "fix closed accuracy calculation"), quirks kept,
because these are the numbers the LLaVA-Med paper's VQA-RAD / SLAKE / PathVQA tables report:

- Both texts are lower-cased and put through `normalize_word` (VQA-style: punctuation, number words,
  articles, contractions), and the scoring functions normalise them once more.
- Only `answer_type == "CLOSED"` and `== "OPEN"` (exactly, upper case) are scored; others are ignored.
- CLOSED ("yes/no accuracy"): a hit when the prediction holds "yes" or "no" *as a substring* and the
  gold answer is a substring of it ("nodule" counts as holding "no"; "no" is found in "not").
- OPEN "recall": of `calculate_f1score`, tp / (tp + fn), where tp sums the *prediction's* counts
  of words shared with the gold answer and fn the gold's counts of words the prediction lacks.
- OPEN "exact match" (`calculate_exactmatch`): distinct gold words found in the prediction divided
  by the prediction's word count, so a longer correct answer scores lower.
- Words are whitespace-split (no regex), so "effusion." and "effusion" differ unless normalisation
  strips the period.

Unlike run_eval.py, answers are paired with gold questions by `question_id`, not by line order.
"""

from __future__ import annotations

import re
from collections import Counter

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
# Kept as LLaVA-Med (and the VQA toolkit it copies) wrote it: "(?!<=\d)" is a negative lookahead for the
# literal "<=" plus a digit, not a lookbehind, so "1.5" keeps its period only because of "(?!\d)".
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(\,)(\d)")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")


def normalize_word(text: str) -> str:
    """LLaVA-Med's `normalize_word` (eval_metrics/glossary.py)."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    text = _PERIOD.sub("", out, count=32)  # LLaVA-Med passes re.UNICODE (== 32) positionally: it is `count`
    kept = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    kept = [_CONTRACTIONS.get(w, w) for w in kept if w not in _ARTICLES]
    return " ".join(kept).replace(",", "")


def _counts(text: str) -> Counter:
    return Counter(text.lower().strip().split())


def exact_match(pred: str, gold: str) -> float:
    """`calculate_exactmatch`: distinct gold words present in the prediction / the prediction's word count."""
    p, g = _counts(normalize_word(pred)), _counts(normalize_word(gold))
    total = sum(p.values())
    return sum(1 for w in g if w in p) / total if total else 0.0


def f1_precision_recall(pred: str, gold: str) -> tuple[float, float, float]:
    """`calculate_f1score`: (f1, precision, recall); all 0 when either side is empty or nothing is shared."""
    p, g = _counts(normalize_word(pred)), _counts(normalize_word(gold))
    if not p or not g:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in p.items() if w in g)
    fp = sum(n for w, n in p.items() if w not in g)
    fn = sum(n for w, n in g.items() if w not in p)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def closed_hit(pred: str, gold: str) -> bool:
    """run_eval.py's yes/no rule on normalised text: substrings, not words."""
    return ("yes" in pred or "no" in pred) and gold in pred


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def llava_med_scores(pairs: list[tuple[str, dict]]) -> dict:
    """run_eval.py's table for (prediction text, gold question) pairs.

    Returns closed accuracy over CLOSED items; open recall, exact match, F1 and precision over OPEN items
    (None where a set is empty: run_eval.py divides by zero there), and the counts.
    """
    closed: list[float] = []
    recall: list[float] = []
    exact: list[float] = []
    f1: list[float] = []
    precision: list[float] = []
    ignored = 0
    for pred_text, gold in pairs:
        gold_value = normalize_word(str(gold["answer"]).lower())
        pred_value = normalize_word(str(pred_text).lower())
        kind = gold.get("answer_type")
        if kind == "OPEN":
            exact.append(exact_match(pred_value, gold_value))
            f, pr, rc = f1_precision_recall(pred_value, gold_value)
            f1.append(f)
            precision.append(pr)
            recall.append(rc)
        elif kind == "CLOSED":
            closed.append(float(closed_hit(pred_value, gold_value)))
        else:
            ignored += 1
    return {
        "closed_acc": _mean(closed),
        "open_recall": _mean(recall),
        "exact_match": _mean(exact),
        "f1": _mean(f1),
        "precision": _mean(precision),
        "n_closed": len(closed),
        "n_open": len(recall),
        "n_ignored": ignored,
    }
