"""Intensity augmentation for training: how bright a study is displayed is not a finding.

A window stretched between percentiles (MR, and any study without a stored window) sets the
brightness of the whole image by its brightest content: a bright, enhancing brain mass darkens the
rest of the brain. Trained without augmentation, the demo model learned that darkening as the
mass's sign and ignored the mass itself (occluding it left the "yes" unchanged; docs/GROUNDING.md).
Scaling each training image's intensities by a random factor (MONAI's RandScaleIntensity, applied
in display space about black) makes global brightness an unreliable cue, so the finding is learned.
The padding around a non-square image is scaled with it, although inference always pads with
the mean colour: a border brightness the model sees only in training (left as is so far).
"""

from __future__ import annotations

import math

import torch

from medlava.chat.image_processing import ImageProcessing


def scale_intensity(pixels: torch.Tensor, factors: torch.Tensor, proc: ImageProcessing) -> torch.Tensor:
    """Preprocessed pixels [B, 3, H, W] as if each image's display intensities had been multiplied
    by its factor (clipped to white), normalised again."""
    mean = torch.tensor(proc.mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(proc.std, dtype=pixels.dtype).view(1, 3, 1, 1)
    shown = pixels * std + mean  # 0..1, as displayed
    return ((shown * factors.view(-1, 1, 1, 1).to(pixels.dtype)).clamp(0.0, 1.0) - mean) / std


def random_intensity(pixels: torch.Tensor, jitter: float, proc: ImageProcessing, seed: int) -> torch.Tensor:
    """Each image scaled by a factor drawn log-uniformly from [1 / (1 + jitter), 1 + jitter];
    `seed` makes the draw reproducible (the trainers pass one per step, so a resumed run draws the same).
    jitter 0 returns `pixels` unchanged."""
    if jitter <= 0:
        return pixels
    g = torch.Generator().manual_seed(seed)
    span = math.log1p(jitter)
    factors = torch.exp((torch.rand(pixels.shape[0], generator=g) * 2 - 1) * span)
    return scale_intensity(pixels, factors, proc)
