"""Images to pixel tensors as CLIP's processor makes them, with LLaVA's `pad` aspect mode."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessing:
    """The settings of a `preprocessor_config.json` that matter, plus LLaVA's aspect mode."""

    shortest_edge: int = 336
    crop: tuple[int, int] = (336, 336)  # (height, width)
    do_center_crop: bool = True
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    aspect: str = "pad"  # "pad": square with the mean colour first (LLaVA-Med); "crop": CLIP as is

    @classmethod
    def from_file(cls, path: Path, aspect: str, image_size: int) -> ImageProcessing:
        """Read `preprocessor_config.json`; CLIP defaults at `image_size` when the file is absent."""
        if not path.is_file():
            return cls(shortest_edge=image_size, crop=(image_size, image_size), aspect=aspect)
        cfg = json.loads(path.read_text())
        size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)
        edge = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop_hw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(
            shortest_edge=int(edge),
            crop=crop_hw,
            do_center_crop=cfg.get("do_center_crop", True),
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
            rescale_factor=cfg.get("rescale_factor", 1 / 255),
            resample=cfg.get("resample", Image.Resampling.BICUBIC),
            aspect=aspect,
        )

    def to_json(self) -> dict:
        h, w = self.crop
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.shortest_edge},
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": h, "width": w},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resample": int(self.resample),
            "do_convert_rgb": True,
        }


def pad_to_square(image: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    """LLaVA's expand2square: centre the image on a square of the mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def resized_size(w: int, h: int, shortest_edge: int) -> tuple[int, int]:
    """CLIP's resize: the short side becomes `shortest_edge`, the long side keeps the ratio (truncated)."""
    short, long = min(w, h), max(w, h)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if w <= h else (new_long, shortest_edge)


def preprocess(image: Image.Image, proc: ImageProcessing) -> torch.Tensor:
    """One PIL image -> [3, H, W] float32 tensor."""
    image = image.convert("RGB")
    if proc.aspect == "pad":
        image = pad_to_square(image, proc.mean)
    image = image.resize(resized_size(*image.size, proc.shortest_edge), resample=proc.resample, reducing_gap=None)
    arr = np.asarray(image)
    if proc.do_center_crop:
        ch, cw = proc.crop
        top, left = (arr.shape[0] - ch) // 2, (arr.shape[1] - cw) // 2
        arr = arr[top : top + ch, left : left + cw]
    arr = (arr.astype(np.float64) * proc.rescale_factor).astype(np.float32)
    arr = (arr - np.asarray(proc.mean, np.float32)) / np.asarray(proc.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def box_to_input(box: tuple[float, float, float, float], size: tuple[int, int], proc: ImageProcessing):
    """Map an (x0, y0, x1, y1) box on an image of `size` (w, h) into the model's input pixels."""
    x0, y0, x1, y1 = box
    w, h = size
    if proc.aspect == "pad" and w != h:
        side = max(w, h)
        dx, dy = (side - w) // 2, (side - h) // 2
        x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
        w = h = side
    new_w, new_h = resized_size(w, h, proc.shortest_edge)
    sx, sy = new_w / w, new_h / h
    left = top = 0
    out_w, out_h = new_w, new_h
    if proc.do_center_crop:
        out_h, out_w = proc.crop
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    clip_x = lambda v: min(max(v, 0.0), out_w)  # noqa: E731
    clip_y = lambda v: min(max(v, 0.0), out_h)  # noqa: E731
    return clip_x(x0 * sx - left), clip_y(y0 * sy - top), clip_x(x1 * sx - left), clip_y(y1 * sy - top)


def input_to_image(box: tuple[float, float, float, float], size: tuple[int, int], proc: ImageProcessing):
    """The inverse of `box_to_input`: an (x0, y0, x1, y1) box in the model's input pixels back onto
    the image of `size` (w, h), undoing the centre crop, the resize and the pad to square.

    Clipped to the image, so a box reaching into the padding ends at the image's edge.
    """
    x0, y0, x1, y1 = box
    w, h = size
    dx = dy = 0
    side_w, side_h = w, h
    if proc.aspect == "pad" and w != h:
        side_w = side_h = max(w, h)
        dx, dy = (side_w - w) // 2, (side_h - h) // 2
    new_w, new_h = resized_size(side_w, side_h, proc.shortest_edge)
    sx, sy = new_w / side_w, new_h / side_h
    left = top = 0
    if proc.do_center_crop:
        out_h, out_w = proc.crop
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    clip_x = lambda v: min(max(v, 0.0), float(w))  # noqa: E731
    clip_y = lambda v: min(max(v, 0.0), float(h))  # noqa: E731
    back_x = lambda v: clip_x((v + left) / sx - dx)  # noqa: E731
    back_y = lambda v: clip_y((v + top) / sy - dy)  # noqa: E731
    return back_x(x0), back_y(y0), back_x(x1), back_y(y1)


def preprocess_batch(images: list[Image.Image], proc: ImageProcessing) -> torch.Tensor:
    return torch.stack([preprocess(im, proc) for im in images])
