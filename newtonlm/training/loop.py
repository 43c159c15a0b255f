"""The training job's loop, started by ``python -m newtonlm.training.train [hydra overrides]``
(``train.py``: composes and checks the configuration before anything heavy is imported).

:func:`run` reads top to bottom: :func:`setup` (process group, the run directory's lock, tokenizer,
data, the resume plan, model, DeepSpeed engine), :func:`resume` (the run's counters, data-loader and
RNG states from the planned checkpoint), :func:`prepare_run_dir` (the first writes into the run
directory: config.yaml, tokenizer/), then the loop: :func:`train_step` (one optimizer step over
``grad_accum`` micro-batches, returning the step's record), logging, :func:`stop_reason`
(preemption notice, non-finite steps), :func:`validate`, :func:`save_checkpoint`; finally
:func:`finish` (validation, a text sample, the summary). Batches are ``{"input_ids", "targets"}``
from newtonlm.data, targets already shifted: the loss is the cross-entropy of the logits at each
position against its target (:func:`token_loss_sum`). Helpers: ``config`` (settings),
``distributed``, ``optim`` (AdamW, schedules, DeepSpeed config), ``checkpoint``, ``resume``
(the plan and what may change), ``lock``, ``metrics`` (metrics.jsonl, progress, wandb, MFU).

A refused or failed start leaves the run directory as it found it, byte for byte: the resume is
planned (``resume.plan_resume``: which checkpoint, verified against its manifest, its settings compared
with this run's) and the checkpoint loaded before anything is written, and the lock file gets its
previous bytes back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..data import build_dataloaders, get_or_train_tokenizer, load_data_config, vocab_size_for_model
from ..kernels import split_sequence
from ..models import build_model, count_parameters, flops_per_token, model_config, newton_stats
from . import faults
from .checkpoint import CheckpointError, Checkpoints, dump_state
from .config import BatchPlan, TrainConfig, WandbConfig, batch_plan, load_settings
from .config import validate as validate_settings
from .distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    init_sequence_parallel,
)
from .errors import UserError
from .lock import RunDirectoryInUse, RunLock
from .metrics import RunLog, mfu, peak_flops
from .optim import build_optimizer, build_scheduler, deepspeed_config
from .resume import (
    SCHEDULE_KEYS,
    ResumePlan,
    fingerprint_at,
    plan_resume,
    rank_seed,
    recorded_global_batch,
    reschedule,
    rng_state,
    run_facts,
    seed_rng,
    set_rng_state,
)
from .sequence_parallel import (
    SequenceParallelUnsupported,
    check_sequence_parallel,
    set_sequence_parallel,
)

if TYPE_CHECKING:
    from ..data import FixedBatches, ResumableLoader

IGNORE_INDEX = -100  # a target that is not scored (cross_entropy's default ignore_index)


class _StopRequest:
    """Preemption notices (SIGTERM, SIGINT, SIGUSR1: schedulers, launchers, Ctrl-C, Slurm's
    ``--signal=USR1@...``) set a flag; the loop checkpoints and exits at the next step boundary.
    Further notices are ignored, because launchers often deliver two at once (the deepspeed launcher
    forwards a SIGTERM right after the terminal's SIGINT), except a SIGINT more than
    ``GRACE_S`` after the first notice: a second Ctrl-C ends the process at once (checkpoints stay
    safe: resume ignores partial ones)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    GRACE_S = 2.0

    def __init__(self):
        self.signal, self.since, self.pid = None, 0.0, os.getpid()
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:
            return  # a forked data-loader worker (same process group): its trainer handles it
        if self.signal is None:
            self.signal, self.since = signal.Signals(signum).name, time.monotonic()
            os.write(2, f"newtonlm: {self.signal} received: checkpointing at the next step boundary "
                        "(Ctrl-C again to exit now)\n".encode())  # no buffered I/O in a handler
        elif signum == signal.SIGINT and time.monotonic() - self.since > self.GRACE_S:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)


