"""Typed training configuration (Hydra structured configs).

The top-level config composed from ``configs/train.yaml`` is::

    model:  a preset from configs/model/ (validated by newtonlm.models: unknown fields are errors)
    data:   configs/data/ (newtonlm.data.DataConfig schema)
    train:  TrainConfig (below)
    wandb:  WandbConfig (below)

``TrainConfig`` and ``WandbConfig`` are registered in Hydra's ConfigStore (``train/schema``,
``wandb/schema``), so a misspelled ``train.*`` / ``wandb.*`` key or a wrongly typed value is an error
at composition, before anything runs.

The checks ``python -m newtonlm.training.train`` runs before importing torch (each raises
:class:`~newtonlm.training.errors.UserError` or newtonlm.data's ``DataError`` with one message):
:func:`compose_train_config` (Hydra's composition errors, as a "did you mean" for misspelled keys
and options), :func:`check_run_dir`, :func:`check_job` (:func:`load_settings`, :func:`validate`,
the data config and the paths it names).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore

from ..paths import CONFIG_DIR
from .errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("fp32", "bf16")
RESUME = ("auto", "none")


@dataclass
class TrainConfig:
    """Training settings (every field is a ``train.<name>=...`` override).

    Length: ``max_steps`` optimizer steps, or ``max_tokens`` (when > 0, the step count is
    ``ceil(max_tokens / tokens_per_step)`` and overrides ``max_steps``).
    Batch: an optimizer step takes ``global_batch_size`` sequences of ``seq_len`` tokens, whatever
    the number of ranks (tokens per step = global_batch_size * seq_len); each rank runs
    ``grad_accum`` micro-steps of ``micro_batch_size`` sequences, derived from it and the world
    size by :func:`batch_plan` (``micro_batch_size`` is then the upper bound per rank). With
    ``global_batch_size`` 0 (the default) the global batch is ``micro_batch_size * grad_accum *
    world size`` of the run's first start, recorded in its checkpoints and kept on every resume
    (on another world size too). There is no token-denominated setting: a run's ``seq_len`` is
    fixed, so tokens per step = global_batch_size * seq_len. The loss of a step is the mean over
    all its target tokens.
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
    Sequence parallelism: ``sequence_parallel`` K > 1 arranges the world W as W / K data-parallel
    groups of K consecutive ranks; the K ranks of a group read the same sequences and each trains
    on its chunk of the time axis (docs/sequence_parallel.md). The batch settings count
    data-parallel groups, not ranks. K is a layout: checkpoints are the same and a run resumes
    with another K. ParaGRU/ParaLSTM and Llama only; with ``compile`` refused.
    """

    seed: int = 1234
    max_steps: int = 300
    max_tokens: int = 0
    seq_len: int = 256
    global_batch_size: int = 0  # sequences per optimizer step; 0: micro_batch_size * grad_accum * world
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
    sequence_parallel: int = 1  # K: ranks that split each sequence along time (W = data-parallel x K)
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
            raise UserError(f"unknown setting(s) {hints}; the fields are documented in "
                            f"newtonlm/training/config.py ({cls.__name__})")
        out.append(OmegaConf.to_object(cfg[section]))
    return out[0], out[1]


def validate(train: TrainConfig, wandb: WandbConfig, world_size: int) -> None:
    """Value checks the types cannot express: raise UserError naming the key and what is expected."""
    def need(cond, key, value, expected):
        if not cond:
            raise UserError(f"train.{key}={value!r}; expected {expected}")

    for key in ("max_steps", "seq_len", "micro_batch_size", "grad_accum", "save_every", "keep_last",
                "log_every", "max_consecutive_skips", "dist_timeout_s", "sequence_parallel"):
        v = getattr(train, key)
        need(isinstance(v, int) and v > 0, key, v, "a positive integer")
    for key in ("max_tokens", "eval_every", "sample_tokens", "global_batch_size"):
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
        raise UserError(f"wandb.mode={wandb.mode!r}; expected offline, online or disabled")
    assert world_size >= 1
    check_sequence_parallel(train, world_size)
    if train.global_batch_size:  # (a recorded one is checked when the trainer reads it)
        batch_plan(train, world_size)


def check_sequence_parallel(train: TrainConfig, world_size: int) -> None:
    """The sequence-parallel settings a model-free check can judge (the model's own limits, heads
    and convolution halo, are checked by the trainer with newtonlm.models.check_sequence_parallel
    before any work): K divides the world size, every chunk gets a step, no torch.compile."""
    K = train.sequence_parallel
    if world_size % K:
        raise UserError(f"train.sequence_parallel={K} does not divide the world size {world_size}; "
                        f"expected a divisor of it (world = data-parallel groups x {K} ranks)")
    if train.seq_len < K:
        raise UserError(f"train.seq_len={train.seq_len} cannot be split over train.sequence_parallel={K} "
                        f"ranks; expected seq_len >= {K} (at least one token per rank)")
    if K > 1 and train.compile:
        raise UserError(f"train.compile=true with train.sequence_parallel={K}: torch.compile around the "
                        "cross-rank exchanges is not supported here; expected train.compile=false")


@dataclass(frozen=True)
class BatchPlan:
    """How an optimizer step's ``global_batch`` sequences are spread: ``world`` data-parallel
    groups (ranks, without sequence parallelism), each running ``grad_accum`` micro-steps of
    ``micro_batch`` sequences (global_batch = world * grad_accum * micro_batch); each sequence
    split over the ``sequence_parallel`` ranks of its group."""

    global_batch: int
    micro_batch: int
    grad_accum: int
    world: int
    sequence_parallel: int = 1

    def describe(self) -> str:
        who = (f"{self.world} rank{'s' if self.world > 1 else ''}" if self.sequence_parallel == 1 else
               f"{self.world} data-parallel group{'s' if self.world > 1 else ''} (each sequence split "
               f"over {self.sequence_parallel} ranks)")
        return (f"global batch {self.global_batch} sequences = {who} x {self.grad_accum} micro-step"
                f"{'s' if self.grad_accum > 1 else ''} x {self.micro_batch}")


def batch_plan(train: TrainConfig, world_size: int, recorded: int | None = None) -> BatchPlan:
    """The batch of each optimizer step and its split over ``world_size`` ranks.

    The global batch G is ``train.global_batch_size`` when set, else the run's ``recorded`` one (its
    checkpoints', when resuming), else ``micro_batch_size * grad_accum * world_size``. Each rank
    takes G / world_size sequences per step, in micro-batches of the largest size that is at most
    ``train.micro_batch_size`` and divides G / world_size; ``grad_accum`` follows. UserError when G
    does not divide over the ranks. With ``train.sequence_parallel`` K, the batch is spread over
    the ``world_size / K`` data-parallel groups (the K ranks of a group share its sequences)."""
    K = train.sequence_parallel
    check_sequence_parallel(train, world_size)
    world_size //= K
    G = train.global_batch_size or recorded or train.micro_batch_size * train.grad_accum * world_size
    if G % world_size:
        source = ("train.global_batch_size" if train.global_batch_size else
                  "the run's global batch (recorded in its checkpoints)" if recorded else "the global batch")
        raise UserError(f"{source}={G} sequences per step does not divide over {world_size} "
                        f"{'ranks' if K == 1 else 'data-parallel groups'} "
                        f"(train.micro_batch_size={train.micro_batch_size}); expected a multiple of the "
                        "world size: run on a number of ranks that divides it, or set "
                        "train.global_batch_size (a new run)")
    per_rank = G // world_size
    micro = next(m for m in range(min(train.micro_batch_size, per_rank), 0, -1) if per_rank % m == 0)
    return BatchPlan(global_batch=G, micro_batch=micro, grad_accum=per_rank // micro, world=world_size,
                     sequence_parallel=K)


# ---- checks before the heavy imports (python -m newtonlm.training.train) -------------------------

# Where the settings of each top-level section are documented, for "no such setting" messages.
_SETTINGS_DOCS = {
    "train": "newtonlm/training/config.py (TrainConfig)",
    "wandb": "newtonlm/training/config.py (WandbConfig)",
    "data": "newtonlm/data/config.py (DataConfig) and docs/data.md",
    "model": "configs/model/*.yaml and docs/models.md",
    "hydra": "Hydra's documentation; `--cfg hydra` prints them",
}


def _did_you_mean(name: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def composition_error(exc: Exception, overrides: list[str] = ()) -> UserError:
    """One message for an error Hydra raised while composing the configuration from ``overrides``:
    a misspelled key or option gets a "did you mean" from the names the configuration has, in place
    of Hydra's hint to append the key with ``+`` (which a typed section refuses anyway)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = exc.__cause__
    if isinstance(exc, MissingConfigException) and exc.options is not None:  # an unknown option
        group, _, name = str(exc.missing_cfg_file).rpartition("/")
        options = [o for o in exc.options if o != "schema"]  # the schemas are not choices
        return UserError(f"{group}={name}: no such option{_did_you_mean(name, options, group + '=')}; "
                         f"the options of {group}: {', '.join(options)}")
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.parent_node is not None:
        key = cause.full_key or str(cause.key)
        parent, _, name = key.rpartition(".")
        prefix = parent + "." if parent else ""
        known = list(cause.parent_node.keys())
        section = key.split(".")[0]
        guess = _did_you_mean(name, known, prefix)
        if section == "model" and parent:  # a preset's fields are a subset of the architecture's config
            line = next((o for o in overrides if o.startswith(key + "=")), f"{key}=...")
            return UserError(f"{key}: the model preset has no such field{guess}; a field of the "
                             "architecture's transformers config that the preset does not set is added "
                             f"with +{line} (presets: {_SETTINGS_DOCS['model']})")
        where = (f"the {section} settings are documented in {_SETTINGS_DOCS.get(section, 'configs/')}"
                 if parent else f"the top-level sections are {', '.join(known)}")
        return UserError(f"{key}: no such setting{guess}; {where}; "
                         "`python -m newtonlm.training.train --cfg job` prints the whole configuration")
    message = str(exc).strip()
    if cause is not None:  # OmegaConf's first line says what is wrong with the value
        message += ": " + str(cause).strip().splitlines()[0]
    return UserError(message)


