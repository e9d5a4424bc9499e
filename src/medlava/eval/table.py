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
