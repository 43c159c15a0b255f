"""Resuming a run: what a resume may change, the plan (which checkpoint, verified, its settings
compared with this run's), and the state a checkpoint restores besides DeepSpeed's (RNG streams, the
learning-rate schedule).

The decisions are pure functions of a run directory's checkpoints and settings
(:func:`resume_plan`, :func:`resume_differences`, :func:`check_resume_config`; unit-tested);
:func:`plan_resume` applies them to the checkpoint folder on rank 0 and shares the plan with every
rank, before anything is written into the run directory or the model is built (``loop.py``).

Elastic resume: a run may continue on another number of ranks. What stays is the global batch
(sequences per optimizer step, :func:`global_batch_of`; ``train.global_batch_size`` or the run's
first micro-batch x accumulation x world size), so the schedule, the token budget and
``metrics.jsonl`` are the same whatever the world size; the micro-batch and accumulation are
derived again (``config.batch_plan``). RNG streams: a rank resumed on the world size that saved
gets its own saved states back (exact); after a change of world size there is no saved stream for
a rank, so every rank's torch, Python and NumPy generators are seeded with :func:`rank_seed` of
(``train.seed``, step, rank). The models have no dropout by default and the shard loader's order is
global (not drawn from these generators), so the change of streams changes nothing a run computes
unless a model enables dropout.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch

from ..data import vocab_size_for_model
from ..data.tokenizer import load_tokenizer, max_token_id, tokenizer_fingerprint
from .checkpoint import MANIFEST_KEYS, CheckpointError, Checkpoints, tag_step
from .config import TrainConfig
from .distributed import broadcast_object
from .errors import UserError


class ResumeRefused(UserError):
    """The run directory cannot be resumed as asked (changed settings, unusable checkpoints, a
    conflicting request); raised before anything was written into it."""


@dataclass(frozen=True)
class ResumePlan:
    tag: str | None = None           # the checkpoint to resume from; None: start at step 0
    delete: tuple[str, ...] = ()     # checkpoint folders to delete, once the run is accepted
    error: str | None = None         # why the run must not start (raised on every rank)
    skipped: tuple[tuple[str, str], ...] = ()  # (tag, why) of newer unusable checkpoints passed over


# What a resume may change; every other setting of the resolved config must equal the checkpoint's
# (fnmatch patterns over the flattened keys). A key the checkpoint's config lacks (a setting added by
# a later newtonlm) is not compared.
RESUME_MAY_CHANGE = (
    # the length and the learning-rate schedule (the resumed steps follow the new ones: reschedule)
    "train.max_steps", "train.max_tokens", "train.lr", "train.schedule", "train.warmup_steps",
    "train.warmup_frac", "train.min_lr_ratio", "train.decay_frac", "train.grad_clip",
    # when to save, validate, log and stop; how the same math runs
    "train.save_every", "train.keep_last", "train.resume", "train.overwrite", "train.eval_every",
    "train.log_every", "train.max_consecutive_skips", "train.dist_timeout_s", "train.deepspeed_shm_comm",
    "train.activation_checkpointing", "train.compile", "train.sample_tokens", "train.sample_prompt",
    "train.progress", "train.peak_flops", "train.inject_nan_steps", "wandb.*",
    # how the global batch (compared on its own: global_batch) is split over the ranks, and each
    # sequence over the ranks of a sequence-parallel group (a layout: the checkpoint is the same)
    "train.micro_batch_size", "train.grad_accum", "train.sequence_parallel",
    # how the recurrence is solved, not what it computes
    "model.cell_mode", "model.newton_*",
    # validation size, tokenizer batching, the loader's workers (ResumableLoader.load_states re-maps
    # them); where the files are (the data-loader signature compares the files, the tokenizer's
    # fingerprint the tokenizer itself)
    "data.val_sequences", "data.tokenize_batch_docs", "data.num_workers", "data.shards_dir",
    "data.sources.*.paths", "data.tokenizer.*",
)
# compared by resume_differences itself (checkpoints before it was recorded imply it)
_COMPARED_APART = ("train.global_batch_size",)
# The parts of the data-loader signature (ResumableLoader.signature) compared on their own: the rest
# mirrors settings compared above (seq_len, seed, shuffling) or is the loader's layout, which
# ResumableLoader.load_states re-maps (world size, workers, micro-batch size)
_SIGNATURE_PARTS = {"sources": "data files (per source: type, name, fingerprint of the file names and sizes)"}
# settings whose change needs the schedule rebuilt after loading the checkpoint's optimizer state
SCHEDULE_KEYS = ("lr", "schedule", "warmup_steps", "warmup_frac", "min_lr_ratio", "decay_frac", "max_steps",
                  "max_tokens")


def resume_plan(checkpoints: dict[str, bool], cfg: TrainConfig, where: str = "checkpoints",
                unusable: dict[str, str] | None = None) -> ResumePlan:
    """What ``cfg.resume`` and ``cfg.overwrite`` mean for a run directory whose checkpoint folder
    ``where`` holds ``checkpoints`` (tag ``step_NNNNNNNN`` -> complete, i.e. has its marker), some of
    which are known to be ``unusable`` (tag -> why: failed verification or loading).

    auto: the newest usable complete checkpoint (newer unusable ones are ``skipped``), or a fresh
    start when there is none at all; an error when every complete one is unusable (never a silent
    fresh start). ``step_N``: that one, an error if it is not complete or unusable; later folders
    (which ``auto`` would pick next time) are deleted with ``overwrite``, else an error. none: a fresh
    start, refused while checkpoints exist unless ``overwrite`` (then they are deleted)."""
    unusable = unusable or {}
    tags = sorted(checkpoints, key=tag_step)
    complete = [t for t in tags if checkpoints[t]]
    if cfg.resume == "auto":
        usable = [t for t in complete if t not in unusable]
        tag = usable[-1] if usable else None
        skipped = tuple((t, unusable[t]) for t in complete
                        if t in unusable and (tag is None or tag_step(t) > tag_step(tag)))
        if tag is None and skipped:
            return ResumePlan(skipped=skipped, error=(
                f"{where} holds no usable checkpoint ("
                + "; ".join(f"{t}: {why}" for t, why in skipped) + "), and train.resume=auto does not "
                "silently start over: restore the files, or start over with train.resume=none "
                "train.overwrite=true (deletes them) or in another hydra.run.dir"))
        return ResumePlan(tag=tag, skipped=skipped)
    if cfg.resume.startswith("step_"):
        if cfg.resume in unusable:
            return ResumePlan(error=f"train.resume={cfg.resume}: checkpoint {where}/{cfg.resume} is "
                                    f"unusable: {unusable[cfg.resume]}; resume from another one (complete: "
                                    f"{', '.join(complete)}), or train.resume=auto (the newest usable one)")
        if not checkpoints.get(cfg.resume):
            what = "a partial folder (its save did not finish)" if cfg.resume in checkpoints else "no folder"
            return ResumePlan(error=f"train.resume={cfg.resume} but {where} holds {what} of that name; "
                                    f"complete checkpoints: {', '.join(complete) or 'none'}")
        newer = tuple(t for t in tags if tag_step(t) > tag_step(cfg.resume))
        if newer and not cfg.overwrite:
            return ResumePlan(error=f"train.resume={cfg.resume} but {where} also holds later checkpoints "
                                    f"({', '.join(newer)}) that the resumed run would overwrite and "
                                    "train.resume=auto would pick: add train.overwrite=true to delete them, "
                                    "or resume in another hydra.run.dir")
        return ResumePlan(tag=cfg.resume, delete=newer)
    if tags and not cfg.overwrite:
        return ResumePlan(error=f"{where} already holds checkpoints and train.resume=none: use "
                                "train.resume=auto, another hydra.run.dir, or train.overwrite=true")
    return ResumePlan(delete=tuple(tags))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value) -> str:
    return json.dumps(value, default=str)


_ABSENT = object()


def resume_differences(saved: dict, now: dict) -> list[str]:
    """Each way in which this run (``now``) differs from a checkpoint (``saved``) that a resume must
    not change, as ``"<setting> (<saved> in the checkpoint, <now> now)"``. Both are
    :func:`run_facts`-style dicts (a checkpoint's manifest); a fact the checkpoint lacks (older
    formats) is not compared. Settings: the config outside :data:`RESUME_MAY_CHANGE` (only
    ``model.arch`` when the architecture differs), the tokenizer (by fingerprint: also a change that
    keeps the model's vocabulary size), the data-loader signature's files, the global
    batch (:func:`global_batch_of`). The world size may change (an elastic resume: see
    :func:`elastic_problem` for what it cannot do)."""
    diffs = []
    old, new = _flatten(saved["config"]), _flatten(now["config"])
    arch_changed = old.get("model.arch", _ABSENT) != new.get("model.arch", _ABSENT)
    for key, value in old.items():
        if key in _COMPARED_APART or any(fnmatch(key, pattern) for pattern in RESUME_MAY_CHANGE):
            continue
        if arch_changed and key.startswith("model.") and key != "model.arch":
            continue
        current = new.get(key, _ABSENT)
        if current != value:
            shown = "absent" if current is _ABSENT else _show(current)
            diffs.append(f"{key} ({_show(value)} in the checkpoint, {shown} now)")
    if saved.get("tokenizer_fingerprint") and saved["tokenizer_fingerprint"] != now["tokenizer_fingerprint"]:
        def tok(facts):
            return (f"fingerprint {facts['tokenizer_fingerprint']}, {facts.get('tokenizer_size')} tokens, "
                    f"model vocabulary {facts.get('vocab_size')}")
        diffs.append(f"tokenizer ({tok(saved)} in the checkpoint; {tok(now)} now)")
    if saved.get("data_signature") and now.get("data_signature"):
        for part, label in _SIGNATURE_PARTS.items():
            a, b = saved["data_signature"].get(part), now["data_signature"].get(part)
            if a != b:
                diffs.append(f"{label} ({_show(a)} in the checkpoint, {_show(b)} now)")
    if (g_saved := global_batch_of(saved)) is not None and g_saved != global_batch_of(now):
        diffs.append(f"train.global_batch_size (sequences per optimizer step: {g_saved} in the checkpoint, "
                     f"{global_batch_of(now)} now)")
    return diffs


def global_batch_of(facts: dict) -> int | None:
    """The global batch (sequences per optimizer step) of a run whose checkpoint records ``facts``:
    ``train.global_batch_size`` of its config, or (checkpoints before it was recorded) micro-batch
    x gradient accumulation x world size; None when the facts do not say."""
    train = (facts.get("config") or {}).get("train") or {}
    if train.get("global_batch_size"):
        return train["global_batch_size"]
    if facts.get("world_size") and train.get("micro_batch_size") and train.get("grad_accum"):
        return train["micro_batch_size"] * train["grad_accum"] * facts["world_size"]
    return None


def elastic_problem(saved: dict, now: dict) -> str | None:
    """Why a checkpoint (facts ``saved``) written by another number of ranks than this run's
    (``now``) cannot be resumed here, or None (same world size, or a supported change). Model and
    optimizer states are re-partitioned by DeepSpeed's universal checkpoint (ZeRO 1-3) or need
    nothing (ZeRO 0); the combination newtonlm has not verified is refused: the optimizer offloaded
    to CPU."""
    old, new = saved.get("world_size"), now.get("world_size")
    if old is None or old == new:
        return None
    train = (saved.get("config") or {}).get("train") or {}
    if train.get("offload_optimizer") and train.get("zero_stage", 0) > 0:
        return (f"the checkpoint was written by {old} ranks and this run has {new}, but its optimizer "
                f"is offloaded to CPU (train.offload_optimizer=true, ZeRO-{train['zero_stage']}): "
                "re-partitioning an offloaded optimizer through DeepSpeed's universal checkpoint is not "
                f"verified in newtonlm; resume on {old} ranks")
    return None


def check_resume_config(saved: dict, now: dict, where: str = "the checkpoint") -> None:
    """Raise ResumeRefused naming every difference (:func:`resume_differences`) between the checkpoint
    ``where`` (its facts ``saved``) and this run (``now``), with what to do."""
    diffs = resume_differences(saved, now)
    if not diffs and (problem := elastic_problem(saved, now)):
        raise ResumeRefused(f"{where} cannot be resumed on another number of ranks: {problem}")
    if diffs:
        raise ResumeRefused(
            f"{where} was written with other settings than this run's: {'; '.join(diffs)}. A resume "
            "continues the same run: resume with the checkpoint's settings, or start a new run (another "
            "hydra.run.dir, or train.resume=none train.overwrite=true, which deletes this run's checkpoints)")


def run_facts(resolved: dict, world: int, tokenizer, data_signature: dict) -> dict:
    """What a checkpoint of this run records about it (copied into its manifest: MANIFEST_KEYS) and
    what a resume compares: the resolved config, the world size, the tokenizer (fingerprint, size,
    the model's vocabulary) and rank 0's data-loader signature (its rank left out)."""
    return {"world_size": world, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "tokenizer_size": max_token_id(tokenizer) + 1, "vocab_size": vocab_size_for_model(tokenizer),
            "data_signature": {k: v for k, v in data_signature.items() if k != "rank"}, "config": resolved}


def recorded_global_batch(ckpts: Checkpoints, cfg: TrainConfig) -> int | None:
    """The global batch recorded by the run directory's checkpoints (:func:`global_batch_of` of the
    first readable manifest: the one ``train.resume`` names, else the newest), which a resume keeps;
    None for a fresh start (``train.resume=none``, no readable manifest). Reads manifests only."""
    if cfg.resume == "none":
        return None
    tags = [t for _, t in reversed(ckpts.complete())]
    if cfg.resume in tags:
        tags.remove(cfg.resume)
        tags.insert(0, cfg.resume)
    for tag in tags:
        try:
            manifest = ckpts.manifest(tag)
        except CheckpointError:
            continue  # the resume plan names it
        if manifest is not None and (g := global_batch_of(manifest)) is not None:
            return g
    return None


def fingerprint_at(folder: Path) -> str | None:
    """The fingerprint of the tokenizer saved in ``folder``; None when there is none readable."""
    if not (folder / "tokenizer_config.json").is_file():
        return None
    try:
        return tokenizer_fingerprint(load_tokenizer(str(folder)))
    except Exception:  # a damaged folder: as good as none
        return None


def saved_facts(ckpts: Checkpoints, tag: str, run_dir: Path) -> dict:
    """A checkpoint's :func:`run_facts`, from its manifest without loading weights; a format-1
    checkpoint (no manifest) from its client state, with the fingerprint of ``<run_dir>/tokenizer``
    standing in for the tokenizer's (those checkpoints did not record it). CheckpointError when
    unreadable."""
    manifest = ckpts.manifest(tag)
    if manifest is not None:
        return {key: manifest.get(key) for key in MANIFEST_KEYS}
    state = ckpts.read_client_state(tag)
    facts = {key: state.get(key) for key in MANIFEST_KEYS}
    signature = ((state.get("data") or [{}])[0] or {}).get("signature") or {}
    facts["data_signature"] = {k: v for k, v in signature.items() if k != "rank"} or None
    facts["tokenizer_fingerprint"] = facts["tokenizer_fingerprint"] or fingerprint_at(run_dir / "tokenizer")
    return facts


def checkpoint_index(ckpts: Checkpoints) -> dict[str, bool]:
    """Every checkpoint folder of the run directory: tag -> complete (the input of resume_plan)."""
    complete = {tag for _, tag in ckpts.complete()}
    return {tag: tag in complete for tag in ckpts.all_tags()}


def plan_resume(ckpts: Checkpoints, cfg: TrainConfig, now: dict, run_dir: Path,
                unusable: dict[str, str] | None = None) -> ResumePlan:
    """The whole resume plan, decided from the checkpoints alone before anything is written or built:
    :func:`resume_plan` over rank 0's view of the checkpoint folder; the chosen checkpoint verified
    against its manifest (every rank its own files), an unusable one (and its reason) passed over by
    ``auto``; its settings compared with this run's (``now``: :func:`run_facts`). Every rank gets the
    same plan, or ResumeRefused (saying that nothing was changed). A collective."""
    unusable, main = dict(unusable or {}), ckpts.is_main
    index = checkpoint_index(ckpts) if main else None
    unchanged = f"; nothing in {run_dir} was changed"
    while True:
        plan = resume_plan(index, cfg, str(ckpts.root), unusable) if main else None
        plan = ResumePlan(**broadcast_object(asdict(plan) if main else None))
        if plan.error:
            raise ResumeRefused(plan.error + unchanged)
        if plan.tag is None:
            return plan
        problem, error = ckpts.verify(plan.tag), None
        if problem is None and main:
            try:
                saved = saved_facts(ckpts, plan.tag, run_dir)
                check_resume_config(saved, now, f"checkpoint {ckpts.root / plan.tag}")
            except CheckpointError as exc:
                problem = str(exc)
            except ResumeRefused as exc:
                error = str(exc)
        problem, error = broadcast_object((problem, error))
        if error:
            raise ResumeRefused(error + unchanged)
        if problem is None:
            return plan
        unusable[plan.tag] = problem


def reschedule(scheduler, lr: float) -> None:
    """Make a loaded learning-rate schedule follow this run's settings. A checkpoint restores the
    scheduler's peak rates (``base_lrs``) and the optimizer's current rate, but not the schedule's
    shape (its lambdas come from this run's config); after a resume with another ``train.lr`` or
    schedule, set both from ``lr`` and the lambdas at the resumed step, so that step ``s`` uses
    ``lr * factor(s)`` of the new settings from the first resumed step on. ``scheduler``: a
    LambdaLR (transformers' schedules)."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank``'s RNG streams after an elastic resume at ``step`` (a checkpoint of
    another world size holds no state for this rank): a function of the run's seed, the step and
    the rank only, so that a resumed run is reproducible and no two ranks share a stream."""
    digest = hashlib.sha256(f"newtonlm-rng/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63


def seed_rng(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's and NumPy's global RNGs from ``seed``."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():  # this rank's GPU
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
