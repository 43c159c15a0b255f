"""The training job: ``python -m newtonlm.training.train [hydra overrides]``.

Read top to bottom: set up the process group, tokenizer, model, DeepSpeed engine and data; resume
if a checkpoint exists; then the loop (micro-batches -> loss normalized by the step's token count
-> backward -> step), with logging, validation, checkpoints, skip-on-non-finite and preemption
handling; finally a validation pass and a text sample. Details live in small helpers:
``config`` (settings), ``distributed``, ``optim`` (AdamW, schedules, DeepSpeed config),
``checkpoint``, ``metrics``.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .. import data as nd
from .. import models as nm
from ..paths import CONFIG_DIR
from . import faults
from .checkpoint import Checkpoints
from .config import load_settings, register_schemas, validate
from .distributed import all_reduce_sum, barrier, broadcast_object, init_distributed
from .metrics import MetricsLog, Progress, init_wandb, peak_flops
from .optim import build_optimizer, build_scheduler, deepspeed_config

# Settings that must match for a resume to continue the same run.
_RESUME_KEYS = ("seq_len", "micro_batch_size", "grad_accum", "seed")


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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():  # this rank's GPU
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _token_loss_sum(engine, batch, device, vocab: int) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the batch's target tokens, and their count."""
    logits = engine(input_ids=batch["input_ids"].to(device)).logits
    labels = batch["labels"].to(device)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


