"""Where in the image an answer came from: relevance and occlusion maps, peak and box in the study's pixels.

Both maps live on the model's patch grid (one value per image token; `vision_feature_select_strategy`
"default" drops CLS, so tokens are patches 1:1, row-major):

- `relevance`: Chefer et al. 2021 (ICCV), gradient-weighted attention relevance, in the plain
  model. The prompt plus the model's own answer is forwarded once with an attention backend that
  keeps every layer's softmax probabilities (and the vision tower's); the summed log-probability of
  the answer tokens is differentiated, and R = I, R += mean_heads((dA * A)^+) R per layer; the
  rows of the answer-generating positions at the image-token columns are then carried to the input
  patches through the vision tower's normalised self-relevance (the paper's bi-modal rule).
- `occlusion`: k x k patch windows painted black (removing what they show; the mean grey painted
  into dark lung looks like an opacity and adds evidence instead), one engine batch of
  (question + fixed answer) prompts over the occluded images; the map is the mean drop in the
  answer's log-probability over the windows covering each patch.

Images are occluded in the model's input frame (padded to square and resized, as PIL), so the
engine's preprocessing is an identity on them and a painted cell is exactly one patch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medlava.analysis.relevance import relevance_map
from medlava.chat.image_processing import (
    ImageProcessing,
    input_to_image,
    pad_to_square,
    preprocess,
    resized_size,
)
from medlava.chat.images import ImageInput, open_image
from medlava.chat.templates import build_prompt
from medlava.chat.tokenize import tokenize_prompt
from medlava.engine.llm import LLM
from medlava.engine.sampling import SamplingParams
from medlava.model.loader import LoadedModel

METHODS = ("relevance", "occlusion")
BOX_FRACTION = 0.5  # the box bounds the connected region around the peak above this fraction of it
OCCLUSION_WINDOW, OCCLUSION_STRIDE = 2, 1  # in patches; chosen on the seed-4242 world (docs/GROUNDING.md)
OCCLUSION_FILL = (0, 0, 0)  # black: chosen over the mean grey, blurs and the local mean on seeds 4242 and 5151


class NothingToLocalize(ValueError):
    """The answer says there is nothing there, so there is nothing to point at."""


_NEGATIVE = re.compile(r"(no|none|normal|nothing|negative|absent|unremarkable)|(no|there (is|are) no|without) .*")


def is_negative_answer(question: str, answer: str) -> bool:
    """True when the answer reports no finding: "no", "no abnormality", "none", "normal", ... or a
    "yes" to a question asking whether the study is normal."""
    text = " ".join(re.sub(r"[^a-z ]", " ", answer.lower()).split())
    if re.search(r"\bnormal\b", question.lower()):  # "Is this study normal?": yes means nothing found
        return text in ("yes", "normal") or text.startswith("yes ")
    return bool(_NEGATIVE.fullmatch(text))


# -- geometry of the model's input -----------------------------------------------------------------


def input_frame(image: Image.Image, proc: ImageProcessing) -> Image.Image:
    """The image padded to square and resized exactly as `preprocess` does, before its centre crop:
    `preprocess` of this frame equals `preprocess` of the image."""
    image = image.convert("RGB")
    if proc.aspect == "pad":
        image = pad_to_square(image, proc.mean)
    return image.resize(resized_size(*image.size, proc.shortest_edge), resample=proc.resample, reducing_gap=None)


def crop_box(frame_size: tuple[int, int], proc: ImageProcessing) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the model's input inside the frame (the centre crop)."""
    w, h = frame_size
    if not proc.do_center_crop:
        return 0, 0, w, h
    ch, cw = proc.crop
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def input_affine(size: tuple[int, int], proc: ImageProcessing) -> tuple[float, float, float, float]:
    """(sx, sy, ox, oy) with input_x = sx * image_x + ox (and y alike): pad, resize and crop in one."""
    w, h = size
    side_w, side_h = (max(w, h),) * 2 if proc.aspect == "pad" else (w, h)
    dx, dy = (side_w - w) // 2, (side_h - h) // 2
    new_w, new_h = resized_size(side_w, side_h, proc.shortest_edge)
    left, top, _, _ = crop_box((new_w, new_h), proc)
    sx, sy = new_w / side_w, new_h / side_h
    return sx, sy, dx * sx - left, dy * sy - top


