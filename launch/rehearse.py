"""Rehearse a multi-node job on one CPU machine, end to end, with the real parts:

    .venv/bin/python launch/rehearse.py [--size 125m] [--archs paragru,paralstm,mamba2,llama]
                                        [--out runs/rehearse] [--json REPORT] [-- extra overrides]

For each architecture's preset, through the real trainer (``python -m newtonlm.training.train``):

1. 2 processes (``torch.distributed.run``, gloo), ZeRO-3, activation checkpointing, bf16 autocast,
   ``--steps`` optimizer steps, then a checkpoint;
2. elastic resume of that checkpoint on 1 process (DeepSpeed's universal checkpoint re-partitions
   the ZeRO-3 states) for ``--more-steps`` steps; the log must say "resumed on 1 rank from a 2-rank
   checkpoint";
3. export of the final checkpoint to a Hugging Face folder (``python -m newtonlm.export``: the fp32
   weights consolidated from the ZeRO-3 shards), with its checks;
4. perplexity of the export (``python -m newtonlm.eval.perplexity``) on held-out text;
5. the memory planner's prediction for phase 1 (``python -m newtonlm.training.plan ... world=2
   device=cpu --json``).

Reported per architecture (table, and ``--json``): the peak resident memory of the largest process of
phases 1 and 2 (GNU time's maximum RSS of the process tree's largest member, so the whole process:
interpreter, torch, DeepSpeed, data loader and all), the same for a process that only imports what
the trainer imports (the baseline, measured once), the planner's CPU prediction of the training
state above that baseline, the checkpoint's size on disk, the median step time of each phase, the
losses, and the export's perplexity. Each phase runs in fresh processes; a failed phase stops that
architecture with its command and the tail of its output.

Everything runs on the bundled corpus with the demo tokenizer (no network). The global batch is
``--global-batch`` sequences of ``--seq-len`` tokens (micro-batch 1 on 2 ranks, 2 on 1 rank).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("paragru", "paralstm", "mamba2", "llama")
# as the planner's validation (scripts/validate_plan.py): a fixed malloc mmap threshold, so that the
# resident memory follows the live tensors instead of glibc's grown heap
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONUNBUFFERED": "1"}
TIME = "/usr/bin/time"
BASELINE = ("import torch, deepspeed, transformers, newtonlm.training.loop, newtonlm.models, "
            "newtonlm.data; import torch.distributed")


class PhaseFailed(RuntimeError):
    pass


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[str, float | None, float]:
    """Run ``cmd`` under GNU time (max RSS of the largest process of its tree, kB); output to ``log``.
    Returns (output, peak MiB or None without GNU time, wall seconds)."""
    rss_file = log.with_suffix(".rss")
    full = ([TIME, "-f", "%M", "-o", str(rss_file)] if Path(TIME).exists() else []) + cmd
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(full, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                              env={**os.environ, **ENV})
    wall = time.perf_counter() - t0
    out = log.read_text()
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-25:])
        raise PhaseFailed(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}")
    peak = None
    if rss_file.exists():
        lines = rss_file.read_text().split()
        peak = int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else None
    return out, peak, wall


def _records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rehearse(arch: str, args, out_dir: Path, py: str) -> dict:
    run_dir, hf_dir = out_dir / arch, out_dir / f"{arch}-hf"
    for d in (run_dir, hf_dir):
        if d.exists():
            shutil.rmtree(d)
    total = args.steps + args.more_steps
    common = [f"model={arch}_{args.size}", "train.zero_stage=3", "train.activation_checkpointing=true",
              "train.precision=bf16", f"train.seq_len={args.seq_len}", "train.micro_batch_size=2",
              f"train.global_batch_size={args.global_batch}", "train.eval_every=0", "train.sample_tokens=0",
              "train.progress=false", "train.log_every=1", f"train.save_every={args.steps}",
              "data.num_workers=0", f"data.val_sequences={args.val_sequences}", "wandb=disabled",
              f"hydra.run.dir={run_dir}", *args.overrides]
    result: dict = {"arch": arch, "preset": f"{arch}_{args.size}", "run_dir": str(run_dir)}
    train = [py, "-m", "newtonlm.training.train"]
    # 1. two processes, ZeRO-3
    dist = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "newtonlm.training.train"]
    _, peak2, wall2 = _run([*dist, *common, f"train.max_steps={args.steps}"],
                           out_dir / f"{arch}.1-train2.log", args.timeout)
    first = _records(run_dir)
    ckpt = run_dir / "checkpoints" / f"step_{args.steps:08d}"
    result.update(peak_rss_mb_2proc=peak2, wall_s_2proc=wall2, losses_2proc=[r["loss"] for r in first],
                  step_s_2proc=statistics.median(r["step_time_s"] for r in first[1:] or first),
                  checkpoint_bytes=_dir_bytes(ckpt) if ckpt.is_dir() else None)
    # 2. elastic resume on one process
    log, peak1, wall1 = _run([*train, *common, f"train.max_steps={total}"], out_dir / f"{arch}.2-resume1.log",
                             args.timeout)
    expected = "resumed on 1 rank from a 2-rank checkpoint"
    if expected not in log:
        where = out_dir / f"{arch}.2-resume1.log"
        raise PhaseFailed(f"the resume log does not say {expected!r}: see {where}")
    later = _records(run_dir)[len(first):]
    result.update(peak_rss_mb_1proc=peak1, wall_s_1proc=wall1, losses_1proc=[r["loss"] for r in later],
                  step_s_1proc=statistics.median(r["step_time_s"] for r in later[1:] or later),
                  resume_line=next(line for line in log.splitlines() if expected in line).strip())
    # 3. export (ZeRO-3 shards consolidated) and 4. its perplexity
    _run([py, "-m", "newtonlm.export", "--checkpoint", str(run_dir), "--out", str(hf_dir)],
         out_dir / f"{arch}.3-export.log", args.timeout)
    result["export_bytes"] = _dir_bytes(hf_dir)
    ppl_json = out_dir / f"{arch}.ppl.json"
    _run([py, "-m", "newtonlm.eval.perplexity", str(hf_dir), "--max-tokens", str(args.ppl_tokens),
          "--json", "--out", str(ppl_json), "--quiet"], out_dir / f"{arch}.4-perplexity.log", args.timeout)
    ppl = json.loads(ppl_json.read_text())
    result.update(export_ppl=ppl.get("ppl"), export_loss=ppl.get("loss"), export_tokens=ppl.get("tokens"))
    # 5. the planner's prediction for phase 1 (per rank: micro-batch 1 on 2 ranks)
    plan, _, _ = _run([py, "-m", "newtonlm.training.plan", *[o for o in common if not o.startswith(
        ("hydra.", "wandb=", "data.num_workers", "data.val_sequences"))], "world=2", "device=cpu", "--json"],
        out_dir / f"{arch}.5-plan.log", args.timeout)
    plan = json.loads(plan[plan.index("{"):])
    mode = "checkpointing"  # phase 1 runs with activation checkpointing
    result.update(plan_peak_mb_2proc=plan["memory"][mode]["peak"] / 2**20, plan_mode=mode)
    return result


def _baseline(py: str, out_dir: Path, timeout: float) -> float | None:
    _, peak, _ = _run([py, "-c", BASELINE], out_dir / "baseline.log", timeout)
    return peak


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[dict], baseline: float | None) -> str:
    head = ("| preset | peak RSS 2 proc (MiB) | minus baseline | planner (MiB) | peak RSS 1 proc | "
            "step s (2 proc / 1 proc) | checkpoint MB | losses (2 proc ; resumed) | export ppl |")
    rows = [head, "|" + "---|" * 9]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['preset']} | failed: {r['error'].splitlines()[0]} |" + " |" * 7)
            continue
        peak = r["peak_rss_mb_2proc"]
        above = None if peak is None or baseline is None else peak - baseline
        losses = (", ".join(f"{x:.3f}" for x in r["losses_2proc"]) + " ; "
                  + ", ".join(f"{x:.3f}" for x in r["losses_1proc"]))
        rows.append(f"| {r['preset']} | {_fmt(r['peak_rss_mb_2proc'], '.0f')} | {_fmt(above, '.0f')} | "
                    f"{r['plan_peak_mb_2proc']:.0f} | {_fmt(r['peak_rss_mb_1proc'], '.0f')} | "
                    f"{r['step_s_2proc']:.2f} / {r['step_s_1proc']:.2f} | "
                    f"{r['checkpoint_bytes'] / 1e6:.0f} | "
                    f"{losses} | {r['export_ppl']:.1f} |")
    rows.append(f"\nbaseline (a process importing what the trainer imports): {_fmt(baseline, '.0f')} MiB")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="125m", help="preset size: demo, 125m, ... (default 125m)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--steps", type=int, default=3, help="steps on 2 processes before the checkpoint")
    p.add_argument("--more-steps", type=int, default=2, help="steps after the elastic resume")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--val-sequences", type=int, default=4)
    p.add_argument("--ppl-tokens", type=int, default=20000,
                   help="held-out tokens for the export's perplexity")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "rehearse")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per phase")
    args = p.parse_args(argv)
    args.overrides = extra
    archs = [a for a in args.archs.split(",") if a]
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        p.error(f"--archs {','.join(bad)}: expected some of {','.join(ARCHS)}")
    for name in ("steps", "more_steps", "seq_len", "val_sequences", "ppl_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")
    if args.global_batch < 2 or args.global_batch % 2:
        p.error(f"--global-batch={args.global_batch}: expected an even number >= 2 (2 ranks, then 1)")
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    baseline = _baseline(py, args.out, args.timeout)
    results = []
    for arch in archs:
        t0 = time.perf_counter()
        try:
            r = rehearse(arch, args, args.out, py)
        except (PhaseFailed, subprocess.TimeoutExpired) as exc:
            r = {"arch": arch, "preset": f"{arch}_{args.size}", "error": str(exc)}
            print(f"{arch}: FAILED\n{exc}", file=sys.stderr)
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        print(f"{arch}: done in {r['wall_s']:.0f} s", file=sys.stderr)
    print(table(results, baseline))
    if args.json:
        from newtonlm.machine import machine_info

        args.json.write_text(json.dumps({"machine": machine_info(), "size": args.size,
                                         "steps": args.steps, "more_steps": args.more_steps,
                                         "seq_len": args.seq_len, "global_batch": args.global_batch,
                                         "overrides": extra, "baseline_rss_mb": baseline,
                                         "results": results}, indent=1))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
