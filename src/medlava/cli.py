"""The `medlava` command. Thin: parse, call the package, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Local, private medical image analysis.")

ModelOpt = Annotated[Path | None, typer.Option("--model", help="Model folder (HF Llava or LLaVA-Med).")]
VisionTowerOpt = Annotated[
    Path | None, typer.Option("--vision-tower", help="Local CLIP folder for original LLaVA-Med checkpoints.")
]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def run_guarded(fn, *args, **kwargs):
    """Call into the package; a user's mistake becomes one line on stderr and exit status 2."""
    from medlava.errors import MedlavaError

    try:
        return fn(*args, **kwargs)
    except (MedlavaError, ValueError, OSError) as e:
        fail(str(e) or type(e).__name__)


@app.command()
def ask(
    image: Annotated[str, typer.Argument(help=".dcm, DICOM folder, .nii/.nii.gz, .png or .jpg")],
    question: Annotated[str, typer.Argument(help="The question about the image.")],
    model: ModelOpt = None,
    vision_tower: VisionTowerOpt = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: int | None = None,
    window: Annotated[str | None, typer.Option(help="CT window: lung, mediastinum, bone or brain.")] = None,
    conv_mode: Annotated[str | None, typer.Option(help="Prompt template (default: the model's own).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: the model's).")] = None,
    device: str = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Answer QUESTION about IMAGE."""
    from medlava import Analyzer, SamplingParams
    from medlava.imaging import load_study

    params = run_guarded(SamplingParams, temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens)
    study = run_guarded(load_study, image, window=window)  # before the (slow) model load
    analyzer = run_guarded(
        Analyzer, model, vision_tower=vision_tower, dtype=dtype, device=device, conv_mode=conv_mode
    )
    result = run_guarded(analyzer.ask, study, question, params)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(result.answer)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Original LLaVA-Med (or any loadable) model folder.")],
    dst: Annotated[Path, typer.Argument(help="Where to write the Hugging Face Llava folder.")],
    vision_tower: VisionTowerOpt = None,
) -> None:
    """Write SRC in the Hugging Face Llava layout to DST."""
    from medlava.model.convert import convert as do_convert

    if dst.exists() and any(dst.iterdir()):
        fail(f"{dst} exists and is not empty; choose a new folder")
    out = run_guarded(do_convert, src, dst, vision_tower=vision_tower)
    typer.echo(f"wrote {out}")
