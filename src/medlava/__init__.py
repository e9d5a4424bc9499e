"""medlava: local, private, fast medical image analysis with LLaVA-style vision-language models."""

from medlava.errors import ImagingError, MedlavaError, ModelLoadError

__all__ = ["LLM", "LLMEngine", "AsyncLLMEngine", "Analyzer", "Answer", "SamplingParams", "MedlavaError", "ImagingError", "ModelLoadError"]
__version__ = "0.1.0"

# The model-side names import torch; load them on first use so `medlava.imaging` stays light.
_LAZY = {
    "LLM": "medlava.engine.llm",
    "LLMEngine": "medlava.engine.llm_engine",
    "AsyncLLMEngine": "medlava.engine.async_engine",
    "Analyzer": "medlava.analysis.vqa",
    "Answer": "medlava.analysis.vqa",
    "SamplingParams": "medlava.engine.sampling",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medlava' has no attribute {name!r}")