@dataclass
class Job:
    """What the loop needs, built once by :func:`setup`."""

    cfg: TrainConfig
    wandb_cfg: WandbConfig
    run_dir: Path
    dist: DistInfo               # rank, world size, device
    stop: _StopRequest
    tokenizer: Any
    engine: Any                  # deepspeed.DeepSpeedEngine; engine.module is the Hugging Face model
    optimizer: Any               # as deepspeed.initialize returned it (a ZeRO wrapper for ZeRO >= 1)
    scheduler: Any
    train_loader: ResumableLoader
    val_loader: FixedBatches | None
    ckpts: Checkpoints
    resolved: dict               # the resolved config: config.yaml, checkpoints, wandb
    facts: dict                  # run_facts: what checkpoints record and a resume compares
    lock: RunLock | None         # rank 0's lock on the run directory (None on other ranks)
    plan: ResumePlan             # decided by setup, carried out by resume
    batch: BatchPlan             # the global batch and its split over the ranks (cfg holds the split)
    total_steps: int
    parameters: dict             # count_parameters of the model
    flops_per_token: float
    peak_flops: float            # of one device, for MFU
    peak_source: str
    description: str             # the start-up line


@dataclass
class Counters:
    """Where the run stands; saved in every checkpoint (``client_state``) and restored on resume."""

    step: int = 0
    tokens_seen: int = 0
    skipped_total: int = 0
    consecutive_skips: int = 0


