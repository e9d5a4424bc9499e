"""`Analyzer.explain` / `medlava explain`: relevance and occlusion maps, their geometry, the overlay."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medlava.analysis import grounding
from medlava.analysis.grounding import (
    NothingToLocalize,
    input_affine,
    input_frame,
    is_negative_answer,
    locate,
    occlusion_map,
)
from medlava.analysis.relevance import relevance_map
from medlava.chat.image_processing import ImageProcessing, box_to_input, input_to_image, preprocess
from medlava.chat.templates import build_prompt
from medlava.chat.tokenize import tokenize_prompt
from medlava.cli import app
from medlava.engine.llm import LLM
from medlava.model.demo import DEMO_MODEL
from medlava.model.loader import load_model

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
needs_demo = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="demo model not built")

PROCS = {
    "pad": ImageProcessing(shortest_edge=160, crop=(160, 160), aspect="pad"),
    "crop": ImageProcessing(shortest_edge=160, crop=(160, 160), aspect="crop"),
    "crop-smaller": ImageProcessing(shortest_edge=180, crop=(160, 160), aspect="crop"),
    "pad-smaller": ImageProcessing(shortest_edge=180, crop=(160, 160), aspect="pad"),
}


# -- geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("proc", PROCS.values(), ids=PROCS.keys())
@pytest.mark.parametrize("size", [(224, 224), (300, 180), (120, 250)])
def test_input_to_image_inverts_box_to_input(proc, size):
    w, h = size
    # Points the model sees (in crop mode the centre crop drops the long side's ends).
    visible = input_to_image((0, 0, *proc.crop[::-1]), size, proc)
    xs = np.linspace(visible[0] + 0.5, visible[2] - 0.5, 7)
    ys = np.linspace(visible[1] + 0.5, visible[3] - 0.5, 5)
    sx, sy, ox, oy = input_affine(size, proc)
    for x in xs:
        for y in ys:
            forward = box_to_input((x, y, x, y), size, proc)
            assert forward[:2] == pytest.approx((sx * x + ox, sy * y + oy))  # the affine agrees
            assert input_to_image(forward, size, proc) == pytest.approx((x, y, x, y), abs=1e-9)
    # Without a crop that cuts into it, the whole image (padding excluded) comes back whole.
    if proc.aspect == "pad" and proc.shortest_edge == proc.crop[0]:
        assert input_to_image(box_to_input((0, 0, w, h), size, proc), size, proc) == pytest.approx((0, 0, w, h))


@pytest.mark.parametrize("proc", PROCS.values(), ids=PROCS.keys())
def test_input_frame_preprocesses_exactly_like_the_original(proc, xray_image):
    frame = input_frame(xray_image, proc)
    assert torch.equal(preprocess(frame, proc), preprocess(xray_image, proc))
    if proc.shortest_edge == proc.crop[0] and proc.aspect == "pad":
        assert frame.size == (160, 160)  # the model's input itself


def test_locate_upsamples_and_maps_back_to_the_study():
    proc = PROCS["pad"]
    patch_map = np.zeros((10, 10))
    patch_map[2, 7] = 1.0  # one hot patch: input pixels x 112..128, y 32..48
    peak, box = locate(patch_map, (300, 200), proc)  # padded to 300x300, so y shifts by 50
    scale = 300 / 160
    assert peak == pytest.approx([120 * scale, 40 * scale - 50], abs=1.0)
    x0, y0, x1, y1 = box
    assert x0 < peak[0] < x1 and y0 < peak[1] < y1 and x1 - x0 < 3 * 16 * scale
    # The box follows the upsampled map at pixel resolution: above 75 % of the peak, the bilinear
    # ramp keeps 4 input pixels either side of the hot patch's centre, half a patch.
    _, box = locate(patch_map, (160, 160), proc, fraction=0.75)
    assert box == pytest.approx([116, 36, 124, 44], abs=0.6)


def test_negative_answers_are_recognised():
    for text in ("no", "No.", "no abnormality", "none", "normal", "there is no effusion", "Nothing"):
        assert is_negative_answer("Is there a nodule?", text)
    for text in ("yes", "right lower zone", "pleural effusion", "left", "nodule and mass"):
        assert not is_negative_answer("Is there a nodule?", text)
    assert is_negative_answer("Is this study normal?", "yes")
    assert not is_negative_answer("Is this study normal?", "no")  # not normal: something to show
    assert not is_negative_answer("Is there an abnormality?", "yes")


# -- the maps on a tiny random model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(model_dir("mistral-mlp2x-l1"))


def _prompt(lm, question: str) -> list[int]:
    cfg = lm.config
    return tokenize_prompt(lm.tokenizer, build_prompt(lm.conv_mode, question), cfg.image_token_id, cfg.image_tokens)


def test_relevance_map_is_the_patch_grid_finite_and_non_negative(lm, xray_image):
    grid = lm.config.vision.image_size // lm.config.vision.patch_size
    pixels = preprocess(xray_image, lm.image_processing)[None]
    rel = relevance_map(lm, _prompt(lm, "Is there a mass?"), [5, 6, 7], pixels)
    assert rel.shape == (grid, grid)
    assert np.isfinite(rel).all() and (rel >= 0).all() and rel.max() > 0
    other = relevance_map(lm, _prompt(lm, "Is there a mass?"), [5, 6, 7], torch.flip(pixels, dims=[-1]))
    assert not np.allclose(rel, other)  # it reads the image
    assert all(p.grad is None for p in lm.model.parameters())  # nothing left in the model


def test_occlusion_through_the_engine_equals_the_plain_model(lm, xray_image):
    ids = _prompt(lm, "Is there a mass?") + [5, 6, 7]
    n_answer = 3
    proc, vc = lm.image_processing, lm.config.vision
    grid = vc.image_size // vc.patch_size
    engine_map = occlusion_map(LLM(lm, block_size=8), lm, ids, n_answer, xray_image, window=1, stride=1)

    def score(image) -> float:
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids]), pixels=preprocess(image, proc)[None])[0].float()
        logprobs = torch.log_softmax(logits[-n_answer - 1 : -1], dim=-1)
        return float(logprobs.gather(1, torch.tensor(ids[-n_answer:])[:, None]).sum())

    frame = input_frame(xray_image, proc)  # this model crops: 120x90 -> 37x28, then the centre 28x28
    assert proc.aspect == "crop" and frame.size == (37, 28)
    base = score(xray_image)
    expected = np.zeros((grid, grid))
    colour = grounding.OCCLUSION_FILL  # black
    p, left = vc.patch_size, (37 - 28) // 2
    for r in range(grid):
        for c in range(grid):
            im = frame.copy()
            im.paste(colour, (left + c * p, r * p, left + (c + 1) * p, (r + 1) * p))
            expected[r, c] = base - score(im)
    assert np.abs(expected).max() > 1e-3  # occlusion changes the answer's probability at all
    assert engine_map == pytest.approx(expected, abs=2e-4)


# -- the demo model on the held-out phantom world --------------------------------------------------------


@pytest.fixture(scope="module")
def analyzer():
    from medlava.analysis.vqa import Analyzer

    return Analyzer()


@pytest.fixture(scope="module")
def effusion_study(tmp_path_factory):
    """Study 10 of the seed-777 world: a left pleural effusion on a chest radiograph (a big finding)."""
    from medlava.imaging import load_study
    from medlava.train.synthetic import generate_world

    out = tmp_path_factory.mktemp("world777")
    rec = generate_world(out, n=EFFUSION_INDEX + 1, seed=777)[EFFUSION_INDEX]
    (finding,) = [f for f in rec.findings if f.kind == "pleural_effusion"]
    return load_study(out / "images" / rec.image), finding.box, out / "images" / rec.image


EFFUSION_INDEX = 10


def _in_box(point, box, tol: float = 15) -> bool:
    return box[0] - tol <= point[0] <= box[2] + tol and box[1] - tol <= point[1] <= box[3] + tol


@needs_demo
@pytest.mark.parametrize("method", ["relevance", "occlusion"])
def test_demo_peak_lands_on_the_effusion_and_a_flipped_map_would_not(analyzer, effusion_study, method):
    study, box, _ = effusion_study
    result = analyzer.explain(study, "Is there a pleural effusion?", method)
    assert result.answer == "yes" and result.image_size == [224, 224] and result.slice is None
    patch_map = np.asarray(result.map)
    assert patch_map.shape == (10, 10)
    assert _in_box(result.peak, box), (result.peak, box)
    flipped, _ = locate(np.fliplr(patch_map), tuple(result.image_size), analyzer.lm.image_processing)
    assert not _in_box(flipped, box), (flipped, box)
    x0, y0, x1, y1 = result.box
    assert x0 <= result.peak[0] <= x1 and y0 <= result.peak[1] <= y1


@needs_demo
def test_a_no_answer_has_nothing_to_localise(analyzer, effusion_study):
    study, _, _ = effusion_study
    with pytest.raises(NothingToLocalize, match="nothing|no finding"):
        analyzer.explain(study, "Is there a mass?")
    with pytest.raises(ValueError, match="unknown explanation method"):
        grounding.explain(analyzer, study, "Is there a pleural effusion?", "gradcam")


# -- the command ---------------------------------------------------------------------------------------

runner = CliRunner()


@needs_demo
def test_cli_explain_writes_the_overlay_and_json(effusion_study, tmp_path):
    _, box, path = effusion_study
    png = tmp_path / "overlay.png"
    result = runner.invoke(app, ["explain", str(path), "Is there a pleural effusion?", "--out", str(png), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"answer", "method", "image_size", "peak", "box", "slice", "map"}
    assert out["method"] == "relevance" and out["answer"] == "yes" and len(out["map"]) == 10
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (224, 224) and im.mode == "RGB"
        overlay = np.asarray(im)
    original = np.asarray(Image.open(path).convert("RGB")) if path.suffix == ".png" else None
    # The heat is drawn: the overlay is coloured (the radiograph itself is grey).
    assert np.abs(overlay[..., 0].astype(int) - overlay[..., 2]).max() > 50
    if original is not None:
        assert overlay.shape == original.shape
    plain = runner.invoke(app, ["explain", str(path), "Is there a pleural effusion?", "--out", str(png)])
    assert plain.exit_code == 0 and plain.stdout == "yes\n"


@needs_demo
@pytest.mark.parametrize(
    "case, words",
    [
        ("text", "not a PNG or JPEG"),
        ("corrupt", "no pixel data"),
        ("empty", "no "),
        ("method", "--method must be one of"),
        ("no-finding", "nothing|no finding"),
    ],
)
def test_cli_explain_bad_input_is_one_line_exit_2(effusion_study, tmp_path, case, words):
    _, _, path = effusion_study
    question = "Is there a pleural effusion?"
    args = [str(path), question, "--out", str(tmp_path / "o.png")]
    if case == "text":
        (tmp_path / "notes.png").write_text("not an image")
        args[0] = str(tmp_path / "notes.png")
    elif case == "corrupt":
        (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
        args[0] = str(tmp_path / "bad.dcm")
    elif case == "empty":
        (tmp_path / "series").mkdir()
        args[0] = str(tmp_path / "series")
    elif case == "method":
        args += ["--method", "gradcam"]
    else:
        args[1] = "Is there a mass?"
    result = runner.invoke(app, ["explain", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(words, lines[0], re.IGNORECASE), lines[0]
    assert not (tmp_path / "o.png").exists()
