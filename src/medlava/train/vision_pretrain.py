"""Stage 0: pretrain the demo model's vision tower on the phantom world's labels.

Real LLaVA starts from a pretrained CLIP; the demo model has none, and a ViT trained only through
the language loss learns too slowly on 2 cores. So the tower first learns the world directly:
modality, body part and, for every finding kind, whether it is present, on which side and in
which zone, from its pooled patch features; and, patch by patch, which finding (if any) each patch
shows and on which of the patient's sides it lies. The dense targets keep spatial detail in the
patch tokens: a finding's own tokens say which side it is on, which is what the language model
reads to say which side (without them the side was the demo's weakest answer).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medlava.chat.image_processing import ImageProcessing, box_to_input, preprocess
from medlava.imaging import load_study
from medlava.model.convert import save_hf
from medlava.model.loader import load_model
from medlava.train.augment import random_intensity
from medlava.train.phantoms import FINDING_KINDS

MODALITIES = ("x-ray", "ct", "mri")
BODY_PARTS = ("chest", "abdomen", "head")
KINDS = FINDING_KINDS
STATES = ("absent", "present", "right", "left")  # per finding kind; "present" = a finding without side
ZONES = (None, "upper", "middle", "lower")
PATCH_SIDES = (None, "right", "left")


@dataclass
class Labelled:
    pixels: torch.Tensor  # [3, H, W]
    modality: int
    body_part: int
    states: torch.Tensor  # [K] index into STATES
    zones: torch.Tensor  # [K] index into ZONES
    patches: torch.Tensor  # [grid * grid] class per patch: 0 = none, k + 1 = KINDS[k]
    patch_sides: torch.Tensor  # [grid * grid] index into PATCH_SIDES of the finding the patch shows


def patch_labels(boxes: list[tuple[int, tuple]], grid: int, patch: int) -> torch.Tensor:
    """Class of each patch: the finding covering >= 25 % of it, and always the patch at a box's centre."""
    labels = torch.zeros(grid, grid, dtype=torch.long)
    edges = torch.arange(grid + 1, dtype=torch.float32) * patch
    for cls, (x0, y0, x1, y1) in boxes:
        ox = (torch.minimum(edges[1:], torch.tensor(x1)) - torch.maximum(edges[:-1], torch.tensor(x0))).clamp(min=0)
        oy = (torch.minimum(edges[1:], torch.tensor(y1)) - torch.maximum(edges[:-1], torch.tensor(y0))).clamp(min=0)
        labels[(oy[:, None] * ox[None, :]) >= 0.25 * patch * patch] = cls
        cy, cx = min(int((y0 + y1) / 2 // patch), grid - 1), min(int((x0 + x1) / 2 // patch), grid - 1)
        labels[cy, cx] = cls
    return labels.flatten()


def label_study(record: dict, images: Path, proc: ImageProcessing, grid: int, patch: int) -> Labelled:
    image = load_study(images / record["image"]).key_image()
    boxes = [(f, box_to_input(tuple(f["box"]), image.size, proc)) for f in record["findings"]]
    states = torch.zeros(len(KINDS), dtype=torch.long)
    zones = torch.zeros(len(KINDS), dtype=torch.long)
    for f in record["findings"]:
        k = KINDS.index(f["kind"])
        states[k] = STATES.index(f["side"] or "present")
        zones[k] = ZONES.index(f.get("zone"))
    return Labelled(
        preprocess(image, proc),
        MODALITIES.index(record["modality_name"]),
        BODY_PARTS.index(record["body_part"]),
        states,
        zones,
        patch_labels([(KINDS.index(f["kind"]) + 1, box) for f, box in boxes], grid, patch),
        patch_labels([(PATCH_SIDES.index(f["side"]), box) for f, box in boxes if f["side"]], grid, patch),
    )


class WorldHeads(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.sizes = (len(MODALITIES), len(BODY_PARTS), len(KINDS) * len(STATES), len(KINDS) * len(ZONES))
        self.pooled = nn.Linear(dim, sum(self.sizes))
        self.patch = nn.Linear(dim, len(KINDS) + 1)
        self.patch_side = nn.Linear(dim, len(PATCH_SIDES))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        modality, body, states, zones = self.pooled(feats.mean(1)).split(self.sizes, dim=-1)
        k = len(KINDS)
        states, zones = states.view(-1, k, len(STATES)), zones.view(-1, k, len(ZONES))
        return modality, body, states, zones, self.patch(feats), self.patch_side(feats)


def batch_of(items: list[Labelled]) -> dict[str, torch.Tensor]:
    return {
        "pixels": torch.stack([i.pixels for i in items]),
        "modality": torch.tensor([i.modality for i in items]),
        "body_part": torch.tensor([i.body_part for i in items]),
        "states": torch.stack([i.states for i in items]),
        "zones": torch.stack([i.zones for i in items]),
        "patches": torch.stack([i.patches for i in items]),
        "patch_sides": torch.stack([i.patch_sides for i in items]),
    }


def world_loss(outputs: tuple[torch.Tensor, ...], b: dict[str, torch.Tensor]) -> torch.Tensor:
    modality, body, states, zones, patches, patch_sides = outputs
    return (
        F.cross_entropy(modality, b["modality"])
        + F.cross_entropy(body, b["body_part"])
        + F.cross_entropy(states.flatten(0, 1), b["states"].flatten())
        + F.cross_entropy(zones.flatten(0, 1), b["zones"].flatten())
        + F.cross_entropy(patches.flatten(0, 1), b["patches"].flatten())
        + F.cross_entropy(patch_sides.flatten(0, 1), b["patch_sides"].flatten())
    )


@torch.no_grad()
def evaluate(tower, heads, layer: int, items: list[Labelled]) -> dict[str, float]:
    b = batch_of(items)
    modality, body, states, zones, patches, patch_sides = heads(_features(tower, b["pixels"], layer))
    finding, present, sided_patch = b["patches"] > 0, b["states"] > 0, b["patch_sides"] > 0
    sided = b["states"] >= STATES.index("right")
    return {
        "modality_acc": (modality.argmax(-1) == b["modality"]).float().mean().item(),
        "body_part_acc": (body.argmax(-1) == b["body_part"]).float().mean().item(),
        "kind_presence_acc": ((states.argmax(-1) > 0) == present).float().mean().item(),
        "side_acc": (states.argmax(-1)[sided] == b["states"][sided]).float().mean().item(),
        "finding_patch_recall": (patches.argmax(-1)[finding] == b["patches"][finding]).float().mean().item()
        if finding.any()
        else float("nan"),
        "finding_patch_side_acc": (patch_sides.argmax(-1)[sided_patch] == b["patch_sides"][sided_patch]).float().mean().item()
        if sided_patch.any()
        else float("nan"),
    }


def _features(tower, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    return tower.features(pixels, layer)[:, 1:]  # patch tokens, as the projector sees them


def pretrain_vision(
    model: Path,
    world: Path,
    out: Path,
    *,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    held_out: float = 0.1,
    intensity_jitter: float = 0.0,
    progress: bool = True,
) -> dict[str, float]:
    """Train the vision tower of `model` on the world in `world`; save the whole model to `out`.

    intensity_jitter: scale each training image's intensities by up to 1 + jitter either way
    (`train/augment.py`); 0 = off."""
    torch.manual_seed(seed)
    lm = load_model(model, dtype="float32")
    cfg = lm.config.vision
    grid, patch = cfg.image_size // cfg.patch_size, cfg.patch_size
    records = [json.loads(line) for line in (world / "studies.jsonl").read_text().splitlines() if line.strip()]
    items = [label_study(r, world / "images", lm.image_processing, grid, patch) for r in records]
    n_eval = max(1, int(len(items) * held_out))
    train_items, eval_items = items[:-n_eval], items[-n_eval:]

    tower, layer = lm.model.vision_tower, lm.config.vision_feature_layer
    heads = WorldHeads(cfg.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    tower.train()
    for step in range(steps):
        idx = torch.randint(len(train_items), (batch_size,), generator=g).tolist()
        b = batch_of([train_items[i] for i in idx])
        b["pixels"] = random_intensity(b["pixels"], intensity_jitter, lm.image_processing, seed * 1_000_003 + step)
        loss = world_loss(heads(_features(tower, b["pixels"], layer)), b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if progress and (step % 50 == 0 or step == steps - 1):
            print(f"stage 0 step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    tower.eval()
    metrics = evaluate(tower, heads, layer, eval_items)
    save_hf(lm, out)
    (out / "vision_pretrain.json").write_text(json.dumps({"steps": steps, "held_out": metrics}, indent=1))
    return metrics
