"""Cost of the four architectures: ``python -m newtonlm.models.bench [--json] [--generation]``.

Training (default). For each size ("demo": the demo presets; "10m": the demo presets widened to
~10M parameters, see :data:`SIZE_10M`; "125m": the 125M presets) and each sequence length T, every
architecture runs forward + backward (loss over all tokens, no optimizer step) on random tokens,
fp32, ``--tokens`` tokens per step (batch = tokens / T, at least 1). Steps are interleaved over the
architectures (round r times every architecture once) so that a change of machine load hits all of
them alike. tokens/s comes from the fastest of the timed steps (on a shared machine the least
disturbed one; the median is in the JSON too), and ratios are to the Transformer (Llama) of the same
size and T in the same run.

Generation (``--generation``): batch 1, for each context length L every model prefills L random
tokens through its own forward with the cache (``--prefill-chunk`` tokens per call, each call
continuing from the cache the previous one returned), then decodes single tokens with the cache
(``model(input_ids=next [1, 1], cache=cache, use_cache=True)``, greedy), ``--new-tokens`` timed
steps interleaved over the architectures. Time per token from the fastest step (median in the
JSON); the cache's size is counted from the tensors the cache object holds (:func:`cache_nbytes`):
a fixed-size state for ParaRNN and Mamba2, a KV cache growing with L for Llama.

Memory, measured in one separate untimed step (training) or over the prefill + first decode step
(generation): on CPU the largest growth of the process's resident memory over its value just before
(sampled every millisecond by a thread, after returning freed memory to the OS with
``malloc_trim``): activations, gradients and temporaries, not the weights; on CUDA the growth of
``torch.cuda.max_memory_allocated``. Timed steps run without the trim, as in training.

"Does not fit": a point is not run when the memory extrapolated from the same model's largest
measured point (linear in tokens per step) exceeds the budget (``--mem-budget-gb``, default 60 % of
the memory available at start: ``MemAvailable`` on CPU, free device memory on CUDA), or when it runs
out of memory (on CPU the process's data segment is limited to its size + the budget + 64 MB during
each step, so that running out is a clean allocation error, not the kernel's OOM killer); its row
says why and the command goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
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
# size -> (the presets it starts from, per-architecture overrides)
SIZES = {"demo": ("demo", {}), "10m": ("demo", SIZE_10M), "125m": ("125m", {})}
MEM_FRACTION = 0.6  # default budget: this share of the memory available at start


def bench_preset(arch: str, size: str) -> dict:
    """The benchmarked preset of ``arch`` at ``size`` (a key of :data:`SIZES`)."""
    base, overrides = SIZES[size]
    return {**load_preset(f"{arch}_{base}"), **overrides.get(arch, {})}


# ---------------------------------------------------------------------------------------- memory

def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vmdata_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmData:"))


def _release(device: torch.device):
    """Return freed memory to the OS (CPU) or to the driver (CUDA), so growth is measured from it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the peak is then an underestimate
        pass


def _memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_bytes()


def available_memory(device: torch.device) -> int:
    """Bytes available now: ``MemAvailable`` (CPU) or free device memory (CUDA)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))


class _PeakMemory:
    """Peak memory above the starting value: resident memory sampled every millisecond in a thread
    (CPU), ``max_memory_allocated`` (CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.base = self.peak = _memory_now(self.device)
        if self.device.type != "cuda":
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base


LIMIT_HEADROOM = 64 * 2**20  # above the budget: thread stacks (the memory sampler's, OpenMP's), arenas


@contextlib.contextmanager
def _memory_limit(device: torch.device, budget: int):
    """On CPU, limit the data segment to its size now + ``budget`` + :data:`LIMIT_HEADROOM` bytes:
    an allocation beyond it fails with an error (caught as "does not fit") instead of waking the OOM
    killer on a shared machine. On CUDA the allocator raises ``OutOfMemoryError`` by itself."""
    if device.type == "cuda":
        yield
        return
    old = resource.getrlimit(resource.RLIMIT_DATA)
    limit = _vmdata_bytes() + budget + LIMIT_HEADROOM
    if old[1] != resource.RLIM_INFINITY:
        limit = min(limit, old[1])
    resource.setrlimit(resource.RLIMIT_DATA, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, old)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg)


