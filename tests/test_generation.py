"""Sampling and the reference generation loop's stopping rules."""

from __future__ import annotations

import pytest
import torch

from medlava.engine.reference import find_stop, generate_reference
from medlava.engine.sampling import SamplingParams, sample
from medlava.model.loader import load_model


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample(logits, SamplingParams()) == 1


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([5.0, 4.9, 0.0, -1.0, -2.0])
    draws = {sample(logits, SamplingParams(temperature=1.0, top_k=2, seed=i), None) for i in range(50)}
    gen = torch.Generator().manual_seed(0)
    draws |= {sample(logits, SamplingParams(temperature=1.0, top_k=2), gen) for _ in range(200)}
    assert draws == {0, 1}
    gen = torch.Generator().manual_seed(0)
    # top_p 0.5: token 0 alone holds ~52 % of the mass, so nothing else survives.
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), gen) for _ in range(100)} == {0}


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(50)
    p = SamplingParams(temperature=1.5, seed=7)
    a = [sample(logits, p, g) for g in [p.generator()] for _ in range(20)]
    b = [sample(logits, p, g) for g in [p.generator()] for _ in range(20)]
    assert a == b and len(set(a)) > 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0)])
def test_bad_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_find_stop():
    assert find_stop("abc</s>def", ["</s>"]) == 3
    assert find_stop("abc", ["</s>", ""]) is None
    assert find_stop("x STOP y END", ["END", "STOP"]) == 2


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load_model(model_dir("llama-mlp2x-l2"))


def prompt(lm) -> list[int]:
    ids = lm.tokenizer("USER: What is this? ASSISTANT:").input_ids
    return ids[:1] + [lm.config.image_token_id] * lm.config.image_tokens + ids[1:]


def test_stops_on_eos_and_stop_token_ids(tiny):
    pixels = torch.zeros(1, 3, 28, 28)
    free = generate_reference(tiny.model, tiny.tokenizer, prompt(tiny), SamplingParams(max_tokens=12, ignore_eos=True), pixels)
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    cut = generate_reference(
        tiny.model, tiny.tokenizer, prompt(tiny), SamplingParams(max_tokens=12, stop_token_ids=[stop_at]), pixels
    )
    assert cut.token_ids == free.token_ids[: first + 1] and cut.finish_reason == "stop"


def test_stops_on_stop_string_and_trims_it(tiny):
    pixels = torch.zeros(1, 3, 28, 28)
    free = generate_reference(tiny.model, tiny.tokenizer, prompt(tiny), SamplingParams(max_tokens=12, ignore_eos=True), pixels)
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop
    cut = generate_reference(
        tiny.model, tiny.tokenizer, prompt(tiny), SamplingParams(max_tokens=12, stop=[stop], ignore_eos=True), pixels
    )
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)]
    assert len(cut.token_ids) <= len(free.token_ids)


def test_prompt_longer_than_context_is_refused(tiny):
    ids = [5] * tiny.config.text.max_position_embeddings
    with pytest.raises(ValueError, match="no room"):
        generate_reference(tiny.model, tiny.tokenizer, ids, SamplingParams())
