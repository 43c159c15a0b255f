"""Benchmark of sequence parallelism: ``python -m newtonlm.kernels.seqpar_bench [--json PATH]``.

For a ParaGRU / ParaLSTM layer (``D = N``, forward + backward of ``sum(h^2)``) over a sequence of T
steps split over K = 1, 2, 4 processes (gloo on CPU, one torch thread each; K = 1 is the
single-process layer), per cell and mode:

* ``step_ms``: the median wall time of one forward+backward over all ranks (a barrier before and
  after each step; rank 0's clock), and ``speedup`` against K = 1 of the same mode;
* ``iters``: Newton iterations per forward (the same on every rank);
* ``bytes_per_iter``: what one rank receives per Newton iteration (counted by
  :class:`~newtonlm.kernels.seqpar.CommStats`: the previous rank's state, the all-reduce of the
  residual, the all-gather of chunk summaries), the largest over the ranks; ``activation_bytes``:
  the chunk's states ``[B, L, N]`` (``[B, L, 2, N]``) that one Newton iteration writes, on the rank
  with the longest chunk; ``ratio``: the first over the second.

Mode ``parallel`` is Newton (the mode that splits the work); mode ``sequential`` (what "auto"
picks on CPU) passes the state rank after rank, so its ranks wait for each other: it shows the
cost of the pipeline, not a speedup. With K processes on fewer cores than K the processes share
cores: read the speedups against the machine's core count (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..machine import machine_info


def _rank_main(rank, world, init_file, spec, out_queue):
    torch.set_num_threads(spec["threads"])
    from .modules import ParaGRU, ParaLSTM
    from .newton import NewtonConfig
    from .seqpar import split_sequence

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cls = ParaGRU if spec["cell"] == "gru" else ParaLSTM
        N = spec["N"]
        layer = cls(N, N, spec["heads"], mode=spec["mode"], init="lm", a_max=0.5,  # the presets' bound
                    newton=NewtonConfig(max_iters=3))
        x = torch.randn(spec["B"], spec["T"], N)
        if spec["split"]:
            layer.set_sequence_parallel(dist.group.WORLD)
            x = split_sequence(x, dist.group.WORLD)
        x = x.clone().requires_grad_()
        times = []
        for i in range(spec["warmup"] + spec["steps"]):
            if i == spec["warmup"]:
                layer.stats.reset()
                layer.comm.reset()
            dist.barrier()
            t0 = time.perf_counter()
            out = layer(x)
            out.square().sum().backward()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        stats, comm = layer.stats, layer.comm
        forward_iters = stats.total_iterations / stats.newton_runs if stats.newton_runs else 0
        solves = comm.newton_iterations  # linear solves in the timed forwards
        fwd_bytes = sum(v for k, v in comm.bytes.items() if k not in ("check",))
        # the adjoint's all-gather is part of the backward: per iteration count the forward only
        adj = comm.calls.get("summary", 0) - solves
        per_summary = comm.bytes.get("summary", 0) / max(comm.calls.get("summary", 0), 1)
        fwd_bytes -= adj * per_summary
        states = 1 if spec["cell"] == "gru" else 2
        out_queue.put({
            "rank": rank, "step_s": statistics.median(times[spec["warmup"]:]),
            "iters": forward_iters, "chunk": x.shape[1],
            "bytes_per_iter": fwd_bytes / solves if solves else 0.0,
            "backward_bytes": adj * per_summary / spec["steps"],
            "activation_bytes": spec["B"] * x.shape[1] * states * N * 4,
            "fallbacks": stats.fallbacks,
        })
    finally:
        dist.destroy_process_group()


def run_case(spec: dict, world: int) -> dict:
    """One (cell, mode, K) measurement in ``world`` fresh processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        init = os.path.join(d, "init")
        procs = [ctx.Process(target=_rank_main, args=(r, world, init, spec, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        rows = [results.get(timeout=spec["timeout"]) for _ in range(world)]
        for p in procs:
            p.join()
    rows.sort(key=lambda r: r["rank"])
    bytes_per_iter = max(r["bytes_per_iter"] for r in rows)
    activation = max(r["activation_bytes"] for r in rows)
    return {"cell": spec["cell"], "mode": spec["mode"], "K": world, "B": spec["B"], "T": spec["T"],
            "N": spec["N"], "chunk": max(r["chunk"] for r in rows), "step_ms": 1e3 * rows[0]["step_s"],
            "iters": rows[0]["iters"], "bytes_per_iter": bytes_per_iter,
            "backward_bytes": max(r["backward_bytes"] for r in rows),
            "activation_bytes": activation, "ratio": bytes_per_iter / activation,
            "fallbacks": rows[0]["fallbacks"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", default=["gru", "lstm"], choices=["gru", "lstm"])
    ap.add_argument("--modes", nargs="+", default=["parallel", "sequential"],
                    choices=["parallel", "sequential"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--N", type=int, default=256)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    for K in args.ranks:
        if K < 1 or K > args.T:
            ap.error(f"--ranks {K}: expected 1 <= K <= T={args.T}")
    rows = []
    print(f"{'cell':5} {'mode':10} {'K':>2} {'chunk':>6} {'step ms':>9} {'speedup':>7} {'iters':>5} "
          f"{'B/iter/rank':>11} {'activ. B':>10} {'ratio':>8} {'bwd B':>8}", flush=True)
    for cell in args.cells:
        for mode in args.modes:
            base = None
            for K in args.ranks:
                spec = {"cell": cell, "mode": mode, "B": args.B, "T": args.T, "N": args.N,
                        "heads": args.heads, "steps": args.steps, "warmup": args.warmup,
                        "threads": args.threads, "timeout": args.timeout, "split": K > 1}
                row = run_case(spec, K)
                base = row["step_ms"] if K == 1 else base
                row["speedup"] = base / row["step_ms"] if base else None
                rows.append(row)
                sp = f"{row['speedup']:.2f}" if row["speedup"] else "-"
                print(f"{cell:5} {mode:10} {K:>2} {row['chunk']:>6} {row['step_ms']:>9.1f} {sp:>7} "
                      f"{row['iters']:>5.1f} {row['bytes_per_iter']:>11.0f} "
                      f"{row['activation_bytes']:>10.0f} {row['ratio']:>8.2e} "
                      f"{row['backward_bytes']:>8.0f}", flush=True)
    info = machine_info()
    print(f"# machine: {info['cpu']}, {info['cpu_count']} cores, {args.threads} torch thread(s) per "
          f"process, torch {info['torch']}, load average {info['load_average']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "args": vars(args), "rows": rows}, fh, indent=1)
        print(f"# wrote {args.json}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
