"""Pointing game (Zhang et al. 2016) for `Analyzer.explain` on a phantom world with known boxes.

For every finding of every study, ask the presence question ("Is there a pleural effusion?");
where the model answers yes, a hit is a map peak inside the ground-truth box grown by 15 pixels
(the original tolerance). The centre-of-image baseline points at the image centre. Boxes in
studies.jsonl are on the displayed key image of `load_study`, the frame `explain` reports in.

    python bench/pointing_game.py [--world DIR | --seed 777 --n 200] [--methods relevance occlusion] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from medlava.train.phantoms.study import FINDING_KINDS

TOLERANCE = 15  # pixels


def inside(point, box, tol: float = TOLERANCE) -> bool:
    x, y = point
    x0, y0, x1, y1 = box
    return x0 - tol <= x <= x1 + tol and y0 - tol <= y <= y1 + tol


def run(world: Path, methods: list[str], model: Path | None = None) -> dict:
    from medlava.analysis.grounding import NothingToLocalize, explain
    from medlava.analysis.vqa import Analyzer
    from medlava.imaging import load_study
    from medlava.train.phantoms.text import noun_phrase

    analyzer = Analyzer(model)  # None: the shipped demo model
    items = []  # (modality, kind, study, question, box)
    for line in (world / "studies.jsonl").read_text().splitlines():
        rec = json.loads(line)
        study = None
        for f in rec["findings"]:
            study = study or load_study(world / "images" / rec["image"])
            items.append((rec["modality_name"], f["kind"], study, f"Is there {noun_phrase(f['kind'])}?", f["box"]))
    answers = analyzer.ask_many([(study, q) for _, _, study, q, _ in items])
    tally: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    said_no: dict[str, int] = defaultdict(int)
    seconds = dict.fromkeys(methods, 0.0)
    for (modality, kind, study, question, box), answer in zip(items, answers, strict=True):
        w, h = study.key_image().size
        groups = (modality, "all", kind)
        try:
            results = {}
            for m in methods:
                t0 = time.perf_counter()
                results[m] = explain(analyzer, study, question, m, answer=answer).peak
                seconds[m] += time.perf_counter() - t0
        except NothingToLocalize:
            for g in groups:
                said_no[g] += 1
            continue
        results["centre"] = (w / 2, h / 2)
        for name, peak in results.items():
            for g in groups:
                tally[name][g][0] += inside(peak, box)
                tally[name][g][1] += 1
    return {"tally": tally, "said_no": said_no, "findings": len(items), "seconds": seconds}


def table(result: dict, groups: list[str]) -> str:
    lines = ["| method | " + " | ".join(groups) + " |", "| --- |" + " --- |" * len(groups)]
    for name, by in result["tally"].items():
        cells = [f"{by[g][0] / by[g][1]:.1%} ({by[g][0]}/{by[g][1]})" if by[g][1] else "—" for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| answered no (skipped) | " + " | ".join(str(result["said_no"].get(g, 0)) for g in groups) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, help="a folder written by `medlava synth` (default: make one)")
    ap.add_argument("--seed", type=int, default=777, help="world seed when --world is not given (training used 1)")
    ap.add_argument("--n", type=int, default=200, help="studies when --world is not given")
    ap.add_argument("--methods", nargs="+", default=["relevance", "occlusion"])
    ap.add_argument("--model", type=Path, help="model folder (default: the shipped demo model)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        world = args.world
        if world is None:
            from medlava.train.synthetic import generate_world

            world = Path(tmp)
            generate_world(world, n=args.n, seed=args.seed)
        result = run(world, args.methods, args.model)
    print(table(result, ["x-ray", "ct", "mri", "all"]))
    kinds = [k for k in FINDING_KINDS if any(k in by for by in result["tally"].values())]
    print("\n" + table(result, kinds))
    per = ", ".join(f"{m} {s:.1f} s" for m, s in result["seconds"].items())
    print(f"\n{result['findings']} findings; explain time: {per}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
