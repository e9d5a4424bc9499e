"""Prompt strings exactly as LLaVA / LLaVA-Med / llava-hf build them, and image-token expansion."""

from __future__ import annotations

import pytest

from medlava.chat.bpe import train_bpe_tokenizer
from medlava.chat.templates import LLAVA_SYSTEM, VICUNA_SYSTEM, build_prompt, get_template
from medlava.chat.tokenize import tokenize_prompt
from medlava.model.random_init import TOKENIZER_TEXT


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
    with_token = train_bpe_tokenizer(TOKENIZER_TEXT, 300, image_token=True)
    without = train_bpe_tokenizer(TOKENIZER_TEXT, 300, image_token=False)
    image_id = with_token.convert_tokens_to_ids("<image>")
    prompt = "USER: <image>\nWhat modality is this? ASSISTANT:"
    a = tokenize_prompt(with_token, prompt, image_id, 5)
    b = tokenize_prompt(without, prompt, -200, 5)
    assert a.count(image_id) == 5 and b.count(-200) == 5
    assert [t if t != image_id else -200 for t in a] == b
    assert a[0] == with_token.bos_token_id
    first = a.index(image_id)
    assert a[first : first + 5] == [image_id] * 5


@pytest.mark.parametrize("name", ["mistral_instruct", "vicuna_v1", "llava_v1", "llava_hf"])
def test_finished_conversation_extends_the_prompt(name):
    """Training masks rely on each prompt being a prefix of the conversation with its answer."""
    t = get_template(name)
    turns = ["<image>\nQ1?", "A1.", "Q2?", "A2."]
    for i in (1, 3):
        prompt, finished = t.render(turns[:i]), t.render(turns[: i + 1])
        assert finished.startswith(prompt) and turns[i] in finished[len(prompt) :]
    assert t.render(turns[:2]).endswith("A1. </s>" if name == "mistral_instruct" else "A1.</s>" if "v1" in name else "A1. ")