@torch.no_grad()
def evaluate(engine, val_loader, device, vocab: int) -> dict:
    engine.eval()
    total, count = 0.0, 0
    for batch in val_loader:
        loss, n = _token_loss_sum(engine, batch, device, vocab)
        total, count = total + loss.item(), count + n
    nm.newton_stats(engine.module, reset=True)  # keep evaluation out of the training telemetry
    engine.train()
    total, count = all_reduce_sum([total, count], device)
    val_loss = total / max(count, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": int(count)}


@torch.no_grad()
def sample_text(engine, tokenizer, prompt: str, max_new_tokens: int, device, seed: int) -> str:
    model = engine.module
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    torch.manual_seed(seed)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    model.train()
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _check_resume_config(saved: dict, resolved: dict, world: int) -> None:
    diffs = []
    for section in ("model", "data"):
        if saved["config"].get(section) != resolved.get(section):
            diffs.append(section)
    for key in _RESUME_KEYS:
        if saved["config"]["train"].get(key) != resolved["train"].get(key):
            diffs.append(f"train.{key}")
    if saved["world_size"] != world:
        diffs.append(f"world size ({saved['world_size']} saved, {world} now)")
    if diffs:
        raise ValueError(f"the checkpoint was written with different settings ({', '.join(diffs)}); "
                         "resume with the same ones, or start a new run (another hydra.run.dir, or "
                         "train.resume=none train.overwrite=true)")


def _resume_plan(ckpts: Checkpoints, cfg) -> dict:
    """What to resume from and what to delete first, or the error to raise (decided on rank 0)."""
    plan = {"tag": None, "delete": [], "error": None}
    if cfg.resume == "auto":
        plan["tag"] = ckpts.latest_complete()
    elif cfg.resume.startswith("step_"):
        plan["tag"] = cfg.resume
        newer = ckpts.newer_than(cfg.resume)
        if newer and not cfg.overwrite:
            plan["error"] = (f"train.resume={cfg.resume} but {ckpts.root} also holds later checkpoints "
                             f"({', '.join(newer)}) that the resumed run would overwrite and "
                             "train.resume=auto would pick: add train.overwrite=true to delete them, "
                             "or resume in another hydra.run.dir")
        plan["delete"] = newer
    elif ckpts.has_any():
        if not cfg.overwrite:
            plan["error"] = (f"{ckpts.root} already holds checkpoints and train.resume=none: use "
                             "train.resume=auto, another hydra.run.dir, or train.overwrite=true")
        plan["delete"] = ckpts.all_tags()
    return plan


def run(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    stop = _StopRequest()  # from here on a SIGTERM / SIGINT ends the run with a checkpoint
    train_cfg, wandb_cfg = load_settings(cfg)
    info = init_distributed(train_cfg.dist_timeout_s, shm_comm=train_cfg.deepspeed_shm_comm)
    rank, world, device, main = info.rank, info.world_size, info.device, info.is_main
    validate(train_cfg, wandb_cfg, world)
    data_cfg = nd.load_data_config(cfg.data)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    # tokenizer (trained once by rank 0 and cached) -> vocabulary -> model
    if main:
        tokenizer = nd.get_or_train_tokenizer(data_cfg)
    barrier()
    if not main:
        tokenizer = nd.get_or_train_tokenizer(data_cfg)
    if main:
        tokenizer.save_pretrained(run_dir / "tokenizer")
    vocab = nd.vocab_size_for_model(tokenizer)
    torch.manual_seed(train_cfg.seed)
    model = nm.build_model(cfg.model, vocab)
    if train_cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = nm.count_parameters(model)

    tokens_per_step = train_cfg.micro_batch_size * train_cfg.seq_len * train_cfg.grad_accum * world
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
    base_opt = getattr(optimizer, "optimizer", optimizer)  # the ZeRO wrapper's inner optimizer
    engine_desc = (f"DeepSpeed ZeRO-{engine.zero_optimization_stage()}, {type(base_opt).__name__}"
                   + (" (optimizer offloaded to CPU)" if engine.zero_cpu_offload() else "")
                   + f", {train_cfg.precision}" + (", torch.compile" if engine.is_compiled else ""))
    train_loader, val_loader = nd.build_dataloaders(
        data_cfg, tokenizer, train_cfg.seq_len, train_cfg.micro_batch_size, rank, world,
        train_cfg.seed, model_vocab_size=vocab)

    # resume: rank 0 decides from its view of the run directory and every rank follows it
    ckpts = Checkpoints(run_dir / "checkpoints", train_cfg.keep_last, main)
    plan = broadcast_object(_resume_plan(ckpts, train_cfg) if main else None)
    if plan["error"]:
        raise ValueError(plan["error"])
    if plan["delete"]:
        ckpts.remove(plan["delete"])
    tag = plan["tag"]
    step, tokens_seen, skipped_total, consecutive_skips = 0, 0, 0, 0
    if tag is not None:
        state = ckpts.load(engine, tag)
        _check_resume_config(state, resolved, world)
        step, tokens_seen = state["step"], state["tokens_seen"]
        skipped_total = state.get("skipped_total", 0)
        consecutive_skips = state.get("consecutive_skips", 0)
        train_loader.load_state_dict(state["data"][rank])
        _set_rng_state(state["rng"][rank])

    def save(at_step: int) -> None:
        client = {"step": at_step, "tokens_seen": tokens_seen, "skipped_total": skipped_total,
                  "consecutive_skips": consecutive_skips,
                  "world_size": world, "config": resolved,
                  "data": _gather(train_loader.state_dict(), world),
                  "rng": _gather(_rng_state(), world)}
        ckpts.save(engine, at_step, client)

    metrics = MetricsLog(run_dir / "metrics.jsonl", main, resume_step=step if tag else None)
    wb = init_wandb(wandb_cfg, run_dir, resolved, main)
    flops_tok = nm.flops_per_token(cfg.model, vocab, train_cfg.seq_len)
    peak, peak_how = peak_flops(device, train_cfg.precision, train_cfg.peak_flops)
    progress = Progress(total_steps, step, main and train_cfg.progress)
    if main:
        print(f"newtonlm: {cfg.model.arch} {n_params['total']:,} parameters "
              f"({n_params['non_embedding']:,} non-embedding), vocab {vocab}, world {world}, "
              f"{tokens_per_step} tokens/step, {total_steps} steps, {engine_desc}, run dir {run_dir}"
              + (f", resumed from {tag}" if tag else ""), file=sys.stderr, flush=True)

    status, exit_code = "finished", 0
    train_iter = iter(train_loader)
    t0 = time.perf_counter()  # a step's time: from the end of the previous step's bookkeeping
    while step < total_steps:
        micro = [next(train_iter) for _ in range(train_cfg.grad_accum)]
        data_wait = time.perf_counter() - t0  # > a few % of the step: the input pipeline is slow
        n_local = sum(int((mb["labels"] != -100).sum()) for mb in micro)
        (n_global,) = all_reduce_sum([n_local], device)
        skipped_before = engine.skipped_steps
        lr = scheduler.get_last_lr()[0]  # the rate this step applies (the engine steps the schedule)
        loss_sum = 0.0
        for mb in micro:
            loss, _ = _token_loss_sum(engine, mb, device, vocab)
            if step + 1 in train_cfg.inject_nan_steps:
                loss = loss * float("nan")
            # mean over every target token of the step on every rank (ranks' grads are averaged)
            engine.backward(loss * (world / n_global), scale_wrt_gas=False)
            engine.step()
            loss_sum += loss.item()
        step += 1
        faults.after_step(step, rank)
        loss_total, stop_flag = all_reduce_sum([loss_sum, float(stop.signal is not None)], device)
        skipped = engine.skipped_steps > skipped_before
        consecutive_skips = consecutive_skips + 1 if skipped else 0
        skipped_total += int(skipped)
        tokens_seen += int(n_global)
        grad_norm = getattr(optimizer, "last_grad_norm", None)
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        record = {"kind": "train", "step": step, "loss": loss_total / n_global,
                  "lr": lr,
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "tokens_seen": tokens_seen, "skipped": skipped, "skipped_total": skipped_total}
        log_now = step % train_cfg.log_every == 0 or step == total_steps
        if log_now:  # Newton telemetry over the steps since the last record
            record.update(nm.newton_stats(engine.module, reset=True))
        dt = time.perf_counter() - t0
        record.update(tokens_per_s=n_global / dt, step_time_s=dt, data_wait_s=data_wait)
        record["mfu"] = flops_tok * n_global / dt / (peak * world) if peak > 0 else None
        if log_now:
            metrics.write(record)
            if wb is not None:
                wb.log({k: v for k, v in record.items() if isinstance(v, (int, float))})
            progress.update(step, record["loss"], record["tokens_per_s"],
                            " (skipped)" if skipped else "")
        if consecutive_skips >= train_cfg.max_consecutive_skips:
            status, exit_code = f"stopped: {consecutive_skips} consecutive non-finite steps", 3
            save(step)  # skipped steps leave the weights as they were: the last good state
            break
        if stop_flag > 0:
            status = f"preempted ({stop.signal or 'signal on another rank'})"
            save(step)
            break
        if train_cfg.eval_every and step % train_cfg.eval_every == 0 and val_loader is not None:
            val = evaluate(engine, val_loader, device, vocab)
            metrics.write({"kind": "val", "step": step, "tokens_seen": tokens_seen, **val})
            if wb is not None:
                wb.log({"step": step, **val})
        if step % train_cfg.save_every == 0 or step == total_steps:
            save(step)
        t0 = time.perf_counter()

    result = {"status": status, "step": step, "tokens_seen": tokens_seen, "run_dir": str(run_dir),
              "parameters": n_params, "peak_flops": peak, "peak_flops_source": peak_how}
    if exit_code == 0 and status == "finished":
        if val_loader is not None:
            val = evaluate(engine, val_loader, device, vocab)
            metrics.write({"kind": "val", "step": step, "tokens_seen": tokens_seen, "final": True, **val})
            if wb is not None:
                wb.log({"step": step, **val})
            result.update(val)
        if train_cfg.sample_tokens > 0:
            result["sample"] = sample_text(engine, tokenizer, train_cfg.sample_prompt,
                                           train_cfg.sample_tokens, device, train_cfg.seed)
    metrics.close()
    if wb is not None:
        wb.finish()
    if main:
        _report(result)
    barrier()
    if exit_code:
        print(f"newtonlm: {status}; checkpoint of the last good state at step {step} in "
              f"{ckpts.root}", file=sys.stderr)
        sys.exit(exit_code)
    return result


def _report(result: dict) -> None:
    lines = [f"status: {result['status']} at step {result['step']} "
             f"({result['tokens_seen']:,} tokens), run dir {result['run_dir']}"]
    if "val_loss" in result:
        lines.append(f"validation: loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f} "
                     f"({result['val_tokens']:,} tokens)")
    if "sample" in result:
        lines.append("sample:\n" + result["sample"])
    print("\n".join(lines), flush=True)


register_schemas()


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
