"""Loading original LLaVA-Med folders, `medlava convert`, and clear errors for broken folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration

from medlava.chat.bpe import train_bpe_tokenizer
from medlava.errors import ModelLoadError
from medlava.model.convert import convert
from medlava.model.loader import ORIGINAL_IMAGE_TOKEN_ID, load_model
from medlava.model.random_init import TOKENIZER_TEXT

HUB_ID = "openai/clip-vit-large-patch14-336"


def original_key(key: str) -> str:
    """The name LLaVA-Med's LlavaMistralForCausalLM gives a transformers Llava key."""
    key = key.replace("language_model.model.", "model.").replace("language_model.lm_head", "lm_head")
    key = key.replace("multi_modal_projector.linear_1", "model.mm_projector.0")
    key = key.replace("multi_modal_projector.linear_2", "model.mm_projector.2")
    if key.startswith("vision_tower.vision_model."):
        key = "model.vision_tower.vision_tower." + key.removeprefix("vision_tower.")
    return key


@pytest.fixture(scope="module")
def original_folder(model_dir, tmp_path_factory):
    """(LLaVA-Med-style folder, local CLIP folder, the HF folder it came from)."""
    hf_dir = model_dir("mistral-mlp2x-l2")
    root = tmp_path_factory.mktemp("llava-med")
    src, clip = root / "llava-med", root / "clip"
    src.mkdir()
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    state = load_file(hf_dir / "model.safetensors")

    # The vision tower LLaVA really uses comes from a separate CLIP folder ...
    vision = CLIPVisionModel(CLIPVisionConfig(**hf_cfg["vision_config"]))
    vision.load_state_dict(
        {k.removeprefix("vision_tower.vision_model."): v for k, v in state.items() if k.startswith("vision_tower.")}
    )
    vision.save_pretrained(clip)
    shutil.copy(hf_dir / "preprocessor_config.json", clip)
    # ... while the checkpoint carries a stale copy that must be ignored: zero it so using it shows.
    renamed = {
        original_key(k): (torch.zeros_like(v) if k.startswith("vision_tower.") else v) for k, v in state.items()
    }
    save_file(renamed, src / "model.safetensors")
    text = hf_cfg["text_config"]
    config = {
        **text,
        "model_type": "llava_mistral",
        "architectures": ["LlavaMistralForCausalLM"],
        "mm_vision_tower": HUB_ID,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": hf_cfg["vision_config"]["hidden_size"],
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "torch_dtype": "float32",
    }
    (src / "config.json").write_text(json.dumps(config))
    train_bpe_tokenizer(TOKENIZER_TEXT, text["vocab_size"], image_token=False).save_pretrained(src)
    return src, clip, hf_dir


def logits_with_image(lm, pixels: torch.Tensor) -> torch.Tensor:
    ids = lm.tokenizer("What modality is this?").input_ids
    ids = ids[:1] + [lm.config.image_token_id] * lm.config.image_tokens + ids[1:]
    with torch.no_grad():
        return lm.model(torch.tensor([ids]), pixels=pixels)


def test_original_folder_needs_a_local_vision_tower(original_folder):
    src, _, _ = original_folder
    with pytest.raises(ModelLoadError, match="--vision-tower") as err:
        load_model(src)
    assert HUB_ID in str(err.value)


def test_original_folder_loads_and_converts_with_identical_logits(original_folder, tmp_path):
    src, clip, hf_dir = original_folder
    original = load_model(src, vision_tower=clip)
    assert original.layout == "original" and original.conv_mode == "mistral_instruct"
    assert original.config.image_token_id == ORIGINAL_IMAGE_TOKEN_ID
    assert original.image_processing.aspect == "pad"
    reference = load_model(hf_dir)
    pixels = torch.randn(1, 3, 28, 28)
    want = logits_with_image(original, pixels)
    # Same weights as the HF model it was made from: the stale vision copy was not used.
    assert torch.allclose(want, logits_with_image(reference, pixels), atol=1e-5)

    out = convert(src, tmp_path / "converted", vision_tower=clip)
    converted = load_model(out)
    assert converted.layout == "hf" and converted.conv_mode == "mistral_instruct"
    assert converted.image_processing.aspect == "pad"
    got = logits_with_image(converted, pixels)
    vocab = want.shape[-1]
    assert torch.equal(got[..., :vocab], want)
    assert (got[..., vocab:] < want.max(-1, keepdim=True).values).all()  # <image> is never the greedy pick

    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = converted.tokenizer("What modality is this?").input_ids
    ids = ids[:1] + [converted.config.image_token_id] * converted.config.image_tokens + ids[1:]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    assert (theirs - got).abs().max() < 1e-4


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no-config", "no config.json"),
        ("bad-json", "not valid JSON"),
        ("unknown-layout", "unknown model layout"),
        ("missing-key", "missing weights"),
        ("extra-key", "unexpected weights"),
        ("bad-shape", "has shape"),
        ("no-weights", "no \\*.safetensors"),
    ],
)
def test_broken_folders_name_the_problem(model_dir, tmp_path, breakage, message):
    folder = tmp_path / "m"
    shutil.copytree(model_dir("llama-mlp2x-l2"), folder)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    if breakage == "no-config":
        (folder / "config.json").unlink()
    elif breakage == "bad-json":
        (folder / "config.json").write_text("{not json")
    elif breakage == "unknown-layout":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif breakage == "missing-key":
        state.pop("language_model.model.norm.weight")
    elif breakage == "extra-key":
        state["something.else"] = torch.zeros(1)
    elif breakage == "bad-shape":
        state["language_model.model.norm.weight"] = torch.zeros(3)
    elif breakage == "no-weights":
        weights.unlink()
    if weights.exists():
        save_file(state, weights)
    with pytest.raises(ModelLoadError, match=message):
        load_model(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")


def test_dtype_is_honoured(model_dir):
    lm = load_model(model_dir("llama-mlp2x-l2"), dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        load_model(model_dir("llama-mlp2x-l2"), dtype="int8")


def test_sentencepiece_tokenizer_like_llava_med(tmp_path):
    """LLaVA-Med ships a Llama sentencepiece `tokenizer.model`; AutoTokenizer must read it."""
    import sentencepiece as spm

    from medlava.chat.tokenize import tokenize_prompt
    from medlava.model.loader import load_tokenizer
    from medlava.model.random_init import TOKENIZER_TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TOKENIZER_TEXT * 10))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=150, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    ids = tokenize_prompt(tok, "[INST] <image>\nIs the heart enlarged? [/INST]", ORIGINAL_IMAGE_TOKEN_ID, 4)
    assert ids[0] == 1 and ids.count(ORIGINAL_IMAGE_TOKEN_ID) == 4
    text_ids = [i for i in ids if i != ORIGINAL_IMAGE_TOKEN_ID]
    assert "heart enlarged" in tok.decode(text_ids, skip_special_tokens=True)