def _oom_reason(e: BaseException, budget: int) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return f"out of memory within the budget of {budget / 2**20:.0f} MB ({first})"


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------------- training

def _step(model, ids) -> float:
    """One forward + backward; returns its seconds."""
    _sync(ids.device)
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    _sync(ids.device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def _step_memory(model, ids) -> int:
    """Peak memory growth (bytes) during one forward + backward."""
    _release(ids.device)
    with _PeakMemory(ids.device) as mem:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return mem.growth


def _first_steps(model, ids, warmup: int) -> int:
    """``warmup`` untimed steps (compiled kernels, allocator), then the memory step: its bytes."""
    for _ in range(warmup):
        _step(model, ids)
    return _step_memory(model, ids)


def estimate_fit(measured: dict | None, batch: int, T: int, budget: int) -> str | None:
    """Why a step of ``batch`` x ``T`` tokens does not fit in ``budget`` bytes, or None when it may.

    ``measured``: the same model's largest measured point (``{T, batch, peak_mem_mb}``, or with
    ``fits`` False one that did not fit); its memory is extrapolated linearly in tokens per step
    (activations, logits and the recurrences' states are linear in it; so is attention, which the
    SDPA kernels compute without a T x T matrix). None measured: no estimate, the step is tried."""
    if measured is None:
        return None
    tokens, ref_tokens = batch * T, measured["batch"] * measured["T"]
    if not measured.get("fits", True):
        return (f"T={measured['T']} (batch {measured['batch']}) did not fit and this step has at least "
                f"as many tokens" if tokens >= ref_tokens else None)
    est = measured["peak_mem_mb"] * 2**20 * tokens / ref_tokens
    if est <= budget:
        return None
    return (f"estimated {est / 2**20:.0f} MB (T={measured['T']} batch {measured['batch']} measured "
            f"{measured['peak_mem_mb']:.0f} MB, x{tokens / ref_tokens:g} tokens) "
            f"> budget {budget / 2**20:.0f} MB")


def training_row(size: str, T: int, batch: int, arch: str, params: int, times: list[float] | None,
                 mem: int | None, reason: str | None = None) -> dict:
    """One row of the training table from the timed steps' seconds and the peak memory (bytes);
    ``reason`` (why it did not fit) instead of them for a point that was not measured."""
    row = {"size": size, "T": T, "batch": batch, "arch": arch, "params": params, "fits": reason is None,
           "reason": reason, "tokens_per_s": None, "tokens_per_s_median": None, "step_s": None,
           "step_s_median": None, "peak_mem_mb": None}
    if reason is None:
        best, median = min(times), statistics.median(times)
        row.update(tokens_per_s=batch * T / best, tokens_per_s_median=batch * T / median, step_s=best,
                   step_s_median=median, peak_mem_mb=mem / 2**20)
    return row


def add_ratios(rows: list[dict], key: str = "tokens_per_s"):
    """Set each row's ``ratio_vs_llama`` = its ``key`` / the llama row's (rows of one size and length;
    None where either did not fit or there is no llama row)."""
    ref = next((r for r in rows if r["arch"] == "llama" and r[key]), None)
    for r in rows:
        r["ratio_vs_llama"] = r[key] / ref[key] if ref and r[key] else None


def _guarded(device, budget: int, fn, *args, release: bool = False):
    """``(fn(*args), None)``, or ``(None, reason)`` when it runs out of memory. ``release``: return
    freed memory first (the memory step and the prefill, which do so anyway), so that the limit
    counts from what is in use, not from what the allocator kept of earlier steps."""
    if release:
        _release(device)
    try:
        with _memory_limit(device, budget):
            return fn(*args), None
    except (MemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        reason = _oom_reason(e, budget)
    _release(device)
    return None, reason


def run(sizes=("demo", "10m"), seq_lens=(512, 2048), tokens: int = 4096, reps: int = 5,
        archs=ARCHS, seed: int = 0, warmup: int = 1, device="cpu", budget: int | None = None) -> list[dict]:
    """Training rows (:func:`training_row` + ``ratio_vs_llama``) for every size, T (ascending) and arch.
    ``budget``: bytes a step may grow by (default :data:`MEM_FRACTION` of the available memory)."""
    device = torch.device(device)
    budget = int(MEM_FRACTION * available_memory(device)) if budget is None else budget
    rows = []
    for size in sizes:
        largest = {}  # arch -> its largest measured (or failed) point, for the estimate
        for T in sorted(seq_lens):
            batch = max(1, tokens // T)
            torch.manual_seed(seed)
            ids = torch.randint(0, VOCAB, (batch, T), device=device)
            models = {a: build_model(bench_preset(a, size), VOCAB).to(device).train() for a in archs}
            times, mems, reasons = {a: [] for a in archs}, {}, {}
            for a in archs:
                reasons[a] = estimate_fit(largest.get(a), batch, T, budget)
                if reasons[a] is None:
                    mems[a], reasons[a] = _guarded(device, budget, _first_steps, models[a], ids, warmup,
                                                   release=True)
            for _ in range(reps):
                for a in archs:
                    if reasons[a] is None:
                        t, reasons[a] = _guarded(device, budget, _step, models[a], ids)
                        times[a] += [t] if t is not None else []
            group = [training_row(size, T, batch, a, count_parameters(models[a])["total"], times[a],
                                  mems.get(a), reasons[a]) for a in archs]
            add_ratios(group)
            largest.update((r["arch"], r) for r in group)
            rows += group
            del models
            _release(device)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'size':>5} {'T':>5} {'B':>3} {'arch':>9} {'params':>8} {'tok/s':>8} {'vs llama':>8} "
            f"{'step s':>7} {'peak MB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        left = f"{r['size']:>5} {r['T']:>5} {r['batch']:>3} {r['arch']:>9} {r['params'] / 1e6:>7.2f}M"
        if not r.get("fits", True):
            lines.append(f"{left} does not fit: {r['reason']}")
            continue
        ratio = "" if r["ratio_vs_llama"] is None else f"{r['ratio_vs_llama']:.2f}x"
        lines.append(f"{left} {r['tokens_per_s']:>8.0f} {ratio:>8} {r['step_s']:>7.3f} "
                     f"{r['peak_mem_mb']:>8.0f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ generation

def cache_nbytes(cache) -> int:
    """Bytes of the distinct tensors a transformers cache holds: keys and values of attention layers
    ([B, kv_heads, L, head_dim] each), conv windows and recurrent states of the recurrent layers."""
    seen, total = set(), 0
    stack = [v for layer in cache.layers for v in vars(layer).values()]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack += v.values()
        elif isinstance(v, (list, tuple)):
            stack += v
        elif isinstance(v, torch.Tensor) and v.numel() and (v.data_ptr(), v.shape) not in seen:
            seen.add((v.data_ptr(), v.shape))
            total += v.numel() * v.element_size()
    return total


@torch.no_grad()
def prefill(model, ids: torch.Tensor, chunk: int):
    """Feed ``ids [1, L]`` through the model with its cache, ``chunk`` tokens per call; returns
    ``(cache, next [1, 1])``, next = the greedy token after the context."""
    cache = None
    for start in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, start:start + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
    return cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(model, cache, token: torch.Tensor):
    """One generated token with the cache: ``(cache, next [1, 1], seconds)``."""
    _sync(token.device)
    t0 = time.perf_counter()
    out = model(input_ids=token, cache=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(token.device)
    return out.cache, nxt, time.perf_counter() - t0


def _prefill_measured(model, ids: torch.Tensor, chunk: int):
    """:func:`prefill` and one (warm-up) :func:`decode` step under :class:`_PeakMemory`:
    ``(cache, next, prefill seconds, cache bytes after the prefill, peak growth in bytes)``."""
    with _PeakMemory(ids.device) as mem:
        _sync(ids.device)
        t0 = time.perf_counter()
        cache, nxt = prefill(model, ids, chunk)
        _sync(ids.device)
        seconds = time.perf_counter() - t0
        nbytes = cache_nbytes(cache)
        cache, nxt, _ = decode(model, cache, nxt)
    return cache, nxt, seconds, nbytes, mem.growth


def generation_row(size: str, L: int, arch: str, params: int, prefill_s: float | None,
                   times: list[float] | None, cache_bytes: int | None, peak: int | None,
                   held: int | None, reason: str | None = None) -> dict:
    """One row of the generation table from the prefill's and the decode steps' seconds and the
    memory figures (bytes); ``reason`` instead of them for a point that was not measured."""
    row = {"size": size, "context": L, "arch": arch, "params": params, "fits": reason is None,
           "reason": reason, "prefill_s": None, "prefill_tokens_per_s": None, "ms_per_token": None,
           "ms_per_token_median": None, "tokens_per_s": None, "cache_mb": None, "peak_mem_mb": None,
           "held_mem_mb": None}
    if reason is None:
        best, median = min(times), statistics.median(times)
        row.update(prefill_s=prefill_s, prefill_tokens_per_s=L / prefill_s, ms_per_token=1e3 * best,
                   ms_per_token_median=1e3 * median, tokens_per_s=1 / best, cache_mb=cache_bytes / 2**20,
                   peak_mem_mb=peak / 2**20, held_mem_mb=held / 2**20)
    return row


def run_generation(sizes=("demo",), contexts=(512, 2048), new_tokens: int = 16, archs=ARCHS,
                   prefill_chunk: int = 1024, seed: int = 0, device="cpu",
                   budget: int | None = None) -> list[dict]:
    """Generation rows (:func:`generation_row` + ``ratio_vs_llama`` of tokens/s) for every size,
    context (ascending) and arch. ``peak_mem_mb``: growth over the prefill and the first decode step;
    ``held_mem_mb``: what stays after it (the cache, plus allocator slack)."""
    device = torch.device(device)
    budget = int(MEM_FRACTION * available_memory(device)) if budget is None else budget
    rows = []
    for size in sizes:
        models = {a: build_model(bench_preset(a, size), VOCAB).to(device).eval() for a in archs}
        failed = {}  # arch -> the context that did not fit: longer ones are not tried
        for L in sorted(contexts):
            torch.manual_seed(seed)
            ids = torch.randint(0, VOCAB, (1, L), device=device)
            state, group = {}, []
            for a in archs:
                if a in failed:
                    state[a] = f"context {failed[a]} did not fit"
                    continue
                _release(device)
                base = _memory_now(device)
                out, reason = _guarded(device, budget, _prefill_measured, models[a], ids, prefill_chunk,
                                       release=True)
                if reason is not None:
                    state[a], failed[a] = reason, L
                    continue
                cache, nxt, seconds, nbytes, peak = out
                _release(device)
                state[a] = {"cache": cache, "next": nxt, "prefill_s": seconds, "nbytes": nbytes, "peak": peak,
                            "held": _memory_now(device) - base, "times": []}
            for _ in range(new_tokens):
                for a in archs:
                    s = state[a]
                    if isinstance(s, dict):
                        s["cache"], s["next"], t = decode(models[a], s["cache"], s["next"])
                        s["times"].append(t)
            for a in archs:
                s, params = state[a], count_parameters(models[a])["total"]
                if isinstance(s, dict):
                    group.append(generation_row(size, L, a, params, s["prefill_s"], s["times"],
                                                s["nbytes"], s["peak"], s["held"]))
                else:
                    group.append(generation_row(size, L, a, params, None, None, None, None, None, s))
            add_ratios(group)
            rows += group
            del state
            _release(device)
    return rows


def format_generation_table(rows: list[dict]) -> str:
    head = (f"{'size':>5} {'context':>7} {'arch':>9} {'params':>8} {'ms/tok':>8} {'vs llama':>8} "
            f"{'prefill tok/s':>13} {'cache MB':>9} {'peak MB':>8} {'held MB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        left = f"{r['size']:>5} {r['context']:>7} {r['arch']:>9} {r['params'] / 1e6:>7.2f}M"
        if not r["fits"]:
            lines.append(f"{left} does not fit: {r['reason']}")
            continue
        ratio = "" if r["ratio_vs_llama"] is None else f"{r['ratio_vs_llama']:.2f}x"
        lines.append(f"{left} {r['ms_per_token']:>8.2f} {ratio:>8} {r['prefill_tokens_per_s']:>13.0f} "
                     f"{r['cache_mb']:>9.3f} {r['peak_mem_mb']:>8.0f} {r['held_mem_mb']:>8.0f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI

def _ints(p, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        p.error(f"{flag}={text!r}; expected comma-separated positive integers")
    return values


def _names(p, flag: str, text: str, allowed) -> list[str]:
    names = [s for s in text.split(",") if s]
    for s in names:
        if s not in allowed:
            p.error(f"{flag}: {s!r} is not one of {list(allowed)}")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON (machine + rows) instead of a table")
    p.add_argument("--generation", action="store_true",
                   help="time per generated token and cache memory against the context length")
    p.add_argument("--sizes", default=None, help="comma-separated, from " + ",".join(SIZES)
                   + " (default: demo,10m for training, demo for --generation)")
    p.add_argument("--seq", default="512,2048", help="training: comma-separated sequence lengths")
    p.add_argument("--tokens", type=int, default=4096, help="training: tokens per step (batch = tokens / T)")
    p.add_argument("--reps", type=int, default=5, help="training: timed steps per architecture")
    p.add_argument("--warmup", type=int, default=1, help="training: untimed steps before the memory step")
    p.add_argument("--contexts", default="512,2048", help="generation: comma-separated context lengths")
    p.add_argument("--new-tokens", type=int, default=16, help="generation: timed decode steps")
    p.add_argument("--prefill-chunk", type=int, default=1024, help="generation: tokens per prefill call")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help=f"memory a step may grow by (default {MEM_FRACTION:.0%} of the available memory)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    for flag in ("tokens", "reps", "new_tokens", "prefill_chunk"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}; expected a positive integer")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup}; expected 0 or more")
    if args.mem_budget_gb is not None and args.mem_budget_gb <= 0:
        p.error(f"--mem-budget-gb={args.mem_budget_gb}; expected a positive number of GB")
    if args.threads is not None:
        if args.threads <= 0:
            p.error(f"--threads={args.threads}; expected a positive integer")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        p.error(f"--device={device!r}; expected cpu or cuda[:index]")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device={device}; expected cpu{' or cuda' if torch.cuda.is_available() else ''} here")
    sizes = _names(p, "--sizes", args.sizes or ("demo" if args.generation else "demo,10m"), SIZES)
    archs = _names(p, "--archs", args.archs, ARCHS)
    budget = int((args.mem_budget_gb or 0) * 2**30) or int(MEM_FRACTION * available_memory(device))
    from ..quiet import no_cuda_kernel_notices

    no_cuda_kernel_notices()  # Mamba2's "CUDA kernels not installed" notice, on CPU
    if args.generation:
        rows = run_generation(sizes, _ints(p, "--contexts", args.contexts), args.new_tokens, archs,
                              args.prefill_chunk, device=device, budget=budget)
        settings = {"new_tokens": args.new_tokens, "prefill_chunk": args.prefill_chunk, "batch": 1}
    else:
        rows = run(sizes, _ints(p, "--seq", args.seq), args.tokens, args.reps, archs, warmup=args.warmup,
                   device=device, budget=budget)
        settings = {"tokens": args.tokens, "reps": args.reps, "warmup": args.warmup}
    kind = "generation" if args.generation else "training"
    if args.json:
        print(json.dumps({"machine": machine_info(), "kind": kind, "device": str(device), "vocab": VOCAB,
                          "memory_budget_mb": budget / 2**20, **settings, "rows": rows}, indent=1))
    else:
        what = "prefill + greedy decode, batch 1" if args.generation else "forward+backward"
        print(f"# {machine_line(machine_info())}; {device}, fp32, {what}; "
              f"memory budget {budget / 2**30:.1f} GB")
        print(format_generation_table(rows) if args.generation else format_table(rows))


if __name__ == "__main__":
    main()
