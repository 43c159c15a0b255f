"""Check the memory planner against measured CPU training steps:
``python scripts/validate_plan.py [--presets paragru_demo,paragru_125m] [--json out.json]``.

Each configuration (preset x processes x ZeRO stage x activation checkpointing) runs in fresh
processes (``torchrun --standalone`` for 2): every process imports torch and DeepSpeed and joins the
process group, reads its resident memory (VmRSS), resets its peak (``/proc/self/clear_refs`` 5),
then does what the trainer does for the same overrides - the model from the preset, activation
checkpointing, AdamW through ``build_optimizer``, the schedule, ``deepspeed.initialize`` with
``deepspeed_config`` - and runs ``--steps`` optimizer steps of random tokens through the trainer's
``token_loss_sum`` with the trainer's loss scaling, under a fixed malloc mmap threshold
(:data:`MALLOC_ENV`). Measured: its peak resident memory (VmHWM)
minus the resident memory before the model was built, the largest over the ranks. Predicted:
``python -m newtonlm.training.plan ... device=cpu`` (the planner's CPU mode: host memory counts
only written pages, no CUDA context, the CPU overhead constant). Data loading, the tokenizer,
logging and checkpoints are not part of the measurement (the planner does not model them either).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = {"demo": 8000, "125m": 32000}  # the demo tokenizer's size, the nominal 32000 of 125m and up
SHAPE = {"demo": (8, 256), "125m": (2, 256)}  # micro-batch, seq_len (the demo's; 125m kept short)
# glibc's malloc serves blocks above a threshold with mmap and returns them on free; by default the
# threshold grows with every large free, after which freed blocks stay resident in its heap and the
# peak grows from step to step (measured: docs/planning.md). A fixed threshold makes resident
# memory follow the live tensors, as a GPU allocator's allocated bytes do.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(overrides: list[str], vocab: int, steps: int, out: str) -> None:
    """One rank of one configuration (run under torchrun for several)."""
    import torch

    torch.set_num_threads(1 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 2)
    import deepspeed
    import torch.distributed as dist

    from newtonlm.models import build_model
    from newtonlm.quiet import quiet_expected_notices
    from newtonlm.training.config import compose_train_config, load_settings
    from newtonlm.training.distributed import init_distributed
    from newtonlm.training.loop import token_loss_sum
    from newtonlm.training.optim import build_optimizer, build_scheduler, deepspeed_config

    quiet_expected_notices()
    cfg = compose_train_config(overrides)
    train, _ = load_settings(cfg)
    info = init_distributed(train.dist_timeout_s)
    dist.barrier()
    base_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak resident memory := current
    torch.manual_seed(train.seed)
    model = build_model(cfg.model, vocab)
    if train.activation_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(train, info.world_size),
                                      dist_init_required=False)
    init_kb = _status_kb("VmHWM")
    g = torch.Generator().manual_seed(info.rank)
    B, T = train.micro_batch_size, train.seq_len
    t0 = time.perf_counter()
    for _ in range(steps):
        for _ in range(train.grad_accum):
            ids = torch.randint(0, vocab, (B, T + 1), generator=g)
            batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
            loss = token_loss_sum(engine, batch, info.device)
            engine.backward(loss * (info.world_size / (B * T * train.grad_accum * info.world_size)),
                            scale_wrt_gas=False)
            engine.step()
    peak_kb = _status_kb("VmHWM")
    rec = {"rank": info.rank, "base_mb": base_kb / 1024, "init_peak_mb": (init_kb - base_kb) / 1024,
           "peak_mb": (peak_kb - base_kb) / 1024, "step_s": (time.perf_counter() - t0) / steps}
    records = [None] * info.world_size
    dist.all_gather_object(records, rec)
    if info.rank == 0:
        Path(out).write_text(json.dumps(records))
    dist.destroy_process_group()


def configurations(presets: list[str]):
    for preset in presets:
        size = preset.rsplit("_", 1)[1]
        mbs, T = SHAPE[size]
        for nproc in (1, 2):
            for zero in (0, 3):
                for ckpt in (False, True):
                    overrides = [f"model={preset}", f"train.micro_batch_size={mbs}", f"train.seq_len={T}",
                                 f"train.zero_stage={zero}", f"train.activation_checkpointing={ckpt}",
                                 "train.precision=fp32", "train.grad_accum=1"]
                    yield preset, nproc, zero, ckpt, overrides, VOCAB[size]


def measure(overrides: list[str], vocab: int, nproc: int, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.json")
        args = [__file__, "--worker", json.dumps(overrides), str(vocab), str(steps), out]
        cmd = ([sys.executable, *args] if nproc == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(nproc), *args])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1" if nproc > 1 else "2",
               **MALLOC_ENV}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        if res.returncode != 0:
            raise RuntimeError(f"measurement failed ({overrides}, {nproc} proc):\n{res.stderr[-3000:]}")
        return json.loads(Path(out).read_text())


def predict(overrides: list[str], vocab: int, nproc: int) -> dict:
    from newtonlm.training.plan import make_plan, setup_from_args

    s, _ = setup_from_args([*overrides, f"world={nproc}", f"vocab={vocab}", "device=cpu"])
    plan = make_plan(s)
    return plan["memory"]["checkpointing" if s.checkpointing else "no_checkpointing"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, overrides, vocab, steps, out = sys.argv
        worker(json.loads(overrides), int(vocab), int(steps), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="paragru_demo,paragru_125m")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--from-json", help="no measurement: predict again for the rows of this file (written "
                    "by --json), e.g. after a change to the planner")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from newtonlm.machine import machine_info, machine_line
    from newtonlm.quiet import quiet_expected_notices

    quiet_expected_notices()
    if args.from_json:
        stored = json.loads(Path(args.from_json).read_text())
        stored_ranks = {(r["preset"], r["procs"], r["zero_stage"], r["checkpointing"]): r["ranks"]
                    for r in stored["rows"]}
        info = stored["machine"]
    rows = []
    print(f"{'preset':14s} {'procs':>5s} {'ZeRO':>4s} {'ckpt':>5s} {'measured MiB':>12s} "
          f"{'predicted MiB':>13s} {'error':>7s} {'init MiB':>8s}", flush=True)
    for preset, nproc, zero, ckpt, overrides, vocab in configurations(args.presets.split(",")):
        recs = (stored_ranks[preset, nproc, zero, ckpt] if args.from_json
                else measure(overrides, vocab, nproc, args.steps))
        measured = max(r["peak_mb"] for r in recs)
        pred = predict(overrides, vocab, nproc)
        predicted = pred["peak"] / 2**20
        row = {"preset": preset, "procs": nproc, "zero_stage": zero, "checkpointing": ckpt,
               "steps": args.steps,
               "overrides": overrides, "vocab": vocab, "measured_mb": measured, "predicted_mb": predicted,
               "error": predicted / measured - 1, "init_peak_mb": max(r["init_peak_mb"] for r in recs),
               "ranks": recs, "predicted": {k: v for k, v in pred.items() if k != "cost"}}
        rows.append(row)
        print(f"{preset:14s} {nproc:5d} {zero:4d} {str(ckpt):>5s} {measured:12.0f} {predicted:13.0f} "
              f"{row['error']:+7.1%} {row['init_peak_mb']:8.0f}", flush=True)
    if not args.from_json:
        info = machine_info()
    print(("measured on: " if args.from_json else "") + machine_line(info))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
