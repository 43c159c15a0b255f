"""The compiled CPU path: ``csrc/cpu_kernels.c`` built with the system C compiler at first use.

The library is plain C (no PyTorch headers), so it builds in about a second; it is cached under
``$NEWTONLM_CACHE`` (default ``~/.cache/newtonlm``) keyed by the source, the compiler flags and the
CPU's feature flags, written to a temporary name and renamed, so that concurrent ranks never see a
half-written file. Tensors are passed by pointer through ``ctypes``.

Threads: the C functions process a range of work items (batch row x block of 64 channels); the
range is split over ``torch.get_num_threads()`` Python threads (ctypes releases the GIL). No
OpenMP: a second OpenMP runtime beside PyTorch's spin-waits between calls and, on 2 cores, made
every alternation of C calls and PyTorch ops ~20x slower.

If no compiler is available (or ``NEWTONLM_NO_CEXT=1``), :func:`available` is False and callers
use the PyTorch loops instead; :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("csrc") / "cpu_kernels.c"
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-std=c11"]
# Linked in a separate step without -ffast-math: gcc (before 13) links crtfastmath.o into a shared
# library built with -ffast-math, whose constructor sets flush-to-zero and denormals-are-zero in
# the MXCSR of the process that loads it, i.e. changes every later PyTorch CPU op in the process.
_LINK_FLAGS = ["-shared"]
_lib = None
_status = "not loaded yet"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("NEWTONLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "newtonlm"
    )
    return Path(root)


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    key = hashlib.sha256(
        _SRC.read_bytes()
        + " ".join([cc, *_FLAGS, "|", *_LINK_FLAGS]).encode()
        + _cpu_signature().encode()
        + platform.machine().encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"cpu_kernels_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    obj = tmp[:-3] + ".o"
    try:
        for what, cmd in (("compiling", [cc, *_FLAGS, "-c", str(_SRC), "-o", obj]),
                          ("linking", [cc, *_LINK_FLAGS, obj, "-o", tmp, "-lm"])):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{what} {_SRC} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)
    return out


def _load():
    global _lib, _status
    if _lib is not None or _status != "not loaded yet":
        return _lib
    if os.environ.get("NEWTONLM_NO_CEXT") == "1":
        _status = "disabled by NEWTONLM_NO_CEXT=1"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (RuntimeError, OSError) as exc:
        _status = f"unavailable: {exc}"
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suf in ("f32", "f64"):
        for name in ("scan_diag", "scan_block2"):
            getattr(lib, f"{name}_{suf}").argtypes = [p, p, p, p, i64, i64, i64, i32, i64, i64]
        getattr(lib, f"gru_sequential_{suf}").argtypes = [p, p, p, p, i64, i64, i64, i64, i64]
        getattr(lib, f"lstm_sequential_{suf}").argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64]
        getattr(lib, f"gru_adjoint_{suf}").argtypes = [p] * 8 + [i64, i64, i64, i64, i64]
        getattr(lib, f"lstm_adjoint_{suf}").argtypes = [p] * 10 + [i64, i64, i64, i64, i64]
    _lib = lib
    _status = "loaded"
    return _lib


def available() -> bool:
    """True when the compiled library is (or can be) loaded."""
    return _load() is not None


def status() -> str:
    _load()
    return _status


def supports(*tensors) -> bool:
    """Whether these tensors can go through the C path: CPU, fp32 or fp64, all one dtype."""
    ts = [t for t in tensors if t is not None]
    return (
        available()
        and all(t.device.type == "cpu" for t in ts)
        and len({t.dtype for t in ts}) == 1
        and ts[0].dtype in (torch.float32, torch.float64)
    )


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _suffix(t):
    return "f32" if t.dtype == torch.float32 else "f64"


_CH = 64  # channels per work item, as CH in cpu_kernels.c
_pool: ThreadPoolExecutor | None = None


def _run(fn, args, B, N):
    """Call ``fn(*args, w_begin, w_end)`` over all work items, split across threads."""
    work = B * ((N + _CH - 1) // _CH)
    nthreads = min(max(1, torch.get_num_threads()), work)
    if nthreads == 1:
        fn(*args, 0, work)
        return
    global _pool
    if _pool is None or _pool._max_workers < nthreads:
        _pool = ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="newtonlm-cpu")
    bounds = [work * i // nthreads for i in range(nthreads + 1)]
    futures = [_pool.submit(fn, *args, bounds[i], bounds[i + 1]) for i in range(1, nthreads)]
    fn(*args, bounds[0], bounds[1])
    for f in futures:
        f.result()


def scan_diag(J, r, h0=None, reverse=False):
    """J, r [B, T, N]; h0 [B, N] or None -> h [B, T, N]."""
    J, r = J.contiguous(), r.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    B, T, N = r.shape
    out = torch.empty_like(r)
    _run(
        getattr(_load(), f"scan_diag_{_suffix(r)}"),
        (_ptr(J), _ptr(r), _ptr(h0), _ptr(out), B, T, N, int(reverse)),
        B,
        N,
    )
    return out


def scan_block2(J, r, h0=None, reverse=False):
    """J [B, T, 2, 2, N], r [B, T, 2, N]; h0 [B, 2, N] or None -> s [B, T, 2, N]."""
    J, r = J.contiguous(), r.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    B, T, _, N = r.shape
    out = torch.empty_like(r)
    _run(
        getattr(_load(), f"scan_block2_{_suffix(r)}"),
        (_ptr(J), _ptr(r), _ptr(h0), _ptr(out), B, T, N, int(reverse)),
        B,
        N,
    )
    return out


def gru_sequential(u, A, h0=None):
    """u [B, T, 3, N], A [3, N], h0 [B, N] or None -> h [B, T, N]."""
    u, A = u.contiguous(), A.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    B, T, _, N = u.shape
    out = torch.empty(B, T, N, dtype=u.dtype)
    _run(
        getattr(_load(), f"gru_sequential_{_suffix(u)}"),
        (_ptr(u), _ptr(A), _ptr(h0), _ptr(out), B, T, N),
        B,
        N,
    )
    return out


def lstm_sequential(u, A, C, s0=None):
    """u [B, T, 3, N], A [3, N], C [2, N], s0 [B, 2, N] or None -> s [B, T, 2, N] (c, h)."""
    u, A, C = u.contiguous(), A.contiguous(), C.contiguous()
    s0 = None if s0 is None else s0.contiguous()
    B, T, _, N = u.shape
    out = torch.empty(B, T, 2, N, dtype=u.dtype)
    _run(
        getattr(_load(), f"lstm_sequential_{_suffix(u)}"),
        (_ptr(u), _ptr(A), _ptr(C), _ptr(s0), _ptr(out), B, T, N),
        B,
        N,
    )
    return out


def gru_adjoint(u, A, h0, h, g):
    """Fused adjoint of :func:`gru_sequential`: -> (du [B, T, 3, N], dA [3, N], dh0 [B, N] or None)."""
    u, A, h, g = u.contiguous(), A.contiguous(), h.contiguous(), g.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    B, T, _, N = u.shape
    du = torch.empty_like(u)
    dA = torch.empty(B, 3, N, dtype=u.dtype)
    dh0 = None if h0 is None else torch.empty_like(h0)
    _run(
        getattr(_load(), f"gru_adjoint_{_suffix(u)}"),
        (_ptr(u), _ptr(A), _ptr(h0), _ptr(h), _ptr(g), _ptr(du), _ptr(dA), _ptr(dh0), B, T, N),
        B,
        N,
    )
    return du, dA.sum(0), dh0


def lstm_adjoint(u, A, C, s0, s, g):
    """Fused adjoint of :func:`lstm_sequential`: -> (du, dA [3, N], dC [2, N], ds0 or None)."""
    u, A, C, s, g = u.contiguous(), A.contiguous(), C.contiguous(), s.contiguous(), g.contiguous()
    s0 = None if s0 is None else s0.contiguous()
    B, T, _, N = u.shape
    du = torch.empty_like(u)
    dA = torch.empty(B, 3, N, dtype=u.dtype)
    dC = torch.empty(B, 2, N, dtype=u.dtype)
    ds0 = None if s0 is None else torch.empty_like(s0)
    _run(
        getattr(_load(), f"lstm_adjoint_{_suffix(u)}"),
        (
            _ptr(u),
            _ptr(A),
            _ptr(C),
            _ptr(s0),
            _ptr(s),
            _ptr(g),
            _ptr(du),
            _ptr(dA),
            _ptr(dC),
            _ptr(ds0),
            B,
            T,
            N,
        ),
        B,
        N,
    )
    return du, dA.sum(0), dC.sum(0), ds0
