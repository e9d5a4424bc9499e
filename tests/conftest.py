"""Shared fixtures: tiny random models built with transformers into temp folders."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from medlava import kernels
from medlava.model.random_init import save_random_llava

VARIANTS = {
    "llama-mlp2x-l2": dict(text_model="llama", projector="mlp2x_gelu", vision_feature_layer=-2),
    "mistral-mlp2x-l1": dict(text_model="mistral", projector="mlp2x_gelu", vision_feature_layer=-1),
    "llama-linear-l1-tied": dict(
        text_model="llama", projector="linear", vision_feature_layer=-1, tie_word_embeddings=True
    ),
    "mistral-linear-l2": dict(text_model="mistral", projector="linear", vision_feature_layer=-2),
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Builds (once per session) and returns the folder of a named tiny random model variant."""
    cache = {}

    def build(name: str = "mistral-mlp2x-l2"):
        if name not in cache:
            spec = VARIANTS.get(name, dict(text_model="mistral", projector="mlp2x_gelu", vision_feature_layer=-2))
            cache[name] = save_random_llava(tmp_path_factory.mktemp(name), seed=len(cache), **spec)
        return cache[name]

    return build


@pytest.fixture
def xray_image() -> Image.Image:
    """A non-square synthetic grey image with structure (so preprocessing differences show)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:90, 0:120]
    arr = (128 + 60 * np.sin(x / 7.0) * np.cos(y / 5.0) + rng.normal(0, 10, (90, 120))).clip(0, 255)
    return Image.fromarray(arr.astype(np.uint8), mode="L")


@pytest.fixture(scope="session")
def cpu_kernels():
    """medlava's CPU kernels (built on first use); a skip where they cannot be built, a failure under CI=true."""
    ops = kernels.ops()
    if ops is None:
        reason = "medlava's CPU kernels could not be built here (see the warning in the log)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; under CI=true they must build")
        pytest.skip(reason)
    return ops