def count_targets(batch: dict) -> int:
    """Scored targets of a batch ``{"input_ids": [B, T], "targets": [B, T]}``."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


def sequence_chunk(batch: dict, group) -> dict:
    """This rank's chunk along time of ``batch`` (``input_ids`` and ``targets`` ``[B, T]``, targets
    already shifted, so no label crosses a chunk boundary); ``batch`` itself when ``group`` is None."""
    if group is None:
        return batch
    return {key: split_sequence(batch[key], group) for key in ("input_ids", "targets")}


def token_loss_sum(model, batch: dict, device) -> torch.Tensor:
    """Sum of the cross-entropy of the logits at each position of ``batch["input_ids"]`` ``[B, T]``
    against ``batch["targets"]`` ``[B, T]`` (the next tokens: already shifted, so no shift here);
    ``model``: a causal LM or the DeepSpeed engine around one."""
    logits = model(input_ids=batch["input_ids"].to(device), use_cache=False).logits  # scoring: no cache
    targets = batch["targets"].to(device)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def evaluate(engine, val_loader, device, sequence_group=None) -> dict:
    """Validation loss (mean over every target of every rank), perplexity and target count. With a
    ``sequence_group`` each rank scores its chunk of every sequence (the sums add up over ranks)."""
    engine.eval()
    total, count = 0.0, 0
    for batch in val_loader:
        batch = sequence_chunk(batch, sequence_group)
        total, count = total + token_loss_sum(engine, batch, device).item(), count + count_targets(batch)
    newton_stats(engine.module, reset=True)  # keep evaluation out of the training telemetry
    engine.train()
    total, count = all_reduce_sum([total, count], device)
    val_loss = total / max(count, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": int(count)}


@torch.no_grad()
def sample_text(engine, tokenizer, prompt: str, max_new_tokens: int, device, seed: int,
                sequence_group=None) -> str:
    model = engine.module
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    torch.manual_seed(seed)
    if sequence_group is not None:  # generation runs whole on every rank (it needs a cache)
        set_sequence_parallel(model, None)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    if sequence_group is not None:
        set_sequence_parallel(model, sequence_group)
    model.train()
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ---- resume: the plan (resume.py) applied ------------------------------------------------------

def resume(job: Job) -> tuple[Counters, ResumePlan, str | None]:
    """Load the checkpoint of the plan (``job.plan``, decided by :func:`setup`) into the engine ->
    (counters, the plan as carried out, the elastic-resume line or None). A checkpoint that fails to
    load is unusable: ``auto`` plans again without it, an explicitly named one is refused. The data
    loader continues where the checkpoint's loaders stopped (re-mapped by ``load_states`` when the
    layout changed); each rank gets back its RNG states, or after a change of world size fresh
    streams seeded by :func:`~newtonlm.training.resume.rank_seed` (seed, step, rank); a changed
    schedule is applied. Nothing is written into the run directory (a ZeRO checkpoint of another
    world size is converted in a transient folder, deleted after loading: ``Checkpoints.load``)."""
    plan = job.plan
    while plan.tag is not None:
        try:
            state, problem = job.ckpts.load(job.engine, plan.tag), None
        except CheckpointError as exc:
            state, problem = None, str(exc)
        problems = [p for p in all_gather_object(problem) if p]
        if not problems:
            break
        unusable = {**dict(plan.skipped), plan.tag: "; ".join(problems)}
        plan = plan_resume(job.ckpts, job.cfg, job.facts, job.run_dir, unusable)
    if job.dist.is_main:
        for tag, why in plan.skipped:
            print(f"newtonlm: warning: checkpoint {job.ckpts.root / tag} is unusable ({why}); skipped, "
                  f"resuming from {plan.tag}", file=sys.stderr, flush=True)
    if plan.tag is None:
        return Counters(), plan, None
    counters = Counters(step=state["step"], tokens_seen=state["tokens_seen"],
                        skipped_total=state.get("skipped_total", 0),
                        consecutive_skips=state.get("consecutive_skips", 0))
    rank, world = job.dist.rank, job.dist.world_size
    remap = job.train_loader.load_states(state["data"])
    saved_world = state.get("world_size") or len(state["rng"])
    if saved_world == world:
        set_rng_state(state["rng"][rank])
    else:  # no saved stream for this rank: a fresh one of (seed, step, rank)
        seed_rng(rank_seed(job.cfg.seed, counters.step, rank))
    saved_train, train_now = state["config"]["train"], job.resolved["train"]
    if any(saved_train.get(key) != train_now.get(key) for key in SCHEDULE_KEYS):
        reschedule(job.scheduler, job.cfg.lr)
    note = None
    if saved_world != world:
        how = ("optimizer state re-partitioned through DeepSpeed's universal checkpoint"
               if job.engine.zero_optimization_stage() > 0 else "ZeRO 0: optimizer state loaded whole")
        note = (f"resumed on {world} rank{'s' if world > 1 else ''} from a {saved_world}-rank checkpoint "
                f"({how}; {job.batch.describe()}; RNG streams seeded from (seed, step, rank))")
    if remap:
        note = ((note or "resumed with another data-loader layout") + "; "
                + (remap if remap.startswith("data") else f"data: {remap}"))
    return counters, plan, note


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """``save_pretrained`` into a fresh folder, swapped in for ``folder`` (no stale files stay)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def prepare_run_dir(job: Job, plan: ResumePlan) -> None:
    """The first writes into the run directory, once the plan is carried out: the checkpoints it
    deletes, ``config.yaml``, and ``tokenizer/`` unless it already holds this tokenizer (a resumed
    run's is the checkpoint's: equal fingerprints). A collective."""
    if plan.delete:
        job.ckpts.remove(list(plan.delete))
    if job.dist.is_main:
        tmp = job.run_dir / ".config.yaml.tmp"
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(job.resolved)))
        os.replace(tmp, job.run_dir / "config.yaml")
        folder = job.run_dir / "tokenizer"
        if fingerprint_at(folder) != job.facts["tokenizer_fingerprint"]:
            if plan.tag is not None:
                print(f"newtonlm: {folder} did not hold the checkpoint's tokenizer (fingerprint "
                      f"{job.facts['tokenizer_fingerprint']}): written again", file=sys.stderr, flush=True)
            _save_tokenizer(job.tokenizer, folder)
    barrier()


def save_checkpoint(job: Job, counters: Counters) -> None:
    """A checkpoint of the current step: the engine's state plus what :func:`resume` restores and
    what its manifest records (:func:`run_facts`). Warns first when the disk looks too full for it."""
    if job.dist.is_main and (warning := job.ckpts.space_warning()):
        print(f"newtonlm: warning: {warning}", file=sys.stderr, flush=True)
    # the data loaders' states: one per data-parallel group (its K ranks hold the same one)
    loaders = all_gather_object(job.train_loader.state_dict())[::job.dist.sequence_parallel]
    client = {**asdict(counters), **job.facts, "data": loaders,
              "rng": all_gather_object(rng_state())}
    job.ckpts.save(job.engine, counters.step, client)
    dump_state(job.engine, counters.step, "saved")  # test hook (NEWTONLM_STATE_DUMP); nothing when unset