def test_unreadable_tokenizer_is_a_clear_error(tmp_path):
    from medlava.model.loader import load_tokenizer

    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(model_dir):
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_model(model_dir("mistral-mlp2x-l1"), device="cuda")


def variant(original_folder, tmp_path, **changes):
    """A copy of the LLaVA-Med folder with config keys changed (None: the key removed)."""
    src, clip, _ = original_folder
    folder = tmp_path / "variant"
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder, clip


def test_no_image_aspect_ratio_means_no_padding(original_folder, tmp_path, xray_image):
    """LLaVA-Med's process_images pads only when image_aspect_ratio is "pad": no key, CLIP as is."""
    import numpy as np
    from transformers import CLIPImageProcessor

    from medlava.chat.image_processing import preprocess

    folder, clip = variant(original_folder, tmp_path, image_aspect_ratio=None)
    lm = load_model(folder, vision_tower=clip)
    assert lm.image_processing.aspect == "crop"
    theirs = CLIPImageProcessor.from_pretrained(clip)(images=xray_image, return_tensors="np")["pixel_values"][0]
    assert (preprocess(xray_image, lm.image_processing) - torch.as_tensor(np.asarray(theirs))).abs().max() < 1e-5
    padded = load_model(original_folder[0], vision_tower=clip)  # the fixture says "pad"
    assert (preprocess(xray_image, padded.image_processing) - preprocess(xray_image, lm.image_processing)).abs().max() > 0.1


def test_image_start_end_tokens_are_refused_and_v15_values_load(original_folder, tmp_path):
    folder, clip = variant(original_folder, tmp_path, mm_use_im_start_end=True)
    with pytest.raises(ModelLoadError, match="mm_use_im_start_end") as err:
        load_model(folder, vision_tower=clip)
    assert len(str(err.value).splitlines()) == 1
    # LLaVA-Med v1.5's values; and the patch token, which no prompt uses, either way.
    for patch in (False, True):
        folder, clip = variant(original_folder, tmp_path / str(patch), mm_use_im_start_end=False,
                               mm_use_im_patch_token=patch)
        lm = load_model(folder, vision_tower=clip)
        assert lm.config.image_tokens == lm.config.vision.num_patches


def test_tokenizer_model_max_length_bounds_the_context(original_folder, tmp_path):
    from medlava.engine.llm_engine import LLMEngine
    from medlava.engine.sampling import SamplingParams

    folder, clip = variant(original_folder, tmp_path, tokenizer_model_max_length=64)
    lm = load_model(folder, vision_tower=clip)
    assert lm.config.text.max_position_embeddings == 64
    engine = LLMEngine(lm)
    assert engine.make_sequence("a", [5] * 60, params=SamplingParams(max_tokens=100)).budget == 4
    with pytest.raises(ValueError, match="64-token context"):
        engine.make_sequence("b", [5] * 64)
    folder, clip = variant(original_folder, tmp_path / "bad", tokenizer_model_max_length="long")
    with pytest.raises(ModelLoadError, match="tokenizer_model_max_length"):
        load_model(folder, vision_tower=clip)


def test_vision_select_feature(original_folder, tmp_path):
    """clip_encoder.feature_select: "patch" drops CLS, "cls_patch" keeps it, anything else is an error."""
    folder, clip = variant(original_folder, tmp_path, mm_vision_select_feature="cls_patch")
    lm = load_model(folder, vision_tower=clip)
    assert lm.config.vision_feature_select_strategy == "full"
    assert lm.config.image_tokens == lm.config.vision.num_patches + 1
    folder, clip = variant(original_folder, tmp_path / "bad", mm_vision_select_feature="cls")
    with pytest.raises(ModelLoadError, match="'cls'.*'patch', 'cls_patch'"):
        load_model(folder, vision_tower=clip)


LLAVA_HF_PREFIXES = ("language_model.model.", "language_model.lm_head.", "multi_modal_projector.",
                     "vision_tower.vision_model.")


def test_folders_medlava_writes_have_the_llava_hf_key_layout(model_dir, tmp_path):
    """Published llava-hf checkpoints' layout: what transformers, vLLM and medlava all load."""
    from medlava.model.convert import convert

    random_folder = model_dir("mistral-mlp2x-l2")  # save_random_llava
    converted = convert(random_folder, tmp_path / "converted")  # save_hf, as `medlava convert` and `train` write
    for folder in (random_folder, converted):
        keys = list(load_file(folder / "model.safetensors"))
        assert keys and all(k.startswith(LLAVA_HF_PREFIXES) for k in keys), folder
        _, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
