"""Open a model folder: Hugging Face Llava layout or an original LLaVA-Med (LlavaMistralForCausalLM) folder."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from medlava.chat.image_processing import ImageProcessing
from medlava.errors import ModelLoadError
from medlava.host_memory import hand_back_freed_memory
from medlava.model.config import LlavaConfig, text_config_from_hf, vision_config_from_hf
from medlava.model.llava import LlavaModel
from medlava.model.quant import check_quantization, quantized_layers
from medlava.model.weights import check_complete, load_weights

ORIGINAL_IMAGE_TOKEN_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX: never a vocabulary id
# LLaVA-Med's mm_vision_select_feature (clip_encoder.feature_select) -> vision_feature_select_strategy.
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}


@dataclass
class LoadedModel:
    """Everything needed to turn an image and a question into model inputs and back."""

    model: LlavaModel
    tokenizer: object
    image_processing: ImageProcessing
    conv_mode: str
    name: str
    path: Path
    layout: str  # "hf" or "original"
    quantization: str | None = None  # "int8" or "int4": the decoder layers' weights (model/quant.py)

    @property
    def config(self) -> LlavaConfig:
        return self.model.config


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path.parent} is not a model folder: it has no {path.name}") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def detect_layout(raw: dict) -> str:
    if raw.get("model_type") == "llava" and "text_config" in raw:
        return "hf"
    if "mm_vision_tower" in raw or "mm_projector_type" in raw:
        return "original"
    raise ModelLoadError(
        f"unknown model layout (model_type={raw.get('model_type')!r}): expected a Hugging Face Llava "
        "folder (model_type 'llava') or an original LLaVA-Med folder (config with mm_vision_tower)"
    )


def dtype_of(raw: dict, override: str | torch.dtype | None) -> torch.dtype:
    name = override or raw.get("dtype") or raw.get("torch_dtype") or raw.get("text_config", {}).get("torch_dtype")
    if isinstance(name, torch.dtype):
        return name
    name = str(name or "float32").removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"unsupported dtype {name!r}; use float32, bfloat16 or float16")
    return dtype


def hf_config(folder: Path, raw: dict) -> LlavaConfig:
    from transformers import LlavaConfig as HFLlavaConfig

    hf = HFLlavaConfig.from_pretrained(folder)
    if not isinstance(hf.vision_feature_layer, int):
        raise ModelLoadError("multi-layer vision features (a list vision_feature_layer) are not supported")
    if hf.vision_config.model_type not in ("clip_vision_model", "clip"):
        raise ModelLoadError(f"unsupported vision tower {hf.vision_config.model_type!r}: medlava runs CLIP ViTs")
    return LlavaConfig(
        vision=vision_config_from_hf(hf.vision_config),
        text=text_config_from_hf(hf.text_config),
        projector_type=raw.get("projector_type", "mlp2x_gelu"),
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        vision_feature_layer=hf.vision_feature_layer,
        vision_feature_select_strategy=hf.vision_feature_select_strategy,
        image_token_id=hf.image_token_index,
        image_aspect_ratio=aspect_ratio(raw),
    )


def resolve_vision_tower(raw: dict, vision_tower: str | Path | None) -> Path:
    """The local CLIP folder the original checkpoint's vision tower comes from."""
    if vision_tower is not None:
        path = Path(vision_tower)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"--vision-tower {path} is not a CLIP model folder (no config.json)")
        return path
    named = raw.get("mm_vision_tower", "")
    if named and (Path(named) / "config.json").is_file():
        return Path(named)
    raise ModelLoadError(
        f"this LLaVA-Med folder takes its vision tower from {named!r}, which is not a local folder "
        "(medlava never downloads); pass --vision-tower DIR with a local copy of that CLIP model"
    )


def original_config(raw: dict, clip_folder: Path) -> LlavaConfig:
    from transformers import AutoConfig, CLIPVisionConfig

    model_type = "mistral" if "mistral" in raw.get("model_type", "") else "llama"
    text_raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    select = raw.get("mm_vision_select_feature", "patch")
    if select not in SELECT_FEATURES:
        raise ModelLoadError(
            f"unknown mm_vision_select_feature {select!r}: LLaVA-Med knows {', '.join(map(repr, SELECT_FEATURES))}"
        )
    return LlavaConfig(
        vision=vision_config_from_hf(CLIPVisionConfig.from_pretrained(clip_folder)),
        text=text_config_from_hf(AutoConfig.for_model(model_type, **text_raw)),
        projector_type=raw.get("mm_projector_type", "linear"),
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=SELECT_FEATURES[select],
        image_token_id=ORIGINAL_IMAGE_TOKEN_ID,
        image_aspect_ratio=aspect_ratio(raw),
    )


def aspect_ratio(raw: dict) -> str:
    # LLaVA-Med's process_images pads only when image_aspect_ratio is "pad"; anything else,
    # a missing key included, is the CLIP processor as is (resize and centre-crop).
    return "pad" if raw.get("image_aspect_ratio") == "pad" else "crop"


