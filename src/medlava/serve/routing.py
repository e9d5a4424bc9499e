"""Which engine replica serves a request (`medlava serve --replicas N`).

A request's first image picks its replica: every replica gets a score from a hash of the image's
content and the replica's id, and the request prefers them in score order (rendezvous, or
highest-random-weight, hashing: a consistent hash with no ring to keep, so a replica that comes
or goes moves only the images it owned). All questions about one study thus land where its KV
blocks and vision features already are. A load bound keeps one hot image from swamping its
replica: a replica already carrying more than `slack` times the mean load (counting this
request) is passed over for the next in the image's order (Mirrokni et al., consistent hashing
with bounded loads). Requests without an image go to the least loaded replica.

Pure functions here; `serve/cluster.py` plugs them into Ray Serve's request router.
"""

from __future__ import annotations

import hashlib
import math

DEFAULT_SLACK = 2.0  # with two replicas the bound never binds: an image's questions always share one


def image_key(messages: list[dict]) -> str | None:
    """The routing key of the engine's messages (images read to `Study`s): their first image's, or None."""
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image":
                    return study_key(part["image"])
    return None


def study_key(study) -> str:
    """A hash of a `Study`'s key images: the same pixels, the same replica."""
    h = hashlib.blake2b(digest_size=16)
    for img in study.images:
        h.update(str(img.shape).encode())
        h.update(img.tobytes())
    return h.hexdigest()


def preference(key: str, replicas: list[str]) -> list[str]:
    """`replicas` in the order `key` prefers them (rendezvous hashing)."""
    def score(replica: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()

    return sorted(replicas, key=score, reverse=True)


def ranked(key: str | None, replicas: list[str], loads: dict[str, int], slack: float = DEFAULT_SLACK) -> list[list[str]]:
    """Replicas in ranks, the preferred first: by `key`'s preference, past those over the load bound
    (ceil(slack * (total load + 1) / replicas)); without a key, least loaded first."""
    if not replicas:
        return []
    if key is None:
        return [sorted(replicas, key=lambda r: loads.get(r, 0))]
    order = preference(key, replicas)
    bound = math.ceil(slack * (sum(loads.get(r, 0) for r in replicas) + 1) / len(replicas))
    under = [r for r in order if loads.get(r, 0) < bound]
    over = [r for r in order if loads.get(r, 0) >= bound]
    return [[r] for r in under + over]
