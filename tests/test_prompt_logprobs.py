"""`SamplingParams.prompt_logprobs`: the engine scores every prompt token as the plain model does."""

from __future__ import annotations

import pytest
import torch

from medlava.chat.image_processing import preprocess
from medlava.chat.templates import build_prompt
from medlava.chat.tokenize import tokenize_prompt
from medlava.engine.llm import LLM
from medlava.engine.sampling import SamplingParams
from medlava.model.loader import load_model


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(model_dir("mistral-mlp2x-l1"))


def plain_logprobs(lm, ids: list[int], image) -> list[float]:
    """log_softmax of the plain model's logits, read at each prompt token (from the second on)."""
    pixels = preprocess(image, lm.image_processing)[None]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]), pixels=pixels)[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_prompt_logprobs_equal_log_softmax_of_the_plain_model(lm, xray_image):
    llm = LLM(lm, block_size=4)
    prompts = [build_prompt(lm.conv_mode, q) for q in ("What modality is this?", "Is there a nodule?")]
    scored = SamplingParams(max_tokens=2, prompt_logprobs=0)
    # The second copy of the first prompt would reuse the first's cached blocks; asking for prompt
    # logprobs must make it compute (and score) its whole prompt anyway.
    requests = [{"prompt": p, "images": [xray_image]} for p in (*prompts, prompts[0])]
    outs = llm.generate(requests, [scored, SamplingParams(max_tokens=2), scored], use_tqdm=False)
    assert outs[1].prompt_logprobs is None  # not asked for
    for out, prompt in ((outs[0], prompts[0]), (outs[2], prompts[0])):
        ids = tokenize_prompt(lm.tokenizer, prompt, lm.config.image_token_id, lm.config.image_tokens)
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        assert out.prompt_logprobs[1:] == pytest.approx(plain_logprobs(lm, ids, xray_image), abs=1e-4)
    # The repeat was not served from the prefix cache, and the answer is unchanged by scoring.
    assert outs[2].metrics.cached_prompt_tokens == 0
    assert outs[0].token_ids == outs[2].token_ids


def test_prompt_logprobs_of_given_token_ids_in_a_batch(lm, xray_image):
    """Token-id prompts (what occlusion sends: question + a fixed answer) are scored row by row."""
    llm = LLM(lm, block_size=16)
    base = tokenize_prompt(
        lm.tokenizer, build_prompt(lm.conv_mode, "Is there a mass?"), lm.config.image_token_id, lm.config.image_tokens
    )
    prompts = [base + [5, 6, 7], base + [9], base]
    outs = llm.generate(
        [{"prompt_token_ids": ids, "images": [xray_image]} for ids in prompts],
        SamplingParams(max_tokens=1, prompt_logprobs=1),
        use_tqdm=False,
    )
    for out, ids in zip(outs, prompts, strict=True):
        assert out.prompt_logprobs[1:] == pytest.approx(plain_logprobs(lm, ids, xray_image), abs=1e-4)


def test_prompt_logprobs_must_not_be_negative():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
