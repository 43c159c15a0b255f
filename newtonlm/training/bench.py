"""End-to-end training throughput: ``python -m newtonlm.training.bench [--json]``.

For each architecture at its demo preset: the trainer (``python -m newtonlm.training.train``, the
real job: DeepSpeed engine, data pipeline, logging) with 1 and 2 processes, and a bare loop of the
same model (random token batches of the same shape, forward + backward + the trainer's optimizer
step with clipping, no DeepSpeed, no data pipeline, no logging), each in a fresh process. Both time
whole steps, from the end of one to the end of the next. Reported: median tokens/s and MFU over the
steps after warm-up, the peak resident memory of the largest trainer process, and the trainer's
overhead over the bare loop, 1 - trainer / bare, measured in ``--rounds`` back-to-back pairs (bare
loop, then trainer) so that a load change on a shared machine shows up as spread between rounds
instead of as overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..machine import machine_info

SRC = Path(__file__).resolve().parents[2]  # the directory holding the newtonlm package
WARMUP = 3  # steps not measured (first-call compilation, allocator warm-up)


def _overrides(arch: str, steps: int, seq_len: int, mbs: int) -> list[str]:
    """The model and train overrides of both variants (the bare loop composes the same config)."""
    return [f"model={arch}_demo", f"train.max_steps={steps}", f"train.seq_len={seq_len}",
            f"train.micro_batch_size={mbs}"]


def _trainer(arch: str, nproc: int, steps: int, seq_len: int, mbs: int, tok_cache: str,
             run_dir: Path) -> dict:
    overrides = [*_overrides(arch, steps, seq_len, mbs), "train.eval_every=0", f"train.save_every={steps}",
                 "train.sample_tokens=0", "train.progress=false", f"data.val_sequences={mbs}",
                 f"data.tokenizer.cache_dir={tok_cache}", "wandb=disabled", f"hydra.run.dir={run_dir}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "newtonlm.training.train", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), "-m", "newtonlm.training.train", *overrides]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    if nproc > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // nproc))
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd] if Path("/usr/bin/time").exists()
                         else cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"trainer failed ({arch}, {nproc} proc):\n{out.stderr[-3000:]}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"][WARMUP:]
    peak_kb = out.stderr.strip().splitlines()[-1] if Path("/usr/bin/time").exists() else ""
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "mfu": statistics.median(r["mfu"] for r in train if r["mfu"] is not None),
            "peak_rss_mb": int(peak_kb) / 1024 if peak_kb.isdigit() else None,
            "wall_s": time.perf_counter() - t0}


def _bare_loop(arch: str, steps: int, seq_len: int, mbs: int, vocab: int) -> list[float]:
    """Seconds per step of forward + backward + optimizer step on random tokens, one model in this
    process (no DeepSpeed, no data pipeline, no logging). Model and optimizer are the trainer's for
    the same overrides: the composed preset, and ``build_optimizer`` (at ZeRO 0 a ``SkippingAdamW``
    over the weight-decay groups, which clips at ``train.grad_clip`` as the trainer's step does)."""
    from hydra import compose, initialize_config_dir

    from ..models import build_model
    from ..paths import CONFIG_DIR
    from .config import load_settings, register_schemas
    from .optim import build_optimizer

    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=_overrides(arch, steps, seq_len, mbs))
    train_cfg = load_settings(cfg)[0]
    if train_cfg.zero_stage != 0:  # with ZeRO, DeepSpeed clips: this loop would time less work
        raise ValueError(f"train.zero_stage={train_cfg.zero_stage}; the bare loop expects 0 (configs/train)")
    torch.manual_seed(train_cfg.seed)
    model = build_model(cfg.model, vocab)
    opt = build_optimizer(model, train_cfg)
    times = []
    t0 = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (mbs, seq_len + 1))
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()  # clipping included (SkippingAdamW)
        opt.zero_grad(set_to_none=True)
        loss.item()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    return times


