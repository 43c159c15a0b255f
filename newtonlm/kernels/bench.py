"""Benchmark of the Newton-scan core: ``python -m newtonlm.kernels.bench [--json] [--small]``.

For ParaGRU and ParaLSTM cells (recurrence only: the input drive ``u [B, T, 3, N]`` is given), at
each T: the time of forward and of forward+backward for

* ``autograd-seq``: autograd through sequential application (a Python loop of the cell's step),
  the baseline every ratio refers to;
* every path available on the device: modes ``sequential`` / ``parallel`` (and on CUDA
  ``triton`` / ``fused``), all with the adjoint backward; ``*-autodiff`` rows use the same cell
  through the custom-cell API (Jacobians from ``torch.func``) to show what a user-written cell gets;

plus peak memory over the call and achieved bandwidth (minimal bytes: forward reads u and writes
h; backward reads u, h, dL/dh and writes du) against a plain tensor copy measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from ..machine import machine_info as describe_machine
from . import cpu_ext
from .cells import Cell, GRUCell, LSTMCell
from .function import parallel_rnn
from .reference import sequential_apply
from .scan import triton_usable


class _AutodiffGRU(GRUCell):
    """GRU math through the custom-cell API: only ``step`` is inherited."""

    name = "gru-autodiff"
    jacobian = Cell.jacobian
    vjp = Cell.vjp


class _AutodiffLSTM(LSTMCell):
    name = "lstm-autodiff"
    jacobian = Cell.jacobian
    vjp = Cell.vjp


def _peak_rss_child(spec: dict) -> float:
    """In a fresh process: build the inputs, then run one forward+backward of ``spec['path']`` and
    report the growth of the peak resident set (MB). A fresh process is needed because the C
    allocator keeps freed memory, so a peak inside a long-lived process says nothing."""
    def status_kb(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key))

    cell = {"gru": GRUCell(), "lstm": LSTMCell()}[spec["cell"]]
    cpu_ext.available()  # load the library before measuring
    fns = _make_fns(cell, spec["T"], spec["B"], spec["N"], torch.device("cpu"), spec["path"])
    with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark (VmHWM) to now
        fh.write("5")
    before = status_kb("VmRSS:")
    fns[1]()
    return (status_kb("VmHWM:") - before) / 1024


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, min_time=0.3, max_reps=20):
    """Median-free simple timing: warm up once, then repeat until min_time; returns seconds/call."""
    fn()
    _sync(device)
    reps, total = 0, 0.0
    while reps < max_reps and (total < min_time or reps < 2):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        total += time.perf_counter() - t0
        reps += 1
        if total > 5 * min_time and reps >= 1:
            break
    return total / reps


def _peak_mb(fn, device, spec):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    out = subprocess.run([sys.executable, "-m", "newtonlm.kernels.bench", "--peak-child",
                          json.dumps(spec)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _inputs(cell, B, T, N, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, 3, N, generator=g).to(device)
    params = [(torch.randn(3, N, generator=g) * 2 / (5 * N) ** 0.5).clamp(-0.5, 0.5).to(device)]
    if cell.structure == "block2":
        params.append((torch.randn(2, N, generator=g) * 2 / (5 * N) ** 0.5).to(device))
    return u, params


def paths_for(device) -> list[tuple[str, str, bool]]:
    """(row name, mode, autodiff-cell) for the device."""
    if device.type == "cuda":
        return [("sequential", "sequential", False), ("parallel", "parallel", False),
                ("triton", "triton", False), ("fused", "fused", False),
                ("triton-autodiff", "triton", True)]
    return [("sequential", "sequential", False), ("parallel", "parallel", False),
            ("sequential-autodiff", "sequential", True), ("parallel-autodiff", "parallel", True)]


def _make_fns(cell, T, B, N, device, path):
    """(forward, forward+backward) closures for one row of the table."""
    u, params = _inputs(cell, B, T, N, device)
    zero = u.new_zeros((B, N) if cell.structure == "diag" else (B, 2, N))
    state_ndim = zero.dim() - 1
    if path == "autograd-seq":
        def run(uu, pp):
            return sequential_apply(cell.step, uu, pp, zero, state_ndim)
    else:
        mode, autodiff = {name: (m, a) for name, m, a in paths_for(device)}[path]
        c = (_AutodiffGRU() if cell.structure == "diag" else _AutodiffLSTM()) if autodiff else cell

        def run(uu, pp):
            return parallel_rnn(c, uu, pp, mode=mode)

    def fwd():
        with torch.no_grad():
            return run(u, tuple(params))

    def fwd_bwd():
        uu = u.detach().requires_grad_(True)
        pp = tuple(p.detach().requires_grad_(True) for p in params)
        h = run(uu, pp)
        h.backward(torch.ones_like(h))

    return fwd, fwd_bwd


def bench_one(cell, T, B, N, device, paths, baseline_max_T, done=None):
    """The rows of one (cell, T); ``done(row)`` is called as each row is measured (progress)."""
    state_elems = B * T * N * (1 if cell.structure == "diag" else 2)
    u_elems = B * T * 3 * N
    elem = 4
    fwd_bytes = (u_elems + state_elems) * elem
    bwd_bytes = (2 * u_elems + 2 * state_elems) * elem
    x = torch.empty(u_elems + state_elems, device=device)
    copy_s = _time(lambda: x.clone(), device)
    copy_bw = 2 * x.numel() * elem / copy_s
    names = (["autograd-seq"] if T <= baseline_max_T else []) + [p[0] for p in paths]
    rows = []
    for path in names:
        fwd, fb = _make_fns(cell, T, B, N, device, path)
        fwd_s, fb_s = _time(fwd, device), _time(fb, device)
        spec = {"cell": cell.name, "T": T, "B": B, "N": N, "path": path}
        rows.append({**spec, "fwd_ms": fwd_s * 1e3, "fwd_bwd_ms": fb_s * 1e3,
                     "peak_mb": _peak_mb(fb, device, spec),
                     "fwd_gbs": fwd_bytes / fwd_s / 1e9,
                     "fwd_bwd_gbs": (fwd_bytes + bwd_bytes) / fb_s / 1e9,
                     "copy_gbs": copy_bw / 1e9})
        if done is not None:
            done(rows[-1])
    base = next((r for r in rows if r["path"] == "autograd-seq"), None)
    for r in rows:
        r["fwd_speedup"] = base["fwd_ms"] / r["fwd_ms"] if base else None
        r["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"] if base else None
        r["fwd_bw_frac_of_copy"] = r["fwd_gbs"] / r["copy_gbs"]
    return rows


def machine_info(device) -> dict:
    """newtonlm.machine's description, plus the benchmarked device and the compiled CPU kernels'
    status."""
    info = {**describe_machine(), "device": str(device),
            "cpu_ext": cpu_ext.status() if device.type == "cpu" else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)  # the benchmarked device, not device 0
    return info


def format_table(rows) -> str:
    head = (f"{'cell':6} {'T':>6} {'path':20} {'fwd ms':>9} {'x seq':>7} {'fwd+bwd ms':>11} "
            f"{'x seq':>7} {'peak MB':>8} {'fwd GB/s':>9} {'% copy':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def sp(v):
            return f"{v:7.1f}" if v is not None else f"{'-':>7}"

        lines.append(f"{r['cell']:6} {r['T']:>6} {r['path']:20} {r['fwd_ms']:9.2f} "
                     f"{sp(r['fwd_speedup'])} {r['fwd_bwd_ms']:11.2f} {sp(r['fwd_bwd_speedup'])} "
                     f"{r['peak_mb']:8.1f} {r['fwd_gbs']:9.2f} {100 * r['fwd_bw_frac_of_copy']:6.1f}%")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--small", action="store_true", help="one short size (the demo)")
    ap.add_argument("--cells", default="gru,lstm")
    ap.add_argument("--T", default="1024,4096,16384", help="comma-separated sequence lengths")
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--N", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--baseline-max-T", type=int, default=16384,
                    help="skip the (slow) autograd-through-loop baseline above this T")
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_child:
        print(_peak_rss_child(json.loads(args.peak_child)))
        return None
    device = torch.device(args.device)
    Ts = [1024] if args.small else [int(t) for t in args.T.split(",")]
    cells = {"gru": GRUCell(), "lstm": LSTMCell()}
    names = [c.strip() for c in args.cells.split(",")]
    for n in names:
        if n not in cells:
            ap.error(f"--cells: unknown cell {n!r}; expected gru and/or lstm")
    paths = paths_for(device)
    if device.type == "cuda" and not triton_usable(device):
        paths = [p for p in paths if p[1] not in ("triton", "fused")]
    rows = []
    n_rows = sum(len(paths) + (T <= args.baseline_max_T) for T in Ts) * len(names)
    started, measured = time.perf_counter(), []

    def done(row):  # one line per measured row on stderr (stdout stays the table or the JSON)
        measured.append(row)
        print(f"[{len(measured)}/{n_rows} rows, {time.perf_counter() - started:.0f} s] {row['cell']} "
              f"T={row['T']} {row['path']}: fwd {row['fwd_ms']:.1f} ms, fwd+bwd "
              f"{row['fwd_bwd_ms']:.1f} ms", file=sys.stderr, flush=True)

    print(f"benchmarking {n_rows} rows ({', '.join(names)}; T in {Ts}; B={args.B}, N={args.N}; "
          f"{device}); each row times forward and forward+backward", file=sys.stderr, flush=True)
    for n in names:
        for T in Ts:
            new = bench_one(cells[n], T, args.B, args.N, device, paths, args.baseline_max_T, done)
            if not args.json:  # stream the table: header once, then each group as it is measured
                table = format_table(new)
                print(table if not rows else table.split("\n", 2)[2], flush=True)
            rows += new
    result = {"machine": machine_info(device), "dtype": "float32", "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\nmachine: {json.dumps(result['machine'])}")
    return result


if __name__ == "__main__":
    main()
