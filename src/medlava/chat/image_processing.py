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


def preprocess(image: Image.Image, proc: ImageProcessing) -> torch.Tensor:
    """One PIL image -> [3, H, W] float32 tensor."""
    image = image.convert("RGB")
    if proc.aspect == "pad":
        image = pad_to_square(image, proc.mean)
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = proc.shortest_edge, int(proc.shortest_edge * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize(size, resample=proc.resample, reducing_gap=None)
    arr = np.asarray(image)
    if proc.do_center_crop:
        ch, cw = proc.crop
        top, left = (arr.shape[0] - ch) // 2, (arr.shape[1] - cw) // 2
        arr = arr[top : top + ch, left : left + cw]
    arr = (arr.astype(np.float64) * proc.rescale_factor).astype(np.float32)
    arr = (arr - np.asarray(proc.mean, np.float32)) / np.asarray(proc.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def preprocess_batch(images: list[Image.Image], proc: ImageProcessing) -> torch.Tensor:
    return torch.stack([preprocess(im, proc) for im in images])
