"""Training: answer-only labels, the two LLaVA stages, LoRA, and exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medlava.chat.templates import get_template
from medlava.errors import MedlavaError
from medlava.model.loader import load_model
from medlava.model.random_init import save_random_llava
from medlava.train import trainer as trainer_module
from medlava.train.dataset import IGNORE, conversation_turns, encode_conversation
from medlava.train.trainer import TrainSettings, train

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
RECORDS = [
    {"id": "a", "image": "chest_xray.dcm", "conversations": [
        {"from": "human", "value": "What modality is this?\n<image>"}, {"from": "gpt", "value": "x-ray"},
        {"from": "human", "value": "Is there a nodule?"}, {"from": "gpt", "value": "yes"}]},
    {"id": "b", "image": "head_ct.dcm", "conversations": [
        {"from": "human", "value": "<image>\nWhat modality is this?"}, {"from": "gpt", "value": "ct"}]},
    {"id": "c", "image": "chest_xray.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich part of the body is shown?"}, {"from": "gpt", "value": "chest"}]},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "images").mkdir()
    for name in ("chest_xray.dcm", "head_ct.dcm", "chest_xray.png"):
        shutil.copy(SAMPLES / name, root / "images" / name)
    (root / "data.json").write_text(json.dumps(RECORDS))
    save_random_llava(root / "init", text_model="mistral")
    return root


def settings(world: Path, out: str, **kw) -> TrainSettings:
    base = dict(data=world / "data.json", image_folder=world / "images", model=world / "init", out=world / out,
                batch_size=3, max_steps=12, lr=5e-3, progress=False, conv_mode="mistral_instruct")
    return TrainSettings(**{**base, **kw})


def test_labels_cover_only_the_answers(world):
    lm = load_model(world / "init")
    turns = conversation_turns(RECORDS[0]["conversations"])
    assert turns[0] == "<image>\nWhat modality is this?"
    ids, labels = encode_conversation(lm.tokenizer, get_template("mistral_instruct"), turns,
                                      lm.config.image_token_id, lm.config.image_tokens)
    assert len(ids) == len(labels)
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels, strict=True))
    text = lm.tokenizer.decode(trained)
    assert text.split() == ["x-ray", "</s>", "yes", "</s>"]
    assert lm.config.image_token_id not in trained


def test_conversations_must_alternate():
    with pytest.raises(MedlavaError, match="alternate"):
        conversation_turns([{"from": "gpt", "value": "hi"}])


def snapshot(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_model(folder).model.state_dict().items()}


def changed(a: dict, b: dict, prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


def test_two_stages_lower_the_loss_and_touch_only_their_parts(world):
    before = snapshot(world / "init")
    align = train(settings(world, "stage1", stage="align", lr=1e-2))
    assert align.steps == 12 and align.losses[-1] < 0.8 * align.losses[0]
    after_align = snapshot(world / "stage1")
    assert changed(before, after_align, "projector.")
    assert not changed(before, after_align, "decoder.") and not changed(before, after_align, "vision_tower.")

    instruct = train(settings(world, "stage2", model=world / "stage1", stage="instruct"))
    assert instruct.losses[-1] < 0.5 * instruct.losses[0]
    after = snapshot(world / "stage2")
    assert changed(after_align, after, "decoder.") and not changed(after_align, after, "vision_tower.")
    assert load_model(world / "stage2").conv_mode == "mistral_instruct"  # remembered for inference


def test_lora_trains_adapters_and_saves_a_plain_model(world):
    result = train(settings(world, "lora", stage="instruct", lora_rank=4, lr=1e-2))
    assert result.losses[-1] < 0.8 * result.losses[0]
    before, after = snapshot(world / "init"), snapshot(world / "lora")
    assert set(before) == set(after)  # adapters merged away
    assert changed(before, after, "decoder.layers.0.self_attn.q_proj")
    assert not changed(before, after, "decoder.embed_tokens")


def test_resume_continues_exactly(world, monkeypatch):
    """Also with intensity augmentation: its draws are seeded per step, so a resumed run draws the same."""
    full = train(settings(world, "full", max_steps=6, intensity_jitter=0.5))
    real_loss, calls = trainer_module.lm_loss, {"n": 0}

    def crash_on_fifth(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(trainer_module, "lm_loss", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        train(settings(world, "resumed", max_steps=6, save_every=3, intensity_jitter=0.5))
    assert (world / "resumed" / trainer_module.STATE_FILE).is_file()
    monkeypatch.setattr(trainer_module, "lm_loss", real_loss)
    resumed = train(settings(world, "resumed", max_steps=6, save_every=3, intensity_jitter=0.5))
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    assert not (world / "resumed" / trainer_module.STATE_FILE).exists()


def test_demo_pipeline_on_a_tiny_phantom_world(tmp_path):
    """synth → init (world tokenizer) → stage 0 vision → stage 1 align → stage 2 instruct; each loss falls."""
    from medlava.train.demo_init import init_demo_model
    from medlava.train.synthetic import generate_world
    from medlava.train.vision_pretrain import pretrain_vision

    world = tmp_path / "world"
    generate_world(world, 12, seed=5, size=64, workers=1)
    small = dict(hidden_size=64, layers=2, intermediate_size=128, vision_hidden=48, vision_layers=2,
                 vision_heads=3, vision_intermediate=96, image_size=32, patch_size=8)
    init = init_demo_model(world, tmp_path / "init", vocab_size=400, **small)
    lm = load_model(init)
    assert lm.conv_mode == "mistral_instruct" and lm.image_processing.aspect == "pad"
    assert lm.tokenizer.decode(lm.tokenizer("pleural effusion").input_ids[1:]) == "pleural effusion"

    metrics = pretrain_vision(init, world, tmp_path / "stage0", steps=30, batch_size=8, lr=3e-3,
                              intensity_jitter=0.5, progress=False)
    assert set(metrics) >= {"modality_acc", "body_part_acc", "kind_presence_acc", "side_acc"}
    images = world / "images"
    align = train(TrainSettings(data=world / "captions.json", image_folder=images, model=tmp_path / "stage0",
                                out=tmp_path / "stage1", stage="align", max_steps=10, batch_size=6, lr=1e-2,
                                progress=False))
    assert align.losses[-1] < align.losses[0]
    instruct = train(TrainSettings(data=world / "instruct.json", image_folder=images, model=tmp_path / "stage1",
                                   out=tmp_path / "stage2", stage="instruct", max_steps=10, batch_size=6, lr=5e-3,
                                   intensity_jitter=0.5, progress=False))
    assert instruct.losses[-1] < 0.85 * instruct.losses[0]


def test_intensity_augmentation_scales_the_displayed_image():
    from PIL import Image

    from medlava.chat.image_processing import ImageProcessing, preprocess
    from medlava.train.augment import random_intensity, scale_intensity

    proc = ImageProcessing(shortest_edge=16, crop=(16, 16))
    shown = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # 0..240, already the model's size
    x = preprocess(Image.fromarray(shown).convert("RGB"), proc)[None]
    brighter = preprocess(Image.fromarray(np.minimum(shown * 1.5, 255).astype(np.uint8)).convert("RGB"), proc)
    assert torch.allclose(scale_intensity(x, torch.tensor([1.5]), proc)[0], brighter, atol=0.03)  # clipped at white
    assert torch.allclose(scale_intensity(x, torch.tensor([1.0]), proc), x, atol=1e-6)

    batch = x.repeat(64, 1, 1, 1)
    a, b = random_intensity(batch, 0.5, proc, seed=7), random_intensity(batch, 0.5, proc, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, random_intensity(batch, 0.5, proc, seed=8))
    mean, std = torch.tensor(proc.mean).view(1, 3, 1, 1), torch.tensor(proc.std).view(1, 3, 1, 1)
    factors = ((a * std + mean)[:, 0, 0, 1] / (x * std + mean)[0, 0, 0, 1]).numpy()  # the pixel shown at 16
    assert factors.min() >= 1 / 1.5 - 1e-4 and factors.max() <= 1.5 + 1e-4
    assert factors.min() < 0.8 and factors.max() > 1.25  # spread over the range, not one factor
    assert random_intensity(batch, 0.0, proc, seed=7) is batch


def test_shuffled_turns_keep_pairs_and_the_image_first():
    import random

    from medlava.train.dataset import shuffle_pairs

    conv = RECORDS[0]["conversations"]
    orders = set()
    for seed in range(20):
        shuffled = shuffle_pairs(conv, random.Random(seed))
        turns = conversation_turns(shuffled)
        assert turns[0].startswith("<image>\n") and sum("<image>" in t for t in turns) == 1
        pairs = {(shuffled[i]["value"].replace("\n<image>", ""), shuffled[i + 1]["value"]) for i in (0, 2)}
        assert pairs == {("What modality is this?", "x-ray"), ("Is there a nodule?", "yes")}
        orders.add(turns[0])
    assert orders == {"<image>\nWhat modality is this?", "<image>\nIs there a nodule?"}
