"""Pixel values against transformers' CLIPImageProcessor, and LLaVA's pad-to-square."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from medlava.chat.image_processing import ImageProcessing, pad_to_square, preprocess


def reference(image: Image.Image, size: int) -> torch.Tensor:
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return torch.as_tensor(np.asarray(proc(images=image, return_tensors="np")["pixel_values"][0]))


@pytest.mark.parametrize("shape", [(64, 64), (90, 120), (150, 70)])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_crop_mode_matches_clip_processor(shape, mode):
    rng = np.random.default_rng(sum(shape))
    arr = rng.integers(0, 256, (*shape, 3) if mode == "RGB" else shape, dtype=np.uint8)
    image = Image.fromarray(arr, mode=mode)
    ours = preprocess(image, ImageProcessing(shortest_edge=56, crop=(56, 56), aspect="crop"))
    theirs = reference(image, 56)
    assert ours.shape == theirs.shape == (3, 56, 56)
    assert (ours - theirs).abs().max() < 1e-5


def test_pad_mode_is_expand2square_then_clip(xray_image):
    proc = ImageProcessing(shortest_edge=56, crop=(56, 56), aspect="pad")
    padded = pad_to_square(xray_image.convert("RGB"), proc.mean)
    assert padded.size == (120, 120)
    # Mean colour above and below the 90-pixel-high image, the image itself in the middle rows.
    assert padded.getpixel((0, 0)) == tuple(int(m * 255) for m in proc.mean)
    assert padded.getpixel((5, 15 + 40)) == (xray_image.getpixel((5, 40)),) * 3
    ours = preprocess(xray_image, proc)
    assert (ours - reference(padded, 56)).abs().max() < 1e-5
    # Padding keeps the whole image: it differs from a centre crop of the same picture.
    crop = preprocess(xray_image, ImageProcessing(shortest_edge=56, crop=(56, 56), aspect="crop"))
    assert (ours - crop).abs().max() > 0.1


def test_reads_preprocessor_config(tmp_path):
    proc = ImageProcessing(shortest_edge=40, crop=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    path = tmp_path / "preprocessor_config.json"
    import json

    path.write_text(json.dumps(proc.to_json()))
    assert ImageProcessing.from_file(path, "pad", 999) == proc
    assert ImageProcessing.from_file(tmp_path / "absent.json", "crop", 28).crop == (28, 28)


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_box_follows_the_pixels(aspect):
    """A bright square drawn on the image lands where box_to_input says, after pad/resize/crop."""
    from medlava.chat.image_processing import box_to_input

    arr = np.zeros((90, 150), np.uint8)
    arr[30:50, 70:100] = 255
    proc = ImageProcessing(shortest_edge=60, crop=(60, 60), aspect=aspect, mean=(0, 0, 0), std=(1, 1, 1))
    pixels = preprocess(Image.fromarray(arr), proc)[0]
    x0, y0, x1, y1 = box_to_input((70, 30, 100, 50), (150, 90), proc)
    inside = pixels[int(y0) + 1 : int(y1) - 1, int(x0) + 1 : int(x1) - 1]
    assert inside.min() > 0.9
    mask = torch.ones_like(pixels, dtype=torch.bool)
    mask[max(0, int(y0) - 1) : int(y1) + 2, max(0, int(x0) - 1) : int(x1) + 2] = False
    assert pixels[mask].max() < 0.1