# ---- set-up --------------------------------------------------------------------------------------

def _describe_engine(engine, optimizer, precision: str) -> str:
    base = getattr(optimizer, "optimizer", optimizer)  # the ZeRO wrapper's inner optimizer
    return (f"DeepSpeed ZeRO-{engine.zero_optimization_stage()}, {type(base).__name__}"
            + (" (optimizer offloaded to CPU)" if engine.zero_cpu_offload() else "")
            + f", {precision}" + (", torch.compile" if engine.is_compiled else ""))


def lock_run_dir(run_dir: Path, is_main: bool) -> RunLock | None:
    """Rank 0 locks the run directory (lock.py); every rank raises RunDirectoryInUse when another
    trainer holds it. A collective."""
    lock, error = None, None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunLock.acquire(run_dir)
        except RunDirectoryInUse as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error:
        raise RunDirectoryInUse(error)
    if lock is not None and (note := lock.takeover_note()):
        print(f"newtonlm: warning: {note}", file=sys.stderr, flush=True)
    return lock


def claim_run_dir(run_dir: Path, ckpts: Checkpoints, cfg: TrainConfig,
                  now: dict) -> tuple[RunLock | None, ResumePlan]:
    """Lock the run directory (rank 0) and plan the resume (:func:`plan_resume`) -> (the lock, the
    plan). A refusal (the lock held by another trainer, a refused plan) raises with the directory as
    it was found: the lock file gets its previous bytes back. A collective."""
    lock = lock_run_dir(run_dir, ckpts.is_main)
    try:
        return lock, plan_resume(ckpts, cfg, now, run_dir)
    except BaseException:
        if lock is not None:
            lock.release(restore=True)
        raise


