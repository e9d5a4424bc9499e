"""LLaVA-format training data: `[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]`.

Each example becomes token ids with loss only on the assistant's answers, plus the image's pixels.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from medlava.chat.image_processing import ImageProcessing, preprocess
from medlava.chat.templates import IMAGE_PLACEHOLDER, Template
from medlava.chat.tokenize import tokenize_prompt
from medlava.errors import MedlavaError
from medlava.imaging import load_study

IGNORE = -100  # label of positions that carry no loss


def conversation_turns(conversations: list[dict]) -> list[str]:
    """Alternating user/assistant texts with the image placeholder moved to the front, as LLaVA does."""
    roles = [c["from"] for c in conversations]
    if not roles or roles[0] != "human" or any(r != ("human", "gpt")[i % 2] for i, r in enumerate(roles)):
        raise MedlavaError("conversations must alternate human/gpt turns, starting with human")
    turns = [c["value"].replace(IMAGE_PLACEHOLDER, "").strip() if i % 2 == 0 else c["value"]
             for i, c in enumerate(conversations)]
    turns[0] = f"{IMAGE_PLACEHOLDER}\n{turns[0]}"
    return turns


def shuffle_pairs(conversations: list[dict], rng: random.Random) -> list[dict]:
    """The same question/answer pairs in another order, so no answer can lean on its position."""
    pairs = [conversations[i : i + 2] for i in range(0, len(conversations), 2)]
    rng.shuffle(pairs)
    return [turn for pair in pairs for turn in pair]


def encode_conversation(
    tokenizer, template: Template, turns: list[str], image_token_id: int, image_tokens: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels copy the ids of each answer (and its end-of-turn), else IGNORE."""
    def ids(n_turns: int) -> list[int]:
        return tokenize_prompt(tokenizer, template.render(turns[:n_turns]), image_token_id, image_tokens)

    input_ids = ids(len(turns))
    labels = [IGNORE] * len(input_ids)
    for answer in range(1, len(turns), 2):
        start, end = len(ids(answer)), len(ids(answer + 1))
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


@dataclass
class Example:
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixels: torch.Tensor


class LlavaJsonDataset(Dataset):
    """Reads a LLaVA JSON and its image folder; images are decoded once and kept in memory."""

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path,
        tokenizer,
        template: Template,
        processing: ImageProcessing,
        image_token_id: int,
        image_tokens: int,
        max_len: int = 512,
        shuffle_turns: bool = False,
        seed: int = 0,
    ):
        self.records = json.loads(Path(json_path).read_text())
        self.image_folder = Path(image_folder)
        self.args = (tokenizer, template, image_token_id, image_tokens)
        self.processing, self.max_len = processing, max_len
        self.shuffle_turns, self.seed = shuffle_turns, seed
        self.epoch = 0  # set by the trainer: shuffled turn orders differ per epoch, reproducibly
        self._pixels: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, image: str) -> torch.Tensor:
        if image not in self._pixels:
            study = load_study(self.image_folder / image)
            self._pixels[image] = preprocess(study.key_image(), self.processing)
        return self._pixels[image]

    def __getitem__(self, i: int) -> Example:
        record = self.records[i]
        conversations = record["conversations"]
        if self.shuffle_turns:
            conversations = shuffle_pairs(conversations, random.Random(f"{self.seed}/{self.epoch}/{i}"))
        ids, labels = encode_conversation(*self.args[:2], conversation_turns(conversations), *self.args[2:])
        ids, labels = ids[: self.max_len], labels[: self.max_len]
        return Example(torch.tensor(ids), torch.tensor(labels), self.pixels(record["image"]))


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (causal attention never looks right, so no mask is needed)."""
    length = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        input_ids[row, : len(e.input_ids)] = e.input_ids
        labels[row, : len(e.labels)] = e.labels
    return {"input_ids": input_ids, "labels": labels, "pixels": torch.stack([e.pixels for e in batch])}
