"""Prompt strings exactly as LLaVA-Med / LLaVA / llava-hf build them, and image-token expansion."""

from __future__ import annotations

import pytest

from medlava.chat import render_prompt
from medlava.chat.bpe import train_bpe_tokenizer
from medlava.chat.messages import render_messages
from medlava.chat.templates import TEMPLATES, build_prompt, get_template
from medlava.chat.tokenize import tokenize_prompt
from medlava.model.random_init import TOKENIZER_TEXT

# The system prompts of LLaVA-Med's llava/conversation.py (conv_vicuna_v0, conv_vicuna_v1,
# conv_llava_v1_mmtag, conv_llama_2, conv_llava_llama_2, conv_mpt) and LLaVA's conv_chatml_direct,
# written out here rather than imported so a typo in the package cannot pass.
LLAVA = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using natural "
    "language.The visual content will be provided with the following format: <Image>visual content</Image>."
)
LLAMA_2 = (
    "[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
    "or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
    "\n<</SYS>>\n\n"
)
LLAVA_LLAMA_2 = (
    "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
    "\n<</SYS>>\n\n"
)
MPT = (
    "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers."
)
CHATML = "<|im_start|>system\nAnswer the questions."
# conv_vicuna_v0 ("default", "v0") opens with a worked exchange (offset 2): system, then it, "###"-joined.
V0 = (
    LLAVA + "###Human: What are the key differences between renewable and non-renewable energy sources?"
    "###Assistant: Renewable energy sources are those that can be replenished naturally in a relatively short "
    "amount of time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the "
    "other hand, are finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key "
    "differences between renewable and non-renewable energy sources:\n1. Availability: Renewable energy sources "
    "are virtually inexhaustible, while non-renewable energy sources are finite and will eventually run out.\n"
    "2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable "
    "sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n"
    "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower "
    "operational costs than non-renewable sources.\n4. Reliability: Renewable energy sources are often more "
    "reliable and can be used in more remote locations than non-renewable sources.\n5. Flexibility: Renewable "
    "energy sources are often more flexible and can be adapted to different situations and needs, while "
    "non-renewable sources are more rigid and inflexible.\n6. Sustainability: Renewable energy sources are more "
    "sustainable over the long term, while non-renewable sources are not, and their depletion can lead to "
    "economic and social instability.\n###"
)

# A conversation about one image, as LLaVA-Med's llava/eval/model_vqa.py builds it: the first question
# "<image>\n" + question, the model's earlier answers in between, and the last assistant slot empty
# (conv.append_message(conv.roles[1], None)). Answers and questions carry stray whitespace so the
# templates' stripping (or not) shows.
QUESTIONS = ["What modality is this?", "Is there a nodule? ", "Any effusion?"]
ANSWERS = [" A chest X-ray.\n", "No."]

