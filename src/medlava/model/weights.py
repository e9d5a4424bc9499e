"""Checkpoint files: key names of every supported layout mapped onto medlava's modules, read lazily."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from medlava.errors import ModelLoadError

# (pattern, replacement) in order; the first match wins. Names are medlava's module paths.
_PROJECTOR = r"(?:model\.)?(?:multi_modal_projector|mm_projector)\."
KEY_RULES: list[tuple[re.Pattern, str | Callable[[re.Match], str]]] = [
    # Hugging Face Llava (transformers 4.x, 5.x save layouts)
    (re.compile(r"^(?:model\.)?language_model\.lm_head\.(.*)$"), r"lm_head.\1"),
    (re.compile(r"^(?:model\.)?language_model\.(?:model\.)?(.*)$"), r"decoder.\1"),
    (re.compile(r"^(?:model\.)?vision_tower\.(?:vision_tower\.)?(?:vision_model\.)?(.*)$"), r"vision_tower.\1"),
    (re.compile(r"^" + _PROJECTOR + r"linear_(\d+)\.(.*)$"), lambda m: f"projector.layers.{int(m[1]) - 1}.{m[2]}"),
    # original LLaVA: mm_projector is nn.Sequential(Linear, GELU, Linear, …) or a bare Linear
    (re.compile(r"^" + _PROJECTOR + r"(\d+)\.(.*)$"), lambda m: f"projector.layers.{int(m[1]) // 2}.{m[2]}"),
    (re.compile(r"^" + _PROJECTOR + r"(weight|bias)$"), r"projector.layers.0.\1"),
    (re.compile(r"^model\.(embed_tokens|layers|norm)(.*)$"), r"decoder.\1\2"),
    (re.compile(r"^lm_head\.(.*)$"), r"lm_head.\1"),
    # a CLIP folder (CLIPVisionModel or CLIPModel) given as the vision tower
    (re.compile(r"^vision_model\.(.*)$"), r"vision_tower.\1"),
    (re.compile(r"^((?:embeddings|encoder|pre_layrnorm|post_layernorm)\..*)$"), r"vision_tower.\1"),
]
# Present in some checkpoints, never needed: buffers transformers recomputes, CLIP's text half.
IGNORED = re.compile(
    r"(rotary_emb\.inv_freq|position_ids$|^text_model\.|^text_projection|^visual_projection|^logit_scale)"
)


def canonical_name(key: str) -> str | None:
    for pattern, repl in KEY_RULES:
        m = pattern.match(key)
        if m:
            return repl(m) if callable(repl) else m.expand(repl)
    return None


def checkpoint_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors or pytorch_model*.bin weight files")
    return files


def iter_tensors(folder: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, loader) pairs; each tensor is read only when its loader is called."""
    for path in checkpoint_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    yield key, (lambda f=f, key=key: f.get_tensor(key))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for key, tensor in state.items():
                yield key, (lambda t=tensor: t)


def load_weights(
    model: nn.Module, folder: Path, accept: Callable[[str], bool] = lambda name: True, sinks: dict | None = None
) -> set[str]:
    """Copy the checkpoint in `folder` into `model`; returns the medlava names it filled.

    `accept(name)` chooses which mapped tensors to take (e.g. skip a vision tower that a
    separate CLIP folder supplies). `sinks` maps names to layers that take their tensor
    themselves (`QuantizedLinear.load_weight`), one tensor at a time. Unknown keys and shape
    mismatches raise ModelLoadError.
    """
    sinks = sinks or {}
    params = dict(model.state_dict(keep_vars=True))
    loaded: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for key, read in iter_tensors(folder):
            name = canonical_name(key)
            if name in sinks and accept(name):
                try:
                    sinks[name].load_weight(read())
                except ValueError as e:
                    raise ModelLoadError(f"{folder.name}: {key}: {e}") from None
                loaded.add(name)
                continue
            if name is None or name not in params:
                if not IGNORED.search(key):
                    unexpected.append(key)
                continue
            if not accept(name):
                continue
            target, tensor = params[name], read()
            if tuple(target.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"{folder.name}: {key} has shape {tuple(tensor.shape)}, model expects {tuple(target.shape)}"
                )
            target.copy_(tensor.to(target.dtype))
            loaded.add(name)
    if unexpected:
        raise ModelLoadError(f"{folder.name}: unexpected weights {_some(unexpected)}")
    return loaded


def check_complete(model: nn.Module, loaded: set[str], where: str, expected: set[str] = frozenset()) -> None:
    """Raise naming the parameters (and `expected` names) no checkpoint filled (tied heads share the embedding)."""
    tied = {"lm_head.weight"} if model.lm_head.weight is model.decoder.embed_tokens.weight else set()
    missing = sorted((set(model.state_dict()) | expected) - loaded - tied)
    if missing:
        raise ModelLoadError(f"{where}: missing weights {_some(missing)}")


def _some(names: list[str], limit: int = 8) -> str:
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