def setup(cfg: DictConfig) -> Job:
    """Everything the loop needs, with nothing written into the run directory but its lock: process
    group, tokenizer (trained once by rank 0 into its cache), data loaders, the lock and the resume
    plan (:func:`claim_run_dir`: refusals come here, before the model is built), model, DeepSpeed
    engine, MFU constants. A failure releases the lock as it was found."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    stop = _StopRequest()  # from here on a SIGTERM / SIGINT ends the run with a checkpoint
    train_cfg, wandb_cfg = load_settings(cfg)
    info = init_distributed(train_cfg.dist_timeout_s, shm_comm=train_cfg.deepspeed_shm_comm)
    world = info.world_size
    validate_settings(train_cfg, wandb_cfg, world)
    check_model_sequence_parallel(cfg, train_cfg)
    info = init_sequence_parallel(info, train_cfg.sequence_parallel)
    ckpts = Checkpoints(run_dir / "checkpoints", train_cfg.keep_last, info.is_main)
    train_cfg, batch = apply_batch_plan(train_cfg, ckpts, info)
    data_cfg = load_data_config(cfg.data)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # what ran: the global batch (compared on resume) and its split over this run's ranks
    resolved["train"].update(global_batch_size=batch.global_batch, micro_batch_size=batch.micro_batch,
                             grad_accum=batch.grad_accum)
    if info.is_main:
        tokenizer = get_or_train_tokenizer(data_cfg)  # trained into the cache (not the run directory)
    barrier()
    if not info.is_main:
        tokenizer = get_or_train_tokenizer(data_cfg)  # from rank 0's cache
    vocab = vocab_size_for_model(tokenizer)
    train_loader, val_loader = build_dataloaders(
        data_cfg, tokenizer, train_cfg.seq_len, train_cfg.micro_batch_size, info.data_rank,
        info.data_world, train_cfg.seed, model_vocab_size=vocab)
    facts = run_facts(resolved, world, tokenizer, train_loader.signature())
    lock, plan = claim_run_dir(run_dir, ckpts, train_cfg, facts)
    try:
        return Job(cfg=train_cfg, wandb_cfg=wandb_cfg, run_dir=run_dir, dist=info, stop=stop,
                   tokenizer=tokenizer, train_loader=train_loader, val_loader=val_loader, ckpts=ckpts,
                   resolved=resolved, facts=facts, lock=lock, plan=plan, batch=batch,
                   **_build_engine(cfg, train_cfg, info, vocab, run_dir, batch))
    except BaseException:
        if lock is not None:
            lock.release(restore=True)
        raise


def check_model_sequence_parallel(cfg: DictConfig, train_cfg: TrainConfig) -> None:
    """Start-up check of ``train.sequence_parallel`` against the model (architecture, heads, the
    convolution halo: ``newtonlm.models.check_sequence_parallel``), before any work: UserError."""
    if train_cfg.sequence_parallel == 1:
        return
    try:  # the vocabulary plays no part in the check: any size
        config = model_config(cfg.model, vocab_size=64)
        check_sequence_parallel(config, train_cfg.sequence_parallel, train_cfg.seq_len)
    except SequenceParallelUnsupported as exc:
        raise UserError(f"train.sequence_parallel={train_cfg.sequence_parallel}: {exc}") from exc
    except ValueError as exc:  # a model.* value the architecture's config rejects
        raise UserError(f"model ({cfg.model.get('arch')}): {exc}") from exc


def apply_batch_plan(train_cfg: TrainConfig, ckpts: Checkpoints,
                     info: DistInfo) -> tuple[TrainConfig, BatchPlan]:
    """The batch plan of this start (:func:`~newtonlm.training.config.batch_plan`: the global batch
    the run recorded in its checkpoints, when resuming, else the configured one) and the settings
    with ``micro_batch_size`` and ``grad_accum`` replaced by their values on this world size. Reads
    manifests only (rank 0). A collective."""
    recorded = broadcast_object(recorded_global_batch(ckpts, train_cfg) if info.is_main else None)
    batch = batch_plan(train_cfg, info.world_size, recorded)
    if info.is_main and recorded and not train_cfg.global_batch_size and recorded != (
            train_cfg.micro_batch_size * train_cfg.grad_accum * info.data_world):
        print(f"newtonlm: the run's global batch of {recorded} sequences (recorded in its checkpoints) is "
              f"kept: {batch.describe()}", file=sys.stderr, flush=True)
    return replace(train_cfg, global_batch_size=batch.global_batch, micro_batch_size=batch.micro_batch,
                   grad_accum=batch.grad_accum), batch


def _build_engine(cfg: DictConfig, train_cfg: TrainConfig, info: DistInfo, vocab: int, run_dir: Path,
                  batch: BatchPlan) -> dict:
    """The model and the DeepSpeed engine around it, and what the loop derives from them (the
    :class:`Job` fields of those)."""
    world = info.world_size
    torch.manual_seed(train_cfg.seed)
    try:
        model = build_model(cfg.model, vocab)
    except ValueError as exc:  # a model.* value the architecture's config rejects: the user's to fix
        raise UserError(f"model ({cfg.model.get('arch')}): {exc}") from exc
    if train_cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if info.sequence_group is not None:
        set_sequence_parallel(model, info.sequence_group)
    parameters = count_parameters(model)
    tokens_per_step = batch.global_batch * train_cfg.seq_len  # independent of the world size
    total_steps = (math.ceil(train_cfg.max_tokens / tokens_per_step) if train_cfg.max_tokens > 0
                   else train_cfg.max_steps)
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg, total_steps)
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(train_cfg, world), dist_init_required=False)
    if train_cfg.compile:
        engine.compile()
    peak, peak_source = peak_flops(info.device, train_cfg.precision, train_cfg.peak_flops)
    description = (f"{cfg.model.arch} {parameters['total']:,} parameters "
                   f"({parameters['non_embedding']:,} non-embedding), vocab {vocab}, {batch.describe()}, "
                   f"{tokens_per_step} tokens/step, {total_steps} steps, "
                   f"{_describe_engine(engine, optimizer, train_cfg.precision)}, run dir {run_dir}")
    return dict(engine=engine, optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
                parameters=parameters, flops_per_token=flops_per_token(cfg.model, vocab, train_cfg.seq_len),
                peak_flops=peak, peak_source=peak_source, description=description)


# ---- the loop ------------------------------------------------------------------------------------

def _grad_norm(job: Job) -> float | None:
    norm = getattr(job.optimizer, "last_grad_norm", None)  # SkippingAdamW (ZeRO 0)
    if norm is None:
        norm = job.engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def log_due(step: int, total_steps: int, log_every: int) -> bool:
    return step % log_every == 0 or step == total_steps


def validation_due(step: int, total_steps: int, eval_every: int) -> bool:
    """Validate after ``step``? Never at the last step: the final validation (:func:`finish`) does
    it, once."""
    return eval_every > 0 and step % eval_every == 0 and step < total_steps


def train_step(job: Job, counters: Counters, batches: Iterator[dict], t0: float) -> tuple[dict, bool]:
    """One optimizer step over ``grad_accum`` micro-batches; advances ``counters``. Returns the
    step's record (metrics.jsonl) and whether any rank received a stop notice. ``t0``: when the
    previous step's bookkeeping ended (the step's time runs from there: waiting for data counts)."""
    cfg, engine, device, world = job.cfg, job.engine, job.dist.device, job.dist.world_size
    micro = [sequence_chunk(next(batches), job.dist.sequence_group) for _ in range(cfg.grad_accum)]
    data_wait = time.perf_counter() - t0  # > a few % of the step: the input pipeline is slow
    (n_global,) = all_reduce_sum([sum(count_targets(mb) for mb in micro)], device)
    skipped_before = engine.skipped_steps
    lr = job.scheduler.get_last_lr()[0]  # the rate this step applies (the engine steps the schedule)
    loss_sum = 0.0
    for mb in micro:
        loss = token_loss_sum(engine, mb, device)
        if counters.step + 1 in cfg.inject_nan_steps:
            loss = loss * float("nan")
        # mean over every target token of the step on every rank: DeepSpeed averages the grads over
        # all W ranks (x W / n_global: the sum over ranks / n_global). With sequence parallelism a
        # rank's loss is its chunk's; the sum over all ranks is still every target of the step once
        engine.backward(loss * (world / n_global), scale_wrt_gas=False)
        engine.step()
        loss_sum += loss.item()
    counters.step += 1
    faults.after_step(counters.step, job.dist.rank)
    # one collective for the step's loss and the stop notices of all ranks
    loss_total, stop_flag = all_reduce_sum([loss_sum, float(job.stop.signal is not None)], device)
    skipped = engine.skipped_steps > skipped_before  # a non-finite loss or gradient: no update
    counters.consecutive_skips = counters.consecutive_skips + 1 if skipped else 0
    counters.skipped_total += int(skipped)
    counters.tokens_seen += int(n_global)
    record = {"kind": "train", "step": counters.step, "loss": loss_total / n_global, "lr": lr,
              "grad_norm": _grad_norm(job), "tokens_seen": counters.tokens_seen, "skipped": skipped,
              "skipped_total": counters.skipped_total}
    if log_due(counters.step, job.total_steps, cfg.log_every):  # Newton telemetry since the last record
        record.update(newton_stats(engine.module, reset=True))
    dt = time.perf_counter() - t0
    record.update(tokens_per_s=n_global / dt, step_time_s=dt, data_wait_s=data_wait,
                  mfu=mfu(job.flops_per_token, n_global, dt, job.peak_flops, world))
    return record, stop_flag > 0


def stop_reason(job: Job, counters: Counters, stop_requested: bool) -> tuple[str, int] | None:
    """(status, exit code) if the run stops after this step: too many non-finite steps in a row
    (exit 3), or a preemption notice on some rank (exit 0); None to go on."""
    if counters.consecutive_skips >= job.cfg.max_consecutive_skips:
        return f"stopped: {counters.consecutive_skips} consecutive non-finite steps", 3
    if stop_requested:
        return f"preempted ({job.stop.signal or 'signal on another rank'})", 0
    return None


def validate(job: Job, counters: Counters, log: RunLog, final: bool = False) -> dict:
    val = evaluate(job.engine, job.val_loader, job.dist.device, job.dist.sequence_group)
    log.val(counters.step, counters.tokens_seen, val, final=final)
    return val


def run(cfg: DictConfig) -> dict:
    """The job (module docstring); returns the summary that :func:`finish` prints."""
    job = setup(cfg)  # nothing written yet; the resume plan is decided
    try:
        counters, plan, note = resume(job)  # step 0, or where the planned checkpoint left off
        prepare_run_dir(job, plan)  # the first writes
    except BaseException:
        if job.lock is not None:
            job.lock.release(restore=True)
        raise
    try:
        return _train(job, counters, plan, note)
    finally:
        if job.lock is not None:
            job.lock.release()


def _train(job: Job, counters: Counters, plan: ResumePlan, note: str | None = None) -> dict:
    log = RunLog(job.run_dir, job.dist.is_main, counters.step if plan.tag else None, job.wandb_cfg,
                 job.resolved, job.total_steps, job.cfg.progress)
    for tag, why in plan.skipped:
        log.event("skipped_corrupt_checkpoint", counters.step, checkpoint=str(job.ckpts.root / tag),
                  reason=why, resumed_from=plan.tag)
    if note:
        log.event("elastic_resume", counters.step, checkpoint=str(job.ckpts.root / plan.tag),
                  world_size=job.dist.world_size, description=note)
    if job.dist.is_main:
        print(f"newtonlm: {job.description}" + (f", resumed from {plan.tag}" if plan.tag else ""),
              file=sys.stderr, flush=True)
        if note:
            print(f"newtonlm: {note}", file=sys.stderr, flush=True)
    if plan.tag is not None:
        dump_state(job.engine, counters.step, "resumed")

    status, exit_code = "finished", 0
    batches = iter(job.train_loader)
    t0 = time.perf_counter()  # a step's time runs from the end of the previous step's bookkeeping
    while counters.step < job.total_steps:
        record, stop_requested = train_step(job, counters, batches, t0)
        if log_due(counters.step, job.total_steps, job.cfg.log_every):
            log.train(record)
        if (stop := stop_reason(job, counters, stop_requested)) is not None:
            status, exit_code = stop
            save_checkpoint(job, counters)  # the last good state: skipped steps change no weight
            break
        if job.val_loader is not None and validation_due(counters.step, job.total_steps, job.cfg.eval_every):
            validate(job, counters, log)
        if counters.step % job.cfg.save_every == 0 or counters.step == job.total_steps:
            save_checkpoint(job, counters)
        t0 = time.perf_counter()
    return finish(job, counters, log, status, exit_code)


def finish(job: Job, counters: Counters, log: RunLog, status: str, exit_code: int) -> dict:
    """A finished run: final validation and a text sample. Then the summary on stdout (what the
    numbers mean, the commands to run next); a run stopped by non-finite steps exits with its code."""
    hydra_cfg = HydraConfig.get()
    result = {"status": status, "step": counters.step, "tokens_seen": counters.tokens_seen,
              "run_dir": str(job.run_dir), "parameters": job.parameters, "peak_flops": job.peak_flops,
              "peak_flops_source": job.peak_source,
              "vocab_size": int(job.engine.module.config.vocab_size),  # len(tokenizer) rounded up
              "model_preset": hydra_cfg.runtime.choices.get("model"),
              # the command line's overrides, to print the next commands with this run's settings
              "overrides": [*hydra_cfg.overrides.task,
                            *(o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.run.dir="))]}
    if status == "finished":
        if job.val_loader is not None:
            result.update(validate(job, counters, log, final=True))
        if job.cfg.sample_tokens > 0:
            result["sample_prompt"] = job.cfg.sample_prompt
            result["sample"] = sample_text(job.engine, job.tokenizer, job.cfg.sample_prompt,
                                           job.cfg.sample_tokens, job.dist.device, job.cfg.seed,
                                           job.dist.sequence_group)
    log.close()
    if job.dist.is_main:
        _report(result)
    barrier()
    if exit_code:
        print(f"newtonlm: {status}; checkpoint of the last good state at step {counters.step} in "
              f"{job.ckpts.root}", file=sys.stderr)
        sys.exit(exit_code)
    return result


def _report(result: dict) -> None:
    """Print the end-of-run summary of ``result`` (:func:`finish`): status, validation, sample; for
    a finished run what the numbers mean and the commands to run next, with this run's paths (each
    line copy-pasteable; the comments are shell comments); for a preempted run how to continue."""
    import shlex

    from ..models import ARCHS

    def here(path: str) -> str:  # relative to the current directory when inside it: shorter to paste
        rel = os.path.relpath(path)
        return shlex.quote(path if rel.startswith("..") else rel)

    python, run_dir = here(sys.executable), here(result["run_dir"])
    overrides = list(result.get("overrides", []))
    train_cmd = " ".join([python, "-m newtonlm.training.train", *map(shlex.quote, overrides)])
    lines = [f"status: {result['status']} at step {result['step']} ({result['tokens_seen']:,} tokens), "
             f"run dir {run_dir}"]
    if "val_loss" in result:
        lines.append(f"validation: loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f} "
                     f"({result['val_tokens']:,} tokens)")
    if "sample" in result:
        lines.append("sample:\n" + result["sample"])
    if result["status"].startswith("preempted"):
        lines.append(f"to continue from the checkpoint, run the same command again:\n  {train_cmd}")
    if result["status"] != "finished":
        print("\n".join(lines), flush=True)
        return

    vocab = result.get("vocab_size")
    lines.append("what the numbers mean:")
    if "val_loss" in result and vocab:
        lines += [
            f"  validation loss: the mean cross-entropy (nats per token) of predicting each next token of "
            f"{result['val_tokens']:,} held-out tokens; perplexity = exp(loss): the model is as unsure as "
            f"a uniform choice among {result['val_ppl']:,.0f} tokens (lower is better).",
            f"  an untrained model is close to uniform over its {vocab:,}-token vocabulary: loss ln {vocab} "
            f"= {math.log(vocab):.2f}, perplexity ~{vocab:,}."]
    steps = f"{result['step']} step" + ("" if result["step"] == 1 else "s")
    lines.append(f"  trained on {result['tokens_seen']:,} tokens in {steps}; "
                 f"{result['parameters']['total']:,} parameters.")

    out = here(str(Path("hf") / Path(result["run_dir"]).name))  # an export folder next to runs/
    prompt = result.get("sample_prompt") or "ROMEO:"
    load = (f"from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"t = AutoTokenizer.from_pretrained({json.dumps(out)}, trust_remote_code=True); "
            f"m = AutoModelForCausalLM.from_pretrained({json.dumps(out)}, trust_remote_code=True); "
            f"ids = t({json.dumps(prompt)}, return_tensors=\"pt\").input_ids; "
            f"print(t.decode(m.generate(ids, max_new_tokens=60, do_sample=True, top_k=40)[0]))")
    lines += ["next (each line copy-pasteable):",
              "  # perplexity on all held-out text, bits per byte, loss by position (docs/eval.md; longer "
              "sequences than val_ppl's)",
              f"  {python} -m newtonlm.eval.perplexity {run_dir}",
              "  # export a Hugging Face folder that loads without newtonlm (docs/export.md)",
              f"  {python} -m newtonlm.export --checkpoint {run_dir} --out {out}",
              "  # load the export with plain transformers and generate",
              f"  {python} -c {shlex.quote(load)}"]
    preset = result.get("model_preset") or ""
    arch, _, size = preset.rpartition("_")
    if arch in ARCHS:
        # the Transformer baseline first: the comparison a newcomer wants
        others = [f"{a}_{size}" for a in sorted(ARCHS, key=lambda a: a != "llama") if a != arch]
        # model.* settings belong to this architecture's preset
        again = [o for o in overrides if not o.lstrip("+~").startswith(("model=", "model."))]
        # a new run directory: the default one is named after the preset; an explicit one gets a suffix
        again = [f"{o}-{others[0]}" if o.startswith("hydra.run.dir=") else o for o in again]
        lines += [f"  # the same run with another architecture (or {', '.join(others[1:])})",
                  "  " + " ".join([python, "-m newtonlm.training.train", f"model={others[0]}",
                                   *map(shlex.quote, again)])]
    print("\n".join(lines), flush=True)