# Conversation.get_prompt() of LLaVA-Med's llava/conversation.py (names without a prefix) and of LLaVA's
# (haotian-liu) llava/conversation.py ("llava/" names, chatml_direct, mistral_direct), for 1, 2 and 3
# user turns, worked out from those functions' separator-style branches:
#   SINGLE  system + sep, then "role: message" + sep per message, "role:" for the open slot (no strip);
#   TWO     LLaVA-Med: system + sep, "role: " + message.strip() + (sep | sep2 + " "), the whole .strip();
#           LLaVA: the same without either strip and with no space after sep2;
#   LLAMA_2 sep + "[INST] msg [/INST]" for user, " " + msg + " " + sep2 for the assistant, system in
#           <<SYS>> on the first, then .lstrip(sep);
#   MPT     system + sep, then role + message + sep; PLAIN message + sep (sep2 is None: answers crash);
# with the image handling of get_prompt for an image-bearing first message: <image> removed, text
# stripped, then "<image>\n" + text, or for mmtag a turn of its own ("<Image><image></Image>",
# answered "Received."). v0's first message is its worked example, so its question goes in as given.
# None: LLaVA-Med raises (plain templates with an answer: str + None).
EXPECTED = {
    "default": (
        f"{V0}Human: <image>\nWhat modality is this?###Assistant:",
        f"{V0}Human: <image>\nWhat modality is this?###Assistant:  A chest X-ray.\n###Human: Is there a nodule? ###Assistant:",
        f"{V0}Human: <image>\nWhat modality is this?###Assistant:  A chest X-ray.\n###Human: Is there a nodule? ###Assistant: No.###Human: Any effusion?###Assistant:",
    ),
    "v0": (
        f"{V0}Human: <image>\nWhat modality is this?###Assistant:",
        f"{V0}Human: <image>\nWhat modality is this?###Assistant:  A chest X-ray.\n###Human: Is there a nodule? ###Assistant:",
        f"{V0}Human: <image>\nWhat modality is this?###Assistant:  A chest X-ray.\n###Human: Is there a nodule? ###Assistant: No.###Human: Any effusion?###Assistant:",
    ),
    "v1": (
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT:",
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT: A chest X-ray.</s> USER: Is there a nodule? ASSISTANT:",
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT: A chest X-ray.</s> USER: Is there a nodule? ASSISTANT: No.</s> USER: Any effusion? ASSISTANT:",
    ),
    "vicuna_v1": (
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT:",
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT: A chest X-ray.</s> USER: Is there a nodule? ASSISTANT:",
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT: A chest X-ray.</s> USER: Is there a nodule? ASSISTANT: No.</s> USER: Any effusion? ASSISTANT:",
    ),
    "llama_2": (
        f"{LLAMA_2}<image>\nWhat modality is this? [/INST]",
        f"{LLAMA_2}<image>\nWhat modality is this? [/INST]  A chest X-ray.\n </s><s>[INST] Is there a nodule?  [/INST]",
        f"{LLAMA_2}<image>\nWhat modality is this? [/INST]  A chest X-ray.\n </s><s>[INST] Is there a nodule?  [/INST] No. </s><s>[INST] Any effusion? [/INST]",
    ),
    "mistral_instruct": (
        "[INST] <image>\nWhat modality is this? [/INST]",
        "[INST] <image>\nWhat modality is this? [/INST]  A chest X-ray.\n </s>[INST] Is there a nodule?  [/INST]",
        "[INST] <image>\nWhat modality is this? [/INST]  A chest X-ray.\n </s>[INST] Is there a nodule?  [/INST] No. </s>[INST] Any effusion? [/INST]",
    ),
    "plain": (
        "<image>\nWhat modality is this?\n",
        None,
        None,
    ),
    "v0_plain": (
        "<image>\nWhat modality is this?\n",
        None,
        None,
    ),
    "llava_v0": (
        f"{LLAVA}###Human: <image>\nWhat modality is this?###Assistant:",
        f"{LLAVA}###Human: <image>\nWhat modality is this?###Assistant:  A chest X-ray.\n###Human: Is there a nodule? ###Assistant:",
        f"{LLAVA}###Human: <image>\nWhat modality is this?###Assistant:  A chest X-ray.\n###Human: Is there a nodule? ###Assistant: No.###Human: Any effusion?###Assistant:",
    ),
    "v0_mmtag": (
        f"{MMTAG}###Human: <Image><image></Image>###Assistant: Received.###Human: What modality is this?###Assistant:",
        f"{MMTAG}###Human: <Image><image></Image>###Assistant: Received.###Human: What modality is this?###Assistant:  A chest X-ray.\n###Human: Is there a nodule? ###Assistant:",
        f"{MMTAG}###Human: <Image><image></Image>###Assistant: Received.###Human: What modality is this?###Assistant:  A chest X-ray.\n###Human: Is there a nodule? ###Assistant: No.###Human: Any effusion?###Assistant:",
    ),
    "llava_v1": (
        f"{LLAVA} USER: <image>\nWhat modality is this? ASSISTANT:",
        f"{LLAVA} USER: <image>\nWhat modality is this? ASSISTANT: A chest X-ray.</s> USER: Is there a nodule? ASSISTANT:",
        f"{LLAVA} USER: <image>\nWhat modality is this? ASSISTANT: A chest X-ray.</s> USER: Is there a nodule? ASSISTANT: No.</s> USER: Any effusion? ASSISTANT:",
    ),
    "v1_mmtag": (
        f"{MMTAG} USER: <Image><image></Image> ASSISTANT: Received.</s> USER: What modality is this? ASSISTANT:",
        f"{MMTAG} USER: <Image><image></Image> ASSISTANT: Received.</s> USER: What modality is this? ASSISTANT: A chest X-ray.</s> USER: Is there a nodule? ASSISTANT:",
        f"{MMTAG} USER: <Image><image></Image> ASSISTANT: Received.</s> USER: What modality is this? ASSISTANT: A chest X-ray.</s> USER: Is there a nodule? ASSISTANT: No.</s> USER: Any effusion? ASSISTANT:",
    ),
    "llava_llama_2": (
        f"{LLAVA_LLAMA_2}<image>\nWhat modality is this? [/INST]",
        f"{LLAVA_LLAMA_2}<image>\nWhat modality is this? [/INST]  A chest X-ray.\n </s><s>[INST] Is there a nodule?  [/INST]",
        f"{LLAVA_LLAMA_2}<image>\nWhat modality is this? [/INST]  A chest X-ray.\n </s><s>[INST] Is there a nodule?  [/INST] No. </s><s>[INST] Any effusion? [/INST]",
    ),
    "mpt": (
        f"{MPT}<|im_end|><|im_start|>user\n<image>\nWhat modality is this?<|im_end|><|im_start|>assistant\n",
        f"{MPT}<|im_end|><|im_start|>user\n<image>\nWhat modality is this?<|im_end|><|im_start|>assistant\n A chest X-ray.\n<|im_end|><|im_start|>user\nIs there a nodule? <|im_end|><|im_start|>assistant\n",
        f"{MPT}<|im_end|><|im_start|>user\n<image>\nWhat modality is this?<|im_end|><|im_start|>assistant\n A chest X-ray.\n<|im_end|><|im_start|>user\nIs there a nodule? <|im_end|><|im_start|>assistant\nNo.<|im_end|><|im_start|>user\nAny effusion?<|im_end|><|im_start|>assistant\n",
    ),
    "llava/v1": (
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT:",
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT:  A chest X-ray.\n</s>USER: Is there a nodule?  ASSISTANT:",
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT:  A chest X-ray.\n</s>USER: Is there a nodule?  ASSISTANT: No.</s>USER: Any effusion? ASSISTANT:",
    ),
    "llava/vicuna_v1": (
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT:",
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT:  A chest X-ray.\n</s>USER: Is there a nodule?  ASSISTANT:",
        f"{VICUNA} USER: <image>\nWhat modality is this? ASSISTANT:  A chest X-ray.\n</s>USER: Is there a nodule?  ASSISTANT: No.</s>USER: Any effusion? ASSISTANT:",
    ),
    "llava/llava_v1": (
        f"{LLAVA} USER: <image>\nWhat modality is this? ASSISTANT:",
        f"{LLAVA} USER: <image>\nWhat modality is this? ASSISTANT:  A chest X-ray.\n</s>USER: Is there a nodule?  ASSISTANT:",
        f"{LLAVA} USER: <image>\nWhat modality is this? ASSISTANT:  A chest X-ray.\n</s>USER: Is there a nodule?  ASSISTANT: No.</s>USER: Any effusion? ASSISTANT:",
    ),
    "llava/v1_mmtag": (
        f"{MMTAG} USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What modality is this? ASSISTANT:",
        f"{MMTAG} USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What modality is this? ASSISTANT:  A chest X-ray.\n</s>USER: Is there a nodule?  ASSISTANT:",
        f"{MMTAG} USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What modality is this? ASSISTANT:  A chest X-ray.\n</s>USER: Is there a nodule?  ASSISTANT: No.</s>USER: Any effusion? ASSISTANT:",
    ),
    "chatml_direct": (
        f"{CHATML}<|im_end|><|im_start|>user\n<image>\nWhat modality is this?<|im_end|><|im_start|>assistant\n",
        f"{CHATML}<|im_end|><|im_start|>user\n<image>\nWhat modality is this?<|im_end|><|im_start|>assistant\n A chest X-ray.\n<|im_end|><|im_start|>user\nIs there a nodule? <|im_end|><|im_start|>assistant\n",
        f"{CHATML}<|im_end|><|im_start|>user\n<image>\nWhat modality is this?<|im_end|><|im_start|>assistant\n A chest X-ray.\n<|im_end|><|im_start|>user\nIs there a nodule? <|im_end|><|im_start|>assistant\nNo.<|im_end|><|im_start|>user\nAny effusion?<|im_end|><|im_start|>assistant\n",
    ),
    "mistral_direct": (
        f"{CHATML}<|im_end|><|im_start|>user\n<image>\nWhat modality is this?<|im_end|><|im_start|>assistant\n",
        f"{CHATML}<|im_end|><|im_start|>user\n<image>\nWhat modality is this?<|im_end|><|im_start|>assistant\n A chest X-ray.\n<|im_end|><|im_start|>user\nIs there a nodule? <|im_end|><|im_start|>assistant\n",
        f"{CHATML}<|im_end|><|im_start|>user\n<image>\nWhat modality is this?<|im_end|><|im_start|>assistant\n A chest X-ray.\n<|im_end|><|im_start|>user\nIs there a nodule? <|im_end|><|im_start|>assistant\nNo.<|im_end|><|im_start|>user\nAny effusion?<|im_end|><|im_start|>assistant\n",
    ),

}


