"""Image content hashes and the vision-encoder cache (image hash -> projected features, LRU)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def image_hash(pixels: torch.Tensor, settings: object = None) -> str:
    """sha256 of a preprocessed [3, H, W] pixel tensor and the preprocessing settings that made it.

    The same study preprocessed the same way gets the same hash; any pixel or setting differing
    (window, aspect mode, size) gives another.
    """
    t = pixels.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(f"{repr(settings)}|{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class VisionCache:
    """At most `capacity` images' decoder-space features, least recently used evicted first."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"vision cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> torch.Tensor | None:
        feats = self._items.get(key)
        if feats is not None:
            self._items.move_to_end(key)
        return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        self._items[key] = feats
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
