"""Typed training configuration (Hydra structured configs).

The top-level config composed from ``configs/train.yaml`` is::

    model:  a preset from configs/model/ (validated by newtonlm.models: unknown fields are errors)
    data:   configs/data/ (newtonlm.data.DataConfig schema)
    train:  TrainConfig (below)
    wandb:  WandbConfig (below)

``TrainConfig`` and ``WandbConfig`` are registered in Hydra's ConfigStore (``train/schema``,
``wandb/schema``), so a misspelled ``train.*`` / ``wandb.*`` key or a wrongly typed value is an error
at composition, before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("fp32", "bf16")
RESUME = ("auto", "none")


@dataclass
class TrainConfig:
    """Training settings (every field is a ``train.<name>=...`` override).

    Length: ``max_steps`` optimizer steps, or ``max_tokens`` (when > 0, the step count is
    ``ceil(max_tokens / tokens_per_step)`` and overrides ``max_steps``).
    Batch: ``micro_batch_size`` sequences of ``seq_len`` tokens per rank and micro-step,
    ``grad_accum`` micro-steps per optimizer step (tokens per step = mbs * seq_len * grad_accum *
    world size). The loss of a step is the mean over all target tokens of the step on all ranks.
    Optimizer: AdamW (``lr``, ``betas``, ``eps``, ``weight_decay``; no decay on norms, biases and
    embeddings), ``grad_clip`` (0 disables). Schedule: linear warmup for ``warmup_steps`` (or
    ``warmup_frac`` of the run when warmup_steps < 0), then ``cosine`` to ``min_lr_ratio * lr``,
    ``wsd`` (warmup-stable-decay: constant, then a ``decay_frac`` tail to ``min_lr_ratio * lr``), or
    ``constant``. Schedules come from transformers.optimization.
    Engine: DeepSpeed on every path. ``zero_stage`` 0-3, ``offload_optimizer`` (ZeRO >= 1; CPU Adam
    is compiled on first use), ``precision`` fp32 or bf16 (DeepSpeed's torch_autocast: weights stay
    fp32), ``activation_checkpointing`` (per block), ``compile`` (torch.compile through the engine).
    Checkpoints: every ``save_every`` steps and at the end, the last ``keep_last`` kept;
    ``resume=auto`` continues from the newest complete checkpoint in the run directory (``none``
    starts over; refused if the run directory already holds checkpoints, unless ``overwrite``).
    Validation every ``eval_every`` steps (0: only at the end). Robustness: a step whose loss or
    gradient is not finite is skipped; ``max_consecutive_skips`` in a row stop the run with a
    checkpoint of the last good state. ``dist_timeout_s``: collectives fail after this long, so a
    dead rank does not hang the others. ``deepspeed_shm_comm``: DeepSpeed's shared-memory CPU
    all-reduce (compiled on first use; off by default: gloo is used).
    """

    seed: int = 1234
    max_steps: int = 300
    max_tokens: int = 0
    seq_len: int = 256
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = -1
    warmup_frac: float = 0.1
    schedule: str = "cosine"
    decay_frac: float = 0.2
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    zero_stage: int = 0
    offload_optimizer: bool = False
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    save_every: int = 100
    keep_last: int = 2
    resume: str = "auto"
    overwrite: bool = False
    eval_every: int = 100
    log_every: int = 1
    max_consecutive_skips: int = 5
    dist_timeout_s: int = 600
    deepspeed_shm_comm: bool = False
    sample_tokens: int = 120
    sample_prompt: str = "ROMEO:"
    progress: bool = True
    peak_flops: float = 0.0  # per device, for MFU; 0: measured (CPU matmul) or looked up (GPU)
    # test hook: make the loss of these steps NaN (exercises the skip path)
    inject_nan_steps: tuple[int, ...] = ()


@dataclass
class WandbConfig:
    """Weights & Biases logging, never required. ``mode``: offline (default: files under the run
    directory, sync later with ``wandb sync``), online (needs an account/API key), disabled."""

    mode: str = "offline"
    project: str = "newtonlm"
    entity: str | None = None
    name: str | None = None
    tags: tuple[str, ...] = ()


def register_schemas() -> None:
    """Register the train/wandb schemas (and, by importing it, newtonlm.data's data/schema)."""
    from .. import data  # noqa: F401  (registers data/schema)

    cs = ConfigStore.instance()
    cs.store(group="train", name="schema", node=TrainConfig)
    cs.store(group="wandb", name="schema", node=WandbConfig)


def load_settings(cfg) -> tuple[TrainConfig, WandbConfig]:
    """The composed ``train`` and ``wandb`` nodes as dataclasses. Keys forced in with Hydra's
    ``+train.key=...`` bypass the schema, so unknown keys are checked here too."""
    from omegaconf import OmegaConf

    out = []
    for section, cls in (("train", TrainConfig), ("wandb", WandbConfig)):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg[section].keys()) - known)
        if unknown:
            close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            hints = ", ".join(f"{section}.{k}" + (f" (did you mean {section}.{c[0]}?)" if c else "")
                              for k, c in close.items())
            raise ValueError(f"unknown setting(s) {hints}; the fields are documented in "
                             f"newtonlm/training/config.py ({cls.__name__})")
        out.append(OmegaConf.to_object(cfg[section]))
    return out[0], out[1]


def validate(train: TrainConfig, wandb: WandbConfig, world_size: int) -> None:
    """Value checks the types cannot express: raise ValueError naming the key and what is expected."""
    def need(cond, key, value, expected):
        if not cond:
            raise ValueError(f"train.{key}={value!r}; expected {expected}")

    for key in ("max_steps", "seq_len", "micro_batch_size", "grad_accum", "save_every", "keep_last",
                "log_every", "max_consecutive_skips", "dist_timeout_s"):
        v = getattr(train, key)
        need(isinstance(v, int) and v > 0, key, v, "a positive integer")
    for key in ("max_tokens", "eval_every", "sample_tokens"):
        v = getattr(train, key)
        need(isinstance(v, int) and v >= 0, key, v, "an integer >= 0")
    need(train.lr > 0, "lr", train.lr, "> 0")
    need(0 <= train.min_lr_ratio <= 1, "min_lr_ratio", train.min_lr_ratio, "in [0, 1]")
    need(0 <= train.warmup_frac < 1, "warmup_frac", train.warmup_frac, "in [0, 1)")
    need(0 < train.decay_frac <= 1, "decay_frac", train.decay_frac, "in (0, 1]")
    need(train.schedule in SCHEDULES, "schedule", train.schedule, f"one of {SCHEDULES}")
    need(train.precision in PRECISIONS, "precision", train.precision, f"one of {PRECISIONS}")
    need(train.resume in RESUME or re.fullmatch(r"step_\d{8}", train.resume), "resume", train.resume,
         f"one of {RESUME} or a checkpoint tag such as step_00000100")
    need(train.zero_stage in (0, 1, 2, 3), "zero_stage", train.zero_stage, "0, 1, 2 or 3")
    need(not (train.offload_optimizer and train.zero_stage == 0), "offload_optimizer",
         train.offload_optimizer, "False with zero_stage=0 (offload needs ZeRO >= 1)")
    need(train.grad_clip >= 0, "grad_clip", train.grad_clip, ">= 0")
    need(train.weight_decay >= 0, "weight_decay", train.weight_decay, ">= 0")
    if wandb.mode not in ("offline", "online", "disabled"):
        raise ValueError(f"wandb.mode={wandb.mode!r}; expected offline, online or disabled")
    assert world_size >= 1
