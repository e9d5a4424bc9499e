"""Model configuration as plain dataclasses, read from Hugging Face or original LLaVA config dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from medlava.errors import ModelLoadError


@dataclass
class VisionConfig:
    """A CLIP ViT vision tower."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """A Llama/Mistral decoder."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    attention_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    model_type: str = "mistral"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2


@dataclass
class LlavaConfig:
    """The whole LLaVA network: vision tower, projector and decoder."""

    vision: VisionConfig
    text: TextConfig
    projector_type: str = "mlp2x_gelu"  # "linear" or "mlpNx_gelu"
    projector_bias: bool = True
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    image_token_id: int = 32000
    image_aspect_ratio: str = "pad"  # LLaVA's "pad" (to square, mean colour) or "crop" (CLIP centre crop)
    dtype: str = "float32"

    @property
    def image_tokens(self) -> int:
        """Placeholder tokens one image expands to."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    def to_dict(self) -> dict:
        return asdict(self)


def _pick(cfg: object, *names: str, default=None):
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def _rope_theta(cfg: object) -> float:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ModelLoadError(f"unsupported RoPE scaling type {rope_type!r} (medlava supports plain RoPE)")
    return float(params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0)


def text_config_from_hf(cfg: object) -> TextConfig:
    """Convert a transformers Llama/Mistral config object into a TextConfig."""
    model_type = getattr(cfg, "model_type", "llama")
    if model_type not in ("llama", "mistral", "llava_mistral", "llava_llama", "llava"):
        raise ModelLoadError(f"unsupported decoder type {model_type!r}: medlava runs Llama and Mistral decoders")
    heads = cfg.num_attention_heads
    return TextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=_pick(cfg, "num_key_value_heads", default=heads),
        head_dim=_pick(cfg, "head_dim", default=cfg.hidden_size // heads),
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=cfg.max_position_embeddings,
        sliding_window=getattr(cfg, "sliding_window", None),
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        hidden_act=getattr(cfg, "hidden_act", "silu"),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        model_type="mistral" if "mistral" in model_type else "llama",
        bos_token_id=getattr(cfg, "bos_token_id", None),
        eos_token_id=getattr(cfg, "eos_token_id", None),
    )


def vision_config_from_hf(cfg: object) -> VisionConfig:
    """Convert a transformers CLIPVisionConfig object into a VisionConfig."""
    return VisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=getattr(cfg, "num_channels", 3),
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act=cfg.hidden_act,
    )
