"""Optimizer, parameter groups, learning-rate schedules and the DeepSpeed config."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_wsd_schedule,
)

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices of Linear-like layers only; none on norms, biases,
    embeddings, and the recurrent cell vectors (A, C, b: per-channel gains and biases)."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_matrix = p.dim() >= 2 and leaf not in ("A", "C", "b")
        if is_matrix and id(p) not in embeddings and "norm" not in name.lower():
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that refuses a step on non-finite gradients, the way DeepSpeed's ZeRO optimizers do:
    it sets ``overflow`` (the engine then counts a skipped step and holds the schedule) and leaves
    the weights and moments untouched. With ZeRO >= 1 DeepSpeed wraps the optimizer and does this
    check itself; this class gives ZeRO stage 0 the same behaviour, and clips there (``max_norm``)
    so that the reported gradient norm is the one before clipping."""

    def __init__(self, params, max_norm: float = 0.0, **kw):
        super().__init__(params, **kw)
        self.max_norm = max_norm
        self.overflow = False
        self.last_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.last_grad_norm = norm.item()
        self.overflow = not math.isfinite(self.last_grad_norm)
        if self.overflow:
            return None
        if self.max_norm > 0 and self.last_grad_norm > self.max_norm:
            torch._foreach_mul_(grads, self.max_norm / (self.last_grad_norm + 1e-6))
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.zero_stage == 0:
        return SkippingAdamW(groups, max_norm=cfg.grad_clip, **kw)
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps >= 0:
        return min(cfg.warmup_steps, total_steps)
    return int(cfg.warmup_frac * total_steps)


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup, then cosine to min_lr_ratio * lr, warmup-stable-decay, or constant."""
    warm = warmup_steps(cfg, total_steps)
    if cfg.schedule == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warm, num_training_steps=total_steps,
            min_lr_rate=cfg.min_lr_ratio)
    if cfg.schedule == "wsd":
        decay = max(1, int(cfg.decay_frac * total_steps))
        return get_wsd_schedule(optimizer, num_warmup_steps=warm, num_decay_steps=decay,
                                num_training_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio,
                                decay_type="cosine")
    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warm)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config generated from the training config."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        # stage 0: SkippingAdamW clips (to report the norm before clipping); ZeRO: DeepSpeed clips
        "gradient_clipping": cfg.grad_clip if cfg.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if cfg.precision == "bf16":
        # autocast keeps fp32 master weights in the modules (what RNN and SSM recurrences want)
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return ds
