"""A score summary as a rich table: the model's numbers beside the majority baseline's."""

from __future__ import annotations

from rich.table import Table


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def score_table(result: dict) -> Table:
    model, base = result["model"], result["majority_baseline"]
    table = Table(title=f"VQA scores ({result['answered']} answered, {result['unanswered']} unanswered)")
    for col in ("group", "n", "closed acc", "(majority)", "open recall", "(majority)", "exact", "token F1"):
        table.add_column(col, justify="left" if col == "group" else "right")

    def add(name: str, m: dict, b: dict) -> None:
        table.add_row(
            name,
            str(m["n"]),
            _pct(m["closed_acc"]),
            _pct(b["closed_acc"]),
            _pct(m["open_recall"]),
            _pct(b["open_recall"]),
            _pct(m["exact_match"]),
            _pct(m["token_f1"]),
        )

    add("overall", model["overall"], base["overall"])
    for section in ("by_modality", "by_question_kind", "by_finding"):
        for name, m in model[section].items():
            add(f"{section[3:]}: {name}", m, base[section][name])
    return table


def report_table(result: dict) -> Table:
    """Report findings against the ground truth: micro P/R/F1 and side accuracy, model and baseline."""
    table = Table(title=f"Report findings vs ground truth ({result['model']['studies']} studies)")
    for col in ("group", "precision", "recall", "F1", "side acc", "(n sided)", "baseline F1", "baseline side"):
        table.add_column(col, justify="left" if col == "group" else "right")

    def add(name: str, m: dict, b: dict) -> None:
        table.add_row(name, _pct(m["precision"]), _pct(m["recall"]), _pct(m["f1"]), _pct(m["side_accuracy"]),
                      str(m["sided"]), _pct(b["f1"]), _pct(b["side_accuracy"]))

    add("overall", result["model"], result["baseline"])
    for name, r in result["by_protocol"].items():
        add(name, r["model"], r["baseline"])
    if result["model"].get("boxed"):
        table.caption = (f"boxes: {_pct(result['model']['box_hit_rate'])} % of {result['model']['boxed']} boxed true "
                         "findings have their centre in the true box (15 px tolerance)")
    return table


def llava_med_table(result: dict) -> Table:
    """LLaVA-Med run_eval.py's rows, in its names (its `num_open`/`num_close` print swaps the two; not here)."""
    table = Table(title=f"LLaVA-Med run_eval.py metrics ({result['answered']} answered, {result['unanswered']} "
                        f"unanswered; {result['n_closed']} closed, {result['n_open']} open"
                        + (f", {result['n_ignored']} neither" if result["n_ignored"] else "") + ")")
    table.add_column("metric")
    table.add_column("performance", justify="right")
    for name, key in (("yes/no accuracy (closed)", "closed_acc"), ("recall (open)", "open_recall"),
                      ("exact match score (open)", "exact_match"), ("f1 score (open)", "f1"),
                      ("precision (open)", "precision")):
        table.add_row(name, _pct(result[key]))
    return table


def review_table(result: dict) -> Table:
    """`eval summarize`: summarize_gpt_review.py's numbers, one row per question type, domain and overall."""
    table = Table(title=f"Judge reviews ({result['reviews']} reviews, {len(result['malformed'])} malformed)")
    for col in ("group", "judge score", "model score", "relative score", "count", "skipped (judge 0)"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for name, g in result["groups"].items():
        rel = "—" if g["relative_score"] is None else f"{g['relative_score']:.1f}"
        table.add_row(name, f"{g['judge_score']:.2f}", f"{g['model_score']:.2f}", rel, str(g["count"]),
                      str(g["skipped_judge_zero"]))
    if result["malformed"]:
        ids = ", ".join(map(str, result["malformed"][:20])) + (" …" if len(result["malformed"]) > 20 else "")
        table.caption = f"malformed replies, left out: {ids}"
    return table