def conversation(turns: int) -> list[dict]:
    msgs = []
    for k in range(turns):
        image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
        content = [*image, {"type": "text", "text": QUESTIONS[k]}] if k == 0 else QUESTIONS[k]
        msgs.append({"role": "user", "content": content})
        if k < turns - 1:
            msgs.append({"role": "assistant", "content": ANSWERS[k]})
    return msgs


def test_every_llava_med_name_is_here():
    llava_med = ["default", "v0", "v1", "vicuna_v1", "llama_2", "mistral_instruct", "plain", "v0_plain",
                 "llava_v0", "v0_mmtag", "llava_v1", "v1_mmtag", "llava_llama_2", "mpt"]
    assert set(llava_med) <= set(TEMPLATES) and set(EXPECTED) | {"llava_hf"} == set(TEMPLATES)


@pytest.mark.parametrize("turns", [1, 2, 3])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_prompts_are_byte_identical_to_llava_med(name, turns):
    want = EXPECTED[name][turns - 1]
    if want is None:
        with pytest.raises(ValueError, match="one user message"):
            render_prompt(conversation(turns), name)
        return
    assert render_prompt(conversation(turns), name) == want
    # build_prompt is the same renderer (questions and answers as given).
    history = list(zip(QUESTIONS[: turns - 1], ANSWERS, strict=False))
    assert build_prompt(name, QUESTIONS[turns - 1], history) == want


