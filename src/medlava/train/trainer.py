"""LLaVA's two training stages on any LLaVA-format JSON + image folder.

Stage `align` trains only the projector (feature alignment on caption pairs); stage `instruct`
trains projector + decoder (optionally the vision tower, or LoRA adapters instead of the full
decoder). Loss falls only on answer tokens. AdamW, linear warm-up then cosine decay, gradient
accumulation, checkpoints that resume exactly where they stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from medlava.chat.templates import get_template
from medlava.model.convert import save_hf
from medlava.model.loader import LoadedModel, load_model
from medlava.train.augment import random_intensity
from medlava.train.dataset import IGNORE, LlavaJsonDataset, collate
from medlava.train.lora import add_lora, merge_lora

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainSettings:
    data: Path
    image_folder: Path
    model: Path
    out: Path
    stage: str = "instruct"  # "align" or "instruct"
    train_vision: bool = False
    lora_rank: int = 0  # > 0: LoRA adapters on the decoder instead of full fine-tuning
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_len: int = 512
    shuffle_turns: bool = False  # present each conversation's Q/A pairs in a new order every epoch
    intensity_jitter: float = 0.0  # scale image intensities by up to 1 + this either way (train/augment.py)
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only the final model
    seed: int = 0
    conv_mode: str | None = None  # default: the model's own template
    vision_tower: Path | None = None
    progress: bool = True


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0


def trainable_parameters(lm: LoadedModel, s: TrainSettings) -> list[torch.nn.Parameter]:
    model = lm.model
    model.requires_grad_(False)
    params = list(model.projector.parameters())
    if s.stage == "instruct":
        if s.lora_rank > 0:
            params += add_lora(model.decoder, s.lora_rank)
        else:
            params += list(model.decoder.parameters()) + list(model.lm_head.parameters())
        if s.train_vision:
            params += list(model.vision_tower.parameters())
    elif s.stage != "align":
        raise ValueError(f"unknown stage {s.stage!r}; use 'align' or 'instruct'")
    unique = list({id(p): p for p in params}.values())  # a tied head appears twice
    for p in unique:
        p.requires_grad_(True)
    return unique


def lr_lambda(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def lm_loss(lm: LoadedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    logits = lm.model(batch["input_ids"], pixels=batch["pixels"])
    labels = batch["labels"][:, 1:]
    n = int((labels != IGNORE).sum())
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    return loss, n


def train(s: TrainSettings) -> TrainResult:
    torch.manual_seed(s.seed)
    lm = load_model(s.model, vision_tower=s.vision_tower, dtype="float32")
    if s.conv_mode:
        lm.conv_mode = s.conv_mode
    params = trainable_parameters(lm, s)
    cfg = lm.config
    data = LlavaJsonDataset(
        s.data, s.image_folder, lm.tokenizer, get_template(lm.conv_mode), lm.image_processing,
        cfg.image_token_id, cfg.image_tokens, s.max_len, s.shuffle_turns, s.seed,
    )
    per_epoch = math.ceil(len(data) / s.batch_size)
    total = s.max_steps or max(1, math.ceil(s.epochs * per_epoch / s.grad_accum))
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, int(total * s.warmup_ratio)))
    s.out.mkdir(parents=True, exist_ok=True)
    step, losses = resume(s.out, lm, optimizer, scheduler)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0

    lm.model.train()
    tokens, started = 0, time.perf_counter()
    with _progress(s.progress, total, step) as advance:
        while step < total:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(s.grad_accum):
                index = step * s.grad_accum + micro
                data.epoch = index // per_epoch
                order = batch_order(len(data), s.batch_size, s.seed, data.epoch)
                batch = collate([data[i] for i in order[index % per_epoch]], pad_id)
                batch["pixels"] = random_intensity(
                    batch["pixels"], s.intensity_jitter, lm.image_processing, s.seed * 1_000_003 + index
                )
                loss, n = lm_loss(lm, batch)
                (loss / s.grad_accum).backward()
                step_loss += loss.item() / s.grad_accum
                tokens += int(batch["input_ids"].numel())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(step_loss)
            rate = tokens / (time.perf_counter() - started)
            advance(f"loss {step_loss:.4f} · {rate:,.0f} tok/s")
            if s.save_every and step % s.save_every == 0 and step < total:
                save_checkpoint(s.out, lm, optimizer, scheduler, step, losses)
    lm.model.eval()
    merge_lora(lm.model)
    save_hf(lm, s.out)
    (s.out / STATE_FILE).unlink(missing_ok=True)  # finished: the folder is now just a model
    (s.out / "train_log.json").write_text(
        json.dumps({"settings": {k: str(v) for k, v in asdict(s).items()}, "losses": losses}, indent=1)
    )
    return TrainResult(s.out, step, losses, tokens / max(1e-9, time.perf_counter() - started))


def save_checkpoint(out: Path, lm, optimizer, scheduler, step: int, losses: list[float]) -> None:
    state = {
        "model": lm.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "losses": losses,
        "rng": torch.get_rng_state(),
    }
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / STATE_FILE)  # never leave a half-written checkpoint behind


def resume(out: Path, lm, optimizer, scheduler) -> tuple[int, list[float]]:
    """Continue from `out/trainer_state.pt` if an earlier run left one; else start at step 0."""
    path = out / STATE_FILE
    if not path.is_file():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=False)
    lm.model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"], list(state["losses"])


class _progress:
    """A rich progress bar with loss and throughput; plain lines every ~2 % when not on a terminal."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self):
        if not self.enabled:
            return lambda text: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if not Console().is_terminal:  # a log file: a live bar would print nothing until the end
            every = max(1, self.total // 50)

            def log(text: str) -> None:
                self.done += 1
                if self.done % every == 0 or self.done == self.total:
                    print(f"step {self.done}/{self.total} {text}", flush=True)

            self.bar = None
            return log
        self.bar = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        task = self.bar.add_task("", total=self.total, completed=self.done)
        return lambda text: self.bar.update(task, advance=1, description=text)

    def __exit__(self, *exc):
        if self.enabled and self.bar is not None:
            self.bar.stop()