def upsample(patch_map: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear (half-pixel centres) from the patch grid to `out_hw` pixels."""
    t = torch.as_tensor(np.ascontiguousarray(patch_map), dtype=torch.float32)[None, None]
    return F.interpolate(t, size=out_hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def image_heat(patch_map: np.ndarray, size: tuple[int, int], proc: ImageProcessing) -> np.ndarray:
    """The map at every pixel of the displayed image [h, w], sampled as `upsample` would at the
    input pixel each image pixel's centre lands on."""
    w, h = size
    sx, sy, ox, oy = input_affine(size, proc)
    in_h, in_w = crop_hw(size, proc)
    xs = (np.arange(w) + 0.5) * sx + ox
    ys = (np.arange(h) + 0.5) * sy + oy
    gx, gy = np.meshgrid(2 * xs / in_w - 1, 2 * ys / in_h - 1)
    grid = torch.from_numpy(np.stack([gx, gy], -1)[None].astype(np.float32))
    t = torch.as_tensor(np.ascontiguousarray(patch_map), dtype=torch.float32)[None, None]
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()


def crop_hw(size: tuple[int, int], proc: ImageProcessing) -> tuple[int, int]:
    """(height, width) of the model's input for an image of `size`."""
    w, h = size
    side = (max(w, h),) * 2 if proc.aspect == "pad" else (w, h)
    _, _, cw, ch = crop_box(resized_size(*side, proc.shortest_edge), proc)
    return ch, cw


def _grow(seed: tuple[int, int], allowed: np.ndarray) -> np.ndarray:
    """The 4-connected component of `allowed` that contains `seed` (row, col)."""
    region = np.zeros_like(allowed)
    region[seed] = True
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= allowed
        if (grown == region).all():
            return region
        region = grown


def locate(patch_map: np.ndarray, size: tuple[int, int], proc: ImageProcessing, fraction: float = BOX_FRACTION):
    """Peak (x, y) and box (x0, y0, x1, y1) of a patch map, in the pixels of the image of `size`.

    The map is upsampled to the input resolution first (so the peak is not a patch centre); only
    input pixels showing the image (not its padding) count.
    """
    in_h, in_w = crop_hw(size, proc)
    heat = upsample(patch_map, (in_h, in_w))
    sx, sy, ox, oy = input_affine(size, proc)
    w, h = size
    cols, rows = np.arange(in_w) + 0.5, np.arange(in_h) + 0.5
    inside = (((cols - ox) / sx >= 0) & ((cols - ox) / sx <= w))[None, :] & (
        ((rows - oy) / sy >= 0) & ((rows - oy) / sy <= h)
    )[:, None]
    masked = np.where(inside, heat, -np.inf)
    py, px = np.unravel_index(int(np.argmax(masked)), masked.shape)
    top = masked[py, px]
    threshold = fraction * top if top > 0 else top
    region = _grow((py, px), inside & (heat >= threshold))
    ys, xs = np.nonzero(region)
    peak = input_to_image((px + 0.5, py + 0.5, px + 0.5, py + 0.5), size, proc)[:2]
    box = input_to_image((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), size, proc)
    return [round(float(v), 1) for v in peak], [round(float(v), 1) for v in box]


# -- occlusion -------------------------------------------------------------------------------------


def occluded_frames(
    frame: Image.Image, proc: ImageProcessing, grid: int, patch: int, window: int, stride: int
) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    """Copies of `frame` with a `window` x `window` block of patch cells painted `OCCLUSION_FILL`,
    sliding by `stride` (the last window always reaches the grid's edge); their top-left cells."""
    starts = list(range(0, grid - window + 1, stride))
    if starts[-1] != grid - window:
        starts.append(grid - window)
    left, top, _, _ = crop_box(frame.size, proc)
    frames, cells = [], []
    for r in starts:
        for c in starts:
            im = frame.copy()
            x0, y0 = left + c * patch, top + r * patch
            im.paste(OCCLUSION_FILL, (x0, y0, x0 + window * patch, y0 + window * patch))
            frames.append(im)
            cells.append((r, c))
    return frames, cells


def occlusion_map(
    llm: LLM,
    lm: LoadedModel,
    ids: list[int],
    n_answer: int,
    image: Image.Image,
    window: int = OCCLUSION_WINDOW,
    stride: int = OCCLUSION_STRIDE,
) -> np.ndarray:
    """Mean drop of the answer's log-probability when each patch is occluded ([g, g]); `ids` is
    the prompt followed by the `n_answer` answer tokens."""
    vc = lm.config.vision
    grid = vc.image_size // vc.patch_size
    if not 1 <= window <= grid or stride < 1:
        raise ValueError(f"occlusion window must be 1..{grid} patches and stride >= 1, got {window}, {stride}")
    frame = input_frame(image, lm.image_processing)
    frames, cells = occluded_frames(frame, lm.image_processing, grid, vc.patch_size, window, stride)
    outs = llm.generate(
        [{"prompt_token_ids": ids, "images": [im]} for im in [frame, *frames]],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    scores = np.array([sum(out.prompt_logprobs[len(ids) - n_answer :]) for out in outs])
    heat, count = np.zeros((grid, grid)), np.zeros((grid, grid))
    for (r, c), drop in zip(cells, scores[0] - scores[1:], strict=True):
        heat[r : r + window, c : c + window] += drop
        count[r : r + window, c : c + window] += 1
    return heat / count


# -- the result ------------------------------------------------------------------------------------


@dataclass
class Explanation:
    answer: str
    method: str
    image_size: list[int]  # [w, h] of the study's displayed key image
    peak: list[float]  # [x, y] in that image's pixels
    box: list[float]  # [x0, y0, x1, y1] in that image's pixels
    slice: int | None  # the key slice's index in the volume; None for 2-D images
    map: list[list[float]]  # the raw map on the model's patch grid, rows top to bottom
    image: Image.Image | None = field(default=None, repr=False, compare=False)  # the displayed image
    heat: np.ndarray | None = field(default=None, repr=False, compare=False)  # [h, w] map on it, 0..1

    def to_dict(self) -> dict:
        keys = ("answer", "method", "image_size", "peak", "box", "slice", "map")
        return {k: getattr(self, k) for k in keys}

    def save_overlay(self, path) -> None:
        """Write the heatmap over the displayed image, peak and box marked, as a PNG at its size."""
        from medlava.analysis.overlay import write_overlay

        write_overlay(self.image, self.heat, self.peak, self.box, path)


def explain(
    analyzer,
    image: ImageInput,
    question: str,
    method: str = "relevance",
    *,
    window: str | None = None,
    answer=None,
    occlusion_window: int = OCCLUSION_WINDOW,
    occlusion_stride: int = OCCLUSION_STRIDE,
) -> Explanation:
    """Answer `question` greedily (or take `answer`, an `Answer` from `analyzer.ask`), map where it
    came from, and place the map's peak and box on the study's displayed key image.

    Raises `NothingToLocalize` (a ValueError) when the answer says there is no finding.
    """
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of: {', '.join(METHODS)}")
    if answer is None:
        answer = analyzer.ask(image, question, window=window)  # a volume: on the slice that shows most
    pil, study, slice_no = _answered_image(image, window, getattr(answer, "slice", None))
    if is_negative_answer(question, answer.answer):
        raise NothingToLocalize(f"the answer is {answer.answer!r}: there is no finding to localise")
    lm = analyzer.lm
    cfg, proc = lm.config, lm.image_processing
    prompt = build_prompt(lm.conv_mode, question.strip())
    prompt_ids = tokenize_prompt(lm.tokenizer, prompt, cfg.image_token_id, cfg.image_tokens)
    answer_ids = list(answer.token_ids)
    if method == "relevance":
        patch_map = relevance_map(lm, prompt_ids, answer_ids, preprocess(pil, proc)[None])
    else:
        patch_map = occlusion_map(
            analyzer.llm, lm, prompt_ids + answer_ids, len(answer_ids), pil, occlusion_window, occlusion_stride
        )
    peak, box = locate(patch_map, pil.size, proc)
    heat = image_heat(np.clip(patch_map, 0, None), pil.size, proc)
    return Explanation(
        answer=answer.answer,
        method=method,
        image_size=list(pil.size),
        peak=peak,
        box=box,
        slice=slice_no,
        map=[[float(f"{v:.6g}") for v in row] for row in patch_map.tolist()],
        image=pil,
        heat=heat / heat.max() if heat.max() > 0 else heat,
    )


def _answered_image(image: ImageInput, window: str | None, slice_no: int | None):
    """(the displayed image the answer was read on, its study, its slice number in the volume).

    `slice_no` is the answer's slice (`Answer.slice`, set for volumes); without it, the key image.
    """
    pil, study = open_image(image, window, key_slices=None if slice_no is not None else 1)
    if study is None:
        return pil.convert("RGB"), None, None
    keys = study.metadata.get("KeySlices")
    numbers = [int(k) for k in keys.split(",")] if keys else list(range(len(study.images)))
    position = numbers.index(slice_no) if slice_no in numbers else len(study.images) // 2
    return study.to_pil(position).convert("RGB"), study, numbers[position] if keys or slice_no is not None else None
