"""Training-step throughput of the four architectures: ``python -m newtonlm.models.bench [--json]``.

For each size ("demo": the demo presets; "10m": the demo presets widened to ~10M parameters, see
:data:`SIZE_10M`) and each sequence length T, every architecture runs forward + backward (loss over
all tokens, no optimizer step) on random tokens, fp32, ``--tokens`` tokens per step (batch =
tokens / T). Steps are interleaved over the architectures (round r times every architecture once)
so that a change of machine load hits all of them alike. tokens/s comes from the fastest of the
timed steps (on a shared machine the least disturbed one; the median is in the JSON too), and
ratios are to the Transformer (Llama) of the same size and T in the same run.

Peak memory, measured in one separate untimed step: the largest growth of the process's resident
memory during the step over its value just before it (sampled every millisecond by a thread, after
returning freed memory to the OS with ``malloc_trim``): activations, gradients and temporaries, not
the weights. Timed steps run without the trim, as in training.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import threading
import time

import torch

from ..machine import machine_info, machine_line
from .factory import ARCHS, build_model, count_parameters
from .presets import load_preset

VOCAB = 8192
# ~10M parameters at vocabulary 8192 (all four within 2% of each other): the demo presets, wider.
SIZE_10M = {
    "paragru": {"hidden_size": 256, "num_hidden_layers": 10, "num_heads": 8, "intermediate_size": 448},
    "paralstm": {"hidden_size": 256, "num_hidden_layers": 10, "num_heads": 8, "intermediate_size": 448},
    "llama": {"hidden_size": 256, "num_hidden_layers": 10, "num_attention_heads": 4,
              "num_key_value_heads": 4, "intermediate_size": 768},
    "mamba2": {"hidden_size": 256, "num_hidden_layers": 20, "state_size": 64, "chunk_size": 64},
}
SIZES = {"demo": {}, "10m": SIZE_10M}


def bench_preset(arch: str, size: str) -> dict:
    """The benchmarked preset of ``arch`` at ``size`` ("demo" or "10m")."""
    return {**load_preset(f"{arch}_demo"), **SIZES[size].get(arch, {})}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the peak is then an underestimate
        pass


class _PeakRSS:
    """Peak resident memory above the starting value, sampled every millisecond in a thread."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _step(model, ids) -> float:
    """One forward + backward; returns its seconds."""
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def _step_memory(model, ids) -> int:
    """Peak RSS growth (bytes) during one forward + backward."""
    _trim()
    with _PeakRSS() as mem:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return mem.growth


def run(sizes=("demo", "10m"), seq_lens=(512, 2048), tokens: int = 4096, reps: int = 5,
        archs=ARCHS, seed: int = 0) -> list[dict]:
    """Rows ``{size, T, batch, arch, params, tokens_per_s(_median), step_s(_median), peak_mem_mb,
    ratio_vs_llama}`` (tokens/s and step time of the fastest timed step, and of the median one)."""
    rows = []
    for size in sizes:
        for T in seq_lens:
            batch = max(1, tokens // T)
            torch.manual_seed(seed)
            ids = torch.randint(0, VOCAB, (batch, T))
            models = {a: build_model(bench_preset(a, size), VOCAB).train() for a in archs}
            times = {a: [] for a in archs}
            mems = {}
            for a in archs:  # warm-up (compiled kernels, allocator), then the memory step
                _step(models[a], ids)
                mems[a] = _step_memory(models[a], ids)
            for _ in range(reps):
                for a in archs:
                    times[a].append(_step(models[a], ids))
            for a in archs:
                best, median = min(times[a]), statistics.median(times[a])
                rows.append({"size": size, "T": T, "batch": batch, "arch": a,
                             "params": count_parameters(models[a])["total"],
                             "tokens_per_s": batch * T / best, "tokens_per_s_median": batch * T / median,
                             "step_s": best, "step_s_median": median, "peak_mem_mb": mems[a] / 2**20})
            ref = next((r for r in rows[-len(archs):] if r["arch"] == "llama"), None)
            for r in rows[-len(archs):]:
                r["ratio_vs_llama"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
            del models
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'size':>5} {'T':>5} {'B':>3} {'arch':>9} {'params':>8} {'tok/s':>8} {'vs llama':>8} "
            f"{'step s':>7} {'peak MB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "" if r["ratio_vs_llama"] is None else f"{r['ratio_vs_llama']:.2f}x"
        lines.append(f"{r['size']:>5} {r['T']:>5} {r['batch']:>3} {r['arch']:>9} {r['params'] / 1e6:>7.2f}M "
                     f"{r['tokens_per_s']:>8.0f} {ratio:>8} {r['step_s']:>7.3f} {r['peak_mem_mb']:>8.0f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON (machine + rows) instead of a table")
    p.add_argument("--sizes", default="demo,10m", help="comma-separated, from " + ",".join(SIZES))
    p.add_argument("--seq", default="512,2048", help="comma-separated sequence lengths")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens / T)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per architecture (after 1 warm-up)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads <= 0:
            p.error(f"--threads={args.threads}; expected a positive integer")
        torch.set_num_threads(args.threads)
    sizes = [s for s in args.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            p.error(f"--sizes: {s!r} is not one of {list(SIZES)}")
    archs = [a for a in args.archs.split(",") if a]
    for a in archs:
        if a not in ARCHS:
            p.error(f"--archs: {a!r} is not one of {list(ARCHS)}")
    rows = run(sizes, [int(t) for t in args.seq.split(",")], args.tokens, args.reps, archs)
    if args.json:
        print(json.dumps({"machine": machine_info(), "rows": rows}, indent=1))
    else:
        print(f"# {machine_line(machine_info())}; fp32, forward+backward")
        print(format_table(rows))


if __name__ == "__main__":
    main()
