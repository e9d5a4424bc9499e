"""The shipped demo model: used by default, small, and the same model in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medlava.analysis.inputs import prepare
from medlava.cli import app
from medlava.engine.reference import generate_reference
from medlava.engine.sampling import SamplingParams
from medlava.eval.metrics import closed_correct, open_recall
from medlava.model.demo import DEMO_MODEL
from medlava.model.loader import load_model
from medlava.train.synthetic import generate_world

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_ask_without_model_uses_the_demo_model():
    result = CliRunner().invoke(app, ["ask", str(SAMPLES / "phantom_abdomen_ct.dcm"), "What modality is this?", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["model"] == "medlava-tiny"
    assert out["answer"] == "ct"
    assert out["prompt"] == "[INST] <image>\nWhat modality is this? [/INST]"


def test_demo_model_is_small_and_has_a_card():
    size = sum(f.stat().st_size for f in DEMO_MODEL.iterdir())
    assert size <= 20 * 2**20
    card = (DEMO_MODEL / "README.md").read_text()
    assert "synthetic" in card and "not a clinical model" in card


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> tuple[Path, list[dict]]:
    world = tmp_path_factory.mktemp("heldout")
    generate_world(world, 4, seed=777, size=224, workers=1)  # the held-out seed, never trained on
    questions = [json.loads(line) for line in (world / "questions.jsonl").read_text().splitlines()]
    return world, questions[:20]


def test_transformers_gives_the_same_greedy_answers(heldout):
    from transformers import LlavaForConditionalGeneration

    world, questions = heldout
    lm = load_model(DEMO_MODEL, dtype="float32")
    hf = LlavaForConditionalGeneration.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    right = 0
    for q in questions:
        inp = prepare(lm, world / "images" / q["image"], q["text"])
        ours = generate_reference(lm.model, lm.tokenizer, inp.input_ids, SamplingParams(max_tokens=24), inp.pixels)
        with torch.no_grad():
            theirs = hf.generate(input_ids=torch.tensor([inp.input_ids]), pixel_values=inp.pixels,
                                 max_new_tokens=24, do_sample=False)
        assert ours.token_ids == theirs[0, len(inp.input_ids):].tolist(), q["text"]
        answer = ours.text.strip()
        right += closed_correct(answer, q["answer"]) if q["answer_type"] == "CLOSED" else open_recall(answer, q["answer"])
    assert right / len(questions) > 0.6  # far above chance; the full held-out figures are in the model card
