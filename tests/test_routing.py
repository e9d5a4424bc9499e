"""Replica choice for `serve --replicas`: an image's questions stay on one replica, images spread
over all, a replica leaving moves only its own images, a hot image overflows past the load bound."""

from __future__ import annotations

from collections import Counter

import numpy as np

from medlava.imaging.study import Study
from medlava.serve.routing import image_key, preference, ranked, study_key

REPLICAS = ["r-a", "r-b", "r-c", "r-d"]


def test_an_image_always_prefers_the_same_replica_and_images_spread_evenly():
    keys = [f"image-{i}" for i in range(4000)]
    first = [preference(k, REPLICAS)[0] for k in keys]
    assert first == [preference(k, list(reversed(REPLICAS)))[0] for k in keys]  # the order given does not matter
    counts = Counter(first)
    assert set(counts) == set(REPLICAS) and min(counts.values()) > 0.8 * 1000


def test_a_replica_that_leaves_moves_only_its_own_images():
    keys = [f"image-{i}" for i in range(2000)]
    before = {k: preference(k, REPLICAS)[0] for k in keys}
    after = {k: preference(k, REPLICAS[:-1])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "r-d" for k in moved)


def test_the_load_bound_sends_a_hot_images_overflow_to_its_next_replica():
    order = preference("hot", REPLICAS)
    assert ranked("hot", REPLICAS, {}) == [[r] for r in order]
    busy = {order[0]: 9, order[1]: 1}  # total 10 (+1) over 4 replicas, slack 2: bound 6
    assert ranked("hot", REPLICAS, busy)[0] == [order[1]] and ranked("hot", REPLICAS, busy)[-1] == [order[0]]
    assert ranked("hot", REPLICAS, {order[0]: 4, order[1]: 2, order[2]: 2})[0] == [order[0]]  # bound 5: stays
    assert ranked("hot", REPLICAS[:2], {"r-a": 99, "r-b": 0})[0] == [preference("hot", REPLICAS[:2])[0]]  # 2: never


def test_text_only_requests_go_to_the_least_loaded_replica():
    assert ranked(None, REPLICAS, {"r-a": 3, "r-b": 0, "r-c": 5, "r-d": 1}) == [["r-b", "r-d", "r-a", "r-c"]]
    assert ranked("x", [], {}) == []


def test_the_key_is_the_first_images_pixels():
    a = Study(images=[np.zeros((8, 8), np.uint8)], modality="CT")
    b = Study(images=[np.ones((8, 8), np.uint8)], modality="CT")
    same_pixels = Study(images=[np.zeros((8, 8), np.uint8)], modality="MR", source="other.dcm")
    msgs = lambda *studies: [{"role": "user", "content": [{"type": "image", "image": s} for s in studies]}]  # noqa: E731
    assert image_key(msgs(a, b)) == study_key(a) == study_key(same_pixels) != study_key(b)
    assert image_key([{"role": "user", "content": "no image"}]) is None
