"""Report evaluation on a phantom world: do the report's findings match the ground truth?

Scored over (study, finding kind) pairs, micro-averaged: a kind the report lists that the study
has is a true positive, one it lists that the study lacks a false positive, one it misses a false
negative. Side accuracy counts the true positives whose kind has a side. The baseline writes, for
every study, the most common ground-truth report (finding set) of the study's protocol.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from medlava.analysis.report import Report
from medlava.errors import MedlavaError
from medlava.eval.vqa import read_jsonl
from medlava.train.phantoms.study import PROTOCOL_KINDS, PhantomStudy
from medlava.train.phantoms.text import NAMES

Labels = dict[str, str | None]  # finding kind -> side


def kind_of(name: str, protocol: str) -> str | None:
    """The world's kind a plain-words finding name stands for: the exact name, else the same head
    noun ('lung nodule' on a radiograph is the world's 'nodule')."""
    kinds = PROTOCOL_KINDS[protocol]
    exact = [k for k in kinds if NAMES[k] == name]
    if exact:
        return exact[0]
    head = name.split()[-1]
    same_head = [k for k in kinds if NAMES[k].split()[-1] == head]
    return same_head[0] if len(same_head) == 1 else None


def predicted_labels(report: Report, protocol: str) -> Labels:
    labels: Labels = {}
    for f in report.findings:
        kind = kind_of(f.name, protocol)
        if kind is not None:
            labels.setdefault(kind, f.side)
        else:
            labels.setdefault(f"other:{f.name}", f.side)  # a false positive by construction
    return labels


def true_labels(study: PhantomStudy) -> Labels:
    return {f.kind: f.side for f in study.findings}


def score_labels(pairs: list[tuple[Labels, Labels]]) -> dict:
    """Micro precision/recall/F1 over (study, kind) and side accuracy, from (predicted, true) pairs."""
    tp = fp = fn = sided = side_right = 0
    for pred, true in pairs:
        tp += len(pred.keys() & true.keys())
        fp += len(pred.keys() - true.keys())
        fn += len(true.keys() - pred.keys())
        for kind in pred.keys() & true.keys():
            if true[kind] is not None:
                sided += 1
                side_right += pred[kind] == true[kind]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"studies": len(pairs), "tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall,
            "f1": f1, "sided": sided, "side_accuracy": side_right / sided if sided else None}


TOLERANCE = 15  # pixels, as in the pointing game


def box_hits(report: Report, study: PhantomStudy) -> tuple[int, int]:
    """(hits, boxed): a true-positive finding's box is a hit when its centre lies in the true box
    grown by TOLERANCE pixels (on its slice, for volumes)."""
    truth = {f.kind: f for f in study.findings}
    hits = boxed = 0
    for f in report.findings:
        kind = kind_of(f.name, study.protocol)
        if f.box is None or kind not in truth:
            continue
        x, y = (f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2
        x0, y0, x1, y1 = truth[kind].box
        boxed += 1
        hits += x0 - TOLERANCE <= x <= x1 + TOLERANCE and y0 - TOLERANCE <= y <= y1 + TOLERANCE
    return hits, boxed


def majority_baseline(studies: list[PhantomStudy]) -> list[Labels]:
    """Every study gets the most common ground-truth finding set of its protocol."""
    common: dict[str, Counter] = {}
    for s in studies:
        common.setdefault(s.protocol, Counter())[tuple(sorted(true_labels(s).items(), key=str))] += 1
    top = {p: dict(c.most_common(1)[0][0]) for p, c in common.items()}
    return [top[s.protocol] for s in studies]


def read_world(world: Path) -> list[PhantomStudy]:
    path = Path(world) / "studies.jsonl"
    if not path.is_file():
        raise MedlavaError(f"{world} is not a phantom world (no studies.jsonl): make one with medlava synth")
    return [PhantomStudy.from_record(r) for r in read_jsonl(path)]


def evaluate_reports(world: Path, reports: list[Report]) -> dict:
    """Scores of `reports` (one per study of the world, in order) beside the majority baseline,
    overall and per protocol."""
    studies = read_world(world)
    if len(reports) != len(studies):
        raise MedlavaError(f"{len(reports)} reports for {len(studies)} studies")
    pairs = [(predicted_labels(r, s.protocol), true_labels(s)) for r, s in zip(reports, studies, strict=True)]
    base = list(zip(majority_baseline(studies), (p[1] for p in pairs), strict=True))
    result = {"model": score_labels(pairs), "baseline": score_labels(base), "by_protocol": {}}
    hits = [box_hits(r, s) for r, s in zip(reports, studies, strict=True)]
    boxed = sum(b for _, b in hits)
    result["model"]["boxed"] = boxed
    result["model"]["box_hit_rate"] = sum(h for h, _ in hits) / boxed if boxed else None
    for protocol in sorted({s.protocol for s in studies}):
        idx = [i for i, s in enumerate(studies) if s.protocol == protocol]
        result["by_protocol"][protocol] = {"model": score_labels([pairs[i] for i in idx]),
                                           "baseline": score_labels([base[i] for i in idx])}
    return result


def write_reports(path: Path, studies: list[PhantomStudy], reports: list[Report]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for s, r in zip(studies, reports, strict=True):
            f.write(json.dumps({"id": s.id, "image": s.image, "report": r.model_dump()}) + "\n")
