"""medlava's network against transformers.LlavaForConditionalGeneration on the same random weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from medlava.engine.reference import generate_reference
from medlava.engine.sampling import SamplingParams
from medlava.model.loader import load_model

from .conftest import VARIANTS


def load_reference(folder, projector: str) -> LlavaForConditionalGeneration:
    hf = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    hf.generation_config.eos_token_id = None  # let both sides run the full 20 tokens
    if projector == "linear":
        # transformers only builds the 2-layer projector; run its first layer alone, as LLaVA's `linear`.
        hf.model.multi_modal_projector.forward = hf.model.multi_modal_projector.linear_1.forward
    return hf


def prompt_ids(lm, text: str) -> list[int]:
    n = lm.config.image_tokens
    return lm.tokenizer(f"USER: {'<image>' * n}\n{text} ASSISTANT:").input_ids


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_tokens_match_transformers(model_dir, variant):
    folder = model_dir(variant)
    lm = load_model(folder)
    hf = load_reference(folder, VARIANTS[variant]["projector"])
    cfg = lm.config
    assert cfg.text.num_key_value_heads < cfg.text.num_attention_heads  # grouped-query attention
    assert cfg.projector_type == VARIANTS[variant]["projector"]
    assert cfg.vision_feature_layer == VARIANTS[variant]["vision_feature_layer"]

    torch.manual_seed(1)
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids = prompt_ids(lm, "Is there a nodule in the right lung?")
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids]), pixels=pixels)
        theirs = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.std() > 0.1  # not a degenerate model

    gen = generate_reference(lm.model, lm.tokenizer, ids, SamplingParams(max_tokens=20, ignore_eos=True), pixels)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=20, do_sample=False
        )
    assert gen.token_ids == out[0, len(ids) :].tolist()
    assert len(gen.token_ids) == 20


def test_images_change_the_logits(model_dir):
    lm = load_model(model_dir("llama-mlp2x-l2"))
    ids = torch.tensor([prompt_ids(lm, "What modality is this?")])
    size = lm.config.vision.image_size
    with torch.no_grad():
        a = lm.model(ids, pixels=torch.zeros(1, 3, size, size))
        b = lm.model(ids, pixels=torch.ones(1, 3, size, size))
    assert (a - b).abs().max() > 1e-3


def test_placeholder_count_must_match_features(model_dir):
    lm = load_model(model_dir("llama-mlp2x-l2"))
    ids = torch.tensor([prompt_ids(lm, "x")[:-2]])
    with pytest.raises(ValueError, match="image-token positions"):
        lm.model(ids[:, :3], pixels=torch.zeros(1, 3, 28, 28))
