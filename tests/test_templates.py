"""Prompt strings exactly as LLaVA / LLaVA-Med / llava-hf build them, and image-token expansion."""

from __future__ import annotations

import pytest

from medlava.chat.templates import LLAVA_SYSTEM, VICUNA_SYSTEM, build_prompt, get_template
from medlava.chat.tokenize import tokenize_prompt
from medlava.model.random_init import build_tokenizer


def test_mistral_instruct_single_and_multi_turn():
    assert build_prompt("mistral_instruct", "Q?") == "[INST] <image>\nQ? [/INST]"
    assert (
        build_prompt("mistral_instruct", "Q2?", [("Q1?", "A1.")])
        == "[INST] <image>\nQ1? [/INST] A1. </s>[INST] Q2? [/INST]"
    )
    # LLaVA's CLI stops mistral_instruct on an empty string (after one token); ours stops on </s>.
    assert get_template("mistral_instruct").stop == ("</s>",)


@pytest.mark.parametrize("name, system", [("vicuna_v1", VICUNA_SYSTEM), ("llava_v1", LLAVA_SYSTEM)])
def test_vicuna_style(name, system):
    assert build_prompt(name, "Q?") == f"{system} USER: <image>\nQ? ASSISTANT:"
    assert build_prompt(name, "Q2?", [("Q1?", "A1.")]) == (
        f"{system} USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT:"
    )


def test_llava_hf_chat_format():
    assert build_prompt("llava_hf", "Q?") == "USER: <image>\nQ? ASSISTANT:"
    assert build_prompt("llava_hf", "Q2?", [("Q1?", "A1.")]) == "USER: <image>\nQ1? ASSISTANT: A1. USER: Q2? ASSISTANT:"


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown conversation template"):
        get_template("chatml")


def test_image_expansion_both_schemes_give_same_ids():
    with_token = build_tokenizer(300, image_token=True)
    without = build_tokenizer(300, image_token=False)
    image_id = with_token.convert_tokens_to_ids("<image>")
    prompt = "USER: <image>\nWhat modality is this? ASSISTANT:"
    a = tokenize_prompt(with_token, prompt, image_id, 5)
    b = tokenize_prompt(without, prompt, -200, 5)
    assert a.count(image_id) == 5 and b.count(-200) == 5
    assert [t if t != image_id else -200 for t in a] == b
    assert a[0] == with_token.bos_token_id
    first = a.index(image_id)
    assert a[first : first + 5] == [image_id] * 5