def compose_train_config(overrides: list[str]):
    """The configuration ``python -m newtonlm.training.train *overrides`` composes (Hydra's compose
    API on the same config folder, the ``hydra`` node included and its run directory resolved), or a
    :class:`UserError` from :func:`composition_error`. Sweeps (``a=1,2`` with ``--multirun``) must be
    reduced to one value first."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, read_write
    from omegaconf.errors import OmegaConfBaseException

    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise composition_error(exc, list(overrides)) from exc
    hydra_config = HydraConfig.instance()
    hydra_config.set_config(cfg)  # the ${hydra:...} interpolations of hydra.run.dir read it
    try:
        with read_write(cfg.hydra):
            OmegaConf.resolve(cfg.hydra.run)
    except OmegaConfBaseException as exc:
        raise UserError(f"hydra.run.dir={OmegaConf.to_container(cfg.hydra.run)['dir']!r}: {exc}") from exc
    finally:
        hydra_config.cfg = None  # hydra.main sets its own
    return cfg


def check_run_dir(run_dir: str | os.PathLike) -> None:
    """Raise UserError when the run directory cannot be a writable folder: it or a parent is a
    file, or the nearest existing folder is not writable."""
    path = Path(run_dir)
    for p in (path, *path.parents):
        if not p.exists():
            continue
        if not p.is_dir():
            raise UserError(f"hydra.run.dir={str(run_dir)!r}: {p} is a file, so the run directory cannot be "
                            "created there; choose another hydra.run.dir")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"hydra.run.dir={str(run_dir)!r}: {p} is not writable; choose another "
                            "hydra.run.dir")
        return


def check_job(cfg, world_size: int = 1) -> None:
    """Every check of a composed configuration ``cfg`` that needs no heavy import: the settings
    (:func:`load_settings`, :func:`validate`), the data config, and the paths it names (data files
    and globs, the shards folder, a pretrained tokenizer folder). Raises UserError or DataError."""
    from ..data import DataError, load_data_config
    from ..data.sources import resolve_files
    from ..data.tokenizer import missing_tokenizer_folder

    validate(*load_settings(cfg), world_size)
    data = load_data_config(cfg.data)
    if data.format == "shards":
        if not Path(data.shards_dir).is_dir():
            raise DataError(f"data.shards_dir={data.shards_dir!r} does not exist; write the shards first "
                            "(python -m newtonlm.data.prepare with the same data settings) or use "
                            "data.format=stream")
    else:
        for name, source in data.sources.items():
            if source.kind != "files":  # bundled corpora and hub datasets name no local path
                continue
            try:
                resolve_files(source)
            except DataError as exc:
                raise DataError(f"data.sources.{name}.paths={list(source.paths)}: {exc}") from exc
    if data.tokenizer.pretrained and (missing := missing_tokenizer_folder(data.tokenizer.pretrained)):
        raise DataError(f"data.tokenizer.pretrained: {missing}")
