"""Train a small model on a synthetic task and measure its accuracy at any sequence length.

Plain PyTorch in-process (these models have tens of thousands of parameters; the DeepSpeed
pretraining job is not needed): AdamW, linear warmup then cosine decay to 10%, gradient clipping,
cross-entropy on the scored positions only. Each step draws a fresh batch of one length, uniform in
``[min_len, max_len]`` (or, during a length curriculum, in ``[min_len, curriculum_max_len(step)]``),
from :func:`tasks.batch_rng` (seed, task, step), so a run is reproducible.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from newtonlm.models import build_model

from ..sizes import SizeConfig, model_fields
from .tasks import IGNORE, TaskConfig, batch_rng, generate, min_length, vocab_size


@dataclass
class TrainSettings:
    """``steps`` optimizer steps of ``batch_size`` sequences, lengths uniform in ``[min_len,
    max_len]``; AdamW (``lr``, ``weight_decay``), ``warmup_steps`` then cosine to 0.1 x lr
    (:func:`lr_schedule`), ``grad_clip`` (0: off); ``curriculum_steps`` (0: off): the longest
    length grows linearly from ``min_len`` to ``max_len`` over these first steps
    (:func:`curriculum_max_len`)."""

    steps: int = 1000
    batch_size: int = 16
    min_len: int = 8
    max_len: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    curriculum_steps: int = 0


def curriculum_max_len(settings: TrainSettings, step: int) -> int:
    """The longest length drawn at ``step`` (0-based): ``min_len + (max_len - min_len) * (step + 1) //
    curriculum_steps`` during the curriculum, ``max_len`` after it (and without one)."""
    s = settings
    if step >= s.curriculum_steps:
        return s.max_len
    return s.min_len + (s.max_len - s.min_len) * (step + 1) // s.curriculum_steps


def _scored_loss(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over scored positions, predictions [B, L])."""
    logits = model(input_ids=x, use_cache=False).logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)
    return loss, logits.argmax(-1)


def lr_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings):
    """Step k's rate: ``lr * k / warmup_steps`` during the warmup, then cosine from ``lr`` to 0.1 x
    ``lr`` at ``steps`` (a warmup longer than the run never reaches ``lr``). The trainer's cosine
    schedule (``optim.build_scheduler`` with ``min_lr_ratio=0.1``), taken from transformers directly:
    evaluation does not import training."""
    if settings.warmup_steps < 0:
        raise ValueError(f"warmup_steps={settings.warmup_steps}; expected an integer >= 0")
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.steps, min_lr_rate=0.1)


def train_model(task: str, task_cfg: TaskConfig, arch: str, size: SizeConfig, settings: TrainSettings,
                seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """A model of ``arch`` (``size``) trained on ``task``; returns (model in eval mode, info with
    ``parameters``, ``final_loss`` (mean of the last 20 steps), ``nonfinite_steps`` (steps whose loss
    was NaN or inf: a diverged or broken run), ``seconds``)."""
    s = settings
    if not min_length(task, task_cfg) <= s.min_len <= s.max_len:
        raise ValueError(f"min_len={s.min_len}, max_len={s.max_len}; expected {min_length(task, task_cfg)} "
                         f"<= min_len <= max_len for task {task!r}")
    if s.steps < 1 or s.batch_size < 1:
        raise ValueError(f"steps={s.steps}, batch_size={s.batch_size}; expected positive integers")
    if not 0 <= s.curriculum_steps <= s.steps:
        raise ValueError(f"curriculum_steps={s.curriculum_steps}; expected an integer in "
                         f"[0, steps={s.steps}]")
    torch.manual_seed(seed)
    model = build_model(model_fields(size, arch), vocab_size(task, task_cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=s.weight_decay)
    sched = lr_schedule(opt, s)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(s.steps):
        rng = batch_rng(seed, task, 0, step)
        length = int(rng.integers(s.min_len, curriculum_max_len(s, step) + 1))
        x, y = (torch.from_numpy(a) for a in generate(task, task_cfg, s.batch_size, length, rng))
        loss, _ = _scored_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-20:]
    return model, {"parameters": sum(p.numel() for p in model.parameters()),
                   "final_loss": sum(tail) / len(tail),
                   "nonfinite_steps": sum(not math.isfinite(v) for v in losses),
                   "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(model, task: str, task_cfg: TaskConfig, length: int, samples: int, seed: int = 0,
             batch_size: int = 64) -> dict:
    """Accuracy on ``samples`` fresh sequences of ``length`` (:func:`tasks.batch_rng` purpose 1):
    ``acc`` over scored positions, ``seq_acc`` (every scored position of a sequence right),
    ``last_acc`` (the last scored position: the whole-sequence answer for parity / modcount)."""
    rng = batch_rng(seed, task, 1, length)
    right = scored = seq_right = last_right = 0
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        x, y = (torch.from_numpy(a) for a in generate(task, task_cfg, n, length, rng))
        _, pred = _scored_loss(model, x, y)
        mask = y != IGNORE
        ok = (pred == y) & mask
        right += int(ok.sum())
        scored += int(mask.sum())
        seq_right += int((ok | ~mask).all(dim=1).sum())
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(dim=1)  # index of the last scored position
        last_right += int(ok[torch.arange(n), last].sum())
    return {"length": length, "acc": right / scored, "seq_acc": seq_right / samples,
            "last_acc": last_right / samples, "samples": samples}