def check_image_tokens(raw: dict) -> None:
    """LLaVA's image start/end and patch tokens: what medlava runs, or one clear line why not."""
    if raw.get("mm_use_im_start_end"):
        # model_vqa would prompt with <im_start><image><im_end> and the builder add both tokens.
        raise ModelLoadError(
            "mm_use_im_start_end=true is not supported: medlava prompts with <image> alone "
            "(LLaVA-Med v1.5 checkpoints set mm_use_im_start_end=false)"
        )
    # mm_use_im_patch_token only makes LLaVA-Med's builder add an <im_patch> vocabulary entry that
    # no prompt or image path uses (features replace IMAGE_TOKEN_INDEX alone): nothing to do.


def bound_context(cfg: LlavaConfig, raw: dict) -> None:
    # LLaVA-Med cuts every input at tokenizer_model_max_length (prepare_inputs_labels_for_multimodal):
    # the model never saw longer ones, so it bounds the context.
    limit = raw.get("tokenizer_model_max_length")
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ModelLoadError(f"tokenizer_model_max_length must be a positive integer, got {limit!r}")
        cfg.text.max_position_embeddings = min(cfg.text.max_position_embeddings, limit)


def default_conv_mode(raw: dict, layout: str, cfg: LlavaConfig) -> str:
    if raw.get("conv_mode"):
        return raw["conv_mode"]
    if layout == "hf":
        return "llava_hf"
    return "mistral_instruct" if cfg.text.model_type == "mistral" else "vicuna_v1"


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many types; the user needs one clear line
        raise ModelLoadError(f"cannot load the tokenizer from {folder}: {str(e).splitlines()[0]}") from None


def build_empty(
    cfg: LlavaConfig, dtype: torch.dtype, device: str | torch.device, quantization: str | None = None
) -> tuple[LlavaModel, dict]:
    """Allocate the network without initialising it (the checkpoint fills every tensor); with a
    quantization, the decoder layers' projections are empty QuantizedLinear layers, returned by
    the checkpoint name of their weight (each quantizes its weight as the loader reads it)."""
    with torch.device("meta"):
        model = LlavaModel(cfg)
        sinks = quantized_layers(model, quantization, dtype) if quantization else {}
    model = model.to(dtype).to_empty(device=device)
    if cfg.text.tie_word_embeddings:  # to_empty breaks parameter sharing
        model.lm_head.weight = model.decoder.embed_tokens.weight
    return model, sinks


def check_device(device: str | torch.device) -> torch.device:
    """The device to load onto, or a ModelLoadError saying why it cannot be used."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} is not available: this machine or torch build has no CUDA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} is not available: {torch.cuda.device_count()} GPU(s) found")
    elif dev.type != "cpu":
        raise ModelLoadError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return dev


def load_model(
    path: str | Path,
    *,
    vision_tower: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quantization: str | None = None,
) -> LoadedModel:
    """Load a model folder; raises ModelLoadError with one clear line when it cannot.

    quantization: "int8" or "int4" stores the decoder layers' weights so (model/quant.py), each
    quantized as it is read, so that peak memory stays near the quantized model's size."""
    device = check_device(device)
    try:
        check_quantization(quantization)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if quantization and device.type != "cpu":
        raise ModelLoadError(f"--quantization {quantization} runs on the CPU only; drop it for {device.type}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {folder}")
    raw = read_json(folder / "config.json")
    layout = detect_layout(raw)
    check_image_tokens(raw)
    torch_dtype = dtype_of(raw, dtype)
    if layout == "hf":
        cfg = hf_config(folder, raw)
        proc_file = folder / "preprocessor_config.json"
    else:
        clip_folder = resolve_vision_tower(raw, vision_tower)
        cfg = original_config(raw, clip_folder)
        proc_file = clip_folder / "preprocessor_config.json"
    cfg.dtype = str(torch_dtype).removeprefix("torch.")
    bound_context(cfg, raw)

    model, sinks = build_empty(cfg, torch_dtype, device, quantization)
    with hand_back_freed_memory() if quantization else nullcontext():  # quantizing: peak near the quantized size
        if layout == "hf":
            loaded = load_weights(model, folder, sinks=sinks)
        else:
            # The published checkpoint carries a vision tower it never uses: LLaVA reloads CLIP.
            loaded = load_weights(model, folder, accept=lambda n: not n.startswith("vision_tower."), sinks=sinks)
            loaded |= load_weights(model, clip_folder, accept=lambda n: n.startswith("vision_tower."))
    check_complete(model, loaded, folder.name, expected=set(sinks))
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(folder),
        image_processing=ImageProcessing.from_file(proc_file, cfg.image_aspect_ratio, cfg.vision.image_size),
        conv_mode=default_conv_mode(raw, layout, cfg),
        name=folder.name,
        path=folder,
        layout=layout,
        quantization=quantization,
    )
