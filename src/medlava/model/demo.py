"""Where the shipped demo model lives: inside the package, so it works offline out of the box."""

from __future__ import annotations

from pathlib import Path

from medlava.errors import ModelLoadError

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "medlava-tiny"


def resolve_model(model: str | Path | None) -> Path:
    """`model` as a path, or the shipped demo model when it is None."""
    if model is not None:
        return Path(model)
    if not (DEMO_MODEL / "config.json").is_file():
        raise ModelLoadError(
            f"no model given and the shipped demo model is missing ({DEMO_MODEL}); pass --model DIR "
            "(a Hugging Face Llava or LLaVA-Med folder)"
        )
    return DEMO_MODEL