def _bare_subprocess(arch: str, steps: int, seq_len: int, mbs: int, vocab: int) -> float:
    """The bare loop in a fresh process (the same start-up state as the trainer's); median
    tokens/s after the warm-up steps."""
    cmd = [sys.executable, "-m", "newtonlm.training.bench", "--bare", arch, "--steps", str(steps),
           "--seq-len", str(seq_len), "--micro-batch-size", str(mbs), "--vocab", str(vocab)]
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(SRC)},
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bare loop failed ({arch}):\n{out.stderr[-3000:]}")
    times = json.loads(out.stdout.strip().splitlines()[-1])
    return mbs * seq_len / statistics.median(times[WARMUP:])


def summarize(arch: str, bare: list[float], trainer: list[dict]) -> dict:
    """One arch's 1-process figures over the rounds: the median of each variant's per-round
    tokens/s, and the trainer overhead 1 - trainer / bare per round (bare and trainer of one
    round ran back to back) with its median, min and max."""
    overheads = [1 - t["tokens_per_s"] / b for b, t in zip(bare, trainer)]
    return {"arch": arch, "nproc": 1, "rounds": len(bare),
            "tokens_per_s": statistics.median(t["tokens_per_s"] for t in trainer),
            "mfu": statistics.median(t["mfu"] for t in trainer),
            "peak_rss_mb": max((t["peak_rss_mb"] or 0) for t in trainer) or None,
            "bare_tokens_per_s": statistics.median(bare),
            "trainer_overhead": statistics.median(overheads),
            "trainer_overhead_min": min(overheads), "trainer_overhead_max": max(overheads),
            "trainer_overhead_rounds": overheads}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--archs", default="paragru,paralstm,llama,mamba2")
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3,
                    help="bare loop / 1-process trainer pairs per arch, run back to back")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--bare", metavar="ARCH", help=argparse.SUPPRESS)  # internal: one bare loop
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps <= WARMUP:
        ap.error(f"--steps must be > {WARMUP} (the warm-up steps are not measured), got {args.steps}")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.bare:
        print(json.dumps(_bare_loop(args.bare, args.steps, args.seq_len, args.micro_batch_size,
                                    args.vocab)))
        return None
    from ..data import get_or_train_tokenizer, load_data_config, vocab_size_for_model

    tok_cache = str(Path(".cache/newtonlm/tokenizers").resolve())  # the trainer's default
    data_cfg = load_data_config({"sources": {"shakespeare": {"kind": "shakespeare"}},
                                 "tokenizer": {"cache_dir": tok_cache}})
    vocab = vocab_size_for_model(get_or_train_tokenizer(data_cfg))
    nprocs = [int(n) for n in args.nproc.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            bare, trainer = [], []
            if 1 in nprocs:
                for r in range(args.rounds):
                    bare.append(_bare_subprocess(arch, args.steps, args.seq_len,
                                                 args.micro_batch_size, vocab))
                    trainer.append(_trainer(arch, 1, args.steps, args.seq_len, args.micro_batch_size,
                                            tok_cache, Path(tmp) / f"{arch}-1-{r}"))
                rows.append(summarize(arch, bare, trainer))
                if not args.json:
                    print(_fmt(rows[-1]), flush=True)
            for nproc in (n for n in nprocs if n != 1):
                r = _trainer(arch, nproc, args.steps, args.seq_len, args.micro_batch_size, tok_cache,
                             Path(tmp) / f"{arch}-{nproc}")
                rows.append({"arch": arch, "nproc": nproc, **r})
                if not args.json:
                    print(_fmt(rows[-1]), flush=True)
    result = {"machine": machine_info(),
              "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
              "steps": args.steps, "warmup_steps": WARMUP, "rounds": args.rounds, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    return result


def _fmt(r: dict) -> str:
    bare = (f" bare loop {r['bare_tokens_per_s']:8.0f} tok/s, trainer overhead "
            f"{100 * r['trainer_overhead']:5.1f}% (rounds: "
            + ", ".join(f"{100 * o:.1f}%" for o in r["trainer_overhead_rounds"]) + ")"
            ) if "bare_tokens_per_s" in r else ""
    return (f"{r['arch']:9} {r['nproc']} proc: {r['tokens_per_s']:8.0f} tok/s, MFU "
            f"{100 * r['mfu']:5.2f}%{bare}")


if __name__ == "__main__":
    main()