# Stop strings: LLaVA-Med's model_vqa stops on sep (sep2 for TWO), except where that is a bug.
STOPS = {
    "###": ["default", "v0", "llava_v0", "v0_mmtag"],
    "</s>": ["v1", "vicuna_v1", "llava_v1", "v1_mmtag", "llava/v1", "llava/vicuna_v1", "llava/llava_v1",
             "llava/v1_mmtag", "llava_hf",
             # LLaMA-2 style: LLaVA-Med stops on sep, "<s>" (never seen: decoding skips special tokens)
             # or "" for mistral_instruct (which ends every answer after one token); the turn ends at sep2.
             "llama_2", "llava_llama_2", "mistral_instruct"],
    "<|im_end|>": ["mpt", "chatml_direct", "mistral_direct"],
    "\n": ["plain", "v0_plain"],
}


@pytest.mark.parametrize("stop, names", list(STOPS.items()))
def test_stop_strings(stop, names):
    for name in names:
        assert get_template(name).stop == (stop,), name
    assert sum(len(n) for n in STOPS.values()) == len(TEMPLATES)


def test_llava_hf_chat_format():
    assert build_prompt("llava_hf", "Q?") == "USER: <image>\nQ? ASSISTANT:"
    assert build_prompt("llava_hf", "Q2?", [("Q1?", "A1.")]) == "USER: <image>\nQ1? ASSISTANT: A1. USER: Q2? ASSISTANT:"


def test_render_prompt_takes_openai_messages():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    parts = [{"role": "user", "content": [image, {"type": "text", "text": "What?"}]}]
    assert render_prompt(parts, "vicuna_v1") == f"{VICUNA} USER: <image>\nWhat? ASSISTANT:"
    # A system message replaces the template's; text parts join with newlines; a plain-string turn has no image.
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "Compare."}, image, {"type": "text", "text": "Any change?"}]}]
    assert render_prompt(msgs, "vicuna_v1") == "Be brief. USER: <image>\nCompare.\nAny change? ASSISTANT:"
    assert render_prompt([{"role": "user", "content": "Hello"}], "mistral_instruct") == "[INST] Hello [/INST]"
    # render_messages (the engine's messages path) is render_prompt plus the images.
    assert render_messages(msgs, get_template("vicuna_v1")) == (render_prompt(msgs, "vicuna_v1"), [image["image_url"]["url"]])
    for bad, match in [([], "last message"), ([{"role": "user", "content": " "}], "user message is empty"),
                       ([{"role": "assistant", "content": "hi"}], "alternate")]:
        with pytest.raises(ValueError, match=match):
            render_prompt(bad, "vicuna_v1")
    with pytest.raises(ValueError, match="question is empty"):
        build_prompt("vicuna_v1", "  ")


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown conversation template"):
        get_template("chatml")
    with pytest.raises(ValueError, match="unknown conversation template"):
        render_prompt([{"role": "user", "content": "Hi"}], "chatml")


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


@pytest.mark.parametrize("name", [n for n in TEMPLATES if "plain" not in n])
def test_finished_conversation_extends_the_prompt(name):
    """Training masks rely on each prompt being a prefix of the conversation with its answer."""
    t = get_template(name)
    turns = ["<image>\nQ1?", "A1.", "Q2?", "A2."]
    for i in (1, 3):
        prompt, finished = t.render(turns[:i]), t.render(turns[: i + 1])
        assert finished.startswith(prompt) and turns[i] in finished[len(prompt) :]
