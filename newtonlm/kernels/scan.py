"""Linear recurrence solvers (the scan inside every Newton step and the adjoint), and the one
place that decides which solver and scan a call uses (:func:`choose_path`).

``linear_scan(J, r, h0, reverse=..., structure=..., backend=...)`` solves

    forward:  h_t = J_t h_{t-1} + r_t   (t = 0..T-1, h_{-1} = h0 or 0)
    reverse:  h_t = J_t h_{t+1} + r_t   (t = T-1..0, h_T  = h0 or 0)

for a diagonal J (``J, r: [B, T, N]``, ``h0: [B, N]``) or 2x2 blocks of diagonals
(``J: [B, T, 2, 2, N]``, ``r: [B, T, 2, N]``, ``h0: [B, 2, N]``).

Backends (measured choices are in docs/benchmarks.md):

* ``"reference"``: the naive loop of :mod:`newtonlm.kernels.reference`;
* ``"cpu"``: the compiled C kernels (each thread walks time for a block of channels);
* ``"torch"``: a preallocated PyTorch loop (CPU without the C library, or dtypes it lacks);
* ``"doubling"``: log-depth Hillis-Steele doubling in PyTorch (parallel over T, O(T log T) work;
  a pure-PyTorch option on GPU);
* ``"triton"``: chunked Triton kernels (GPU, or CPU under ``TRITON_INTERPRET=1``);
* ``"auto"``: what :func:`choose_path` picks for the adjoint of mode ``"auto"`` (cpu, else torch,
  on CPU; triton, else doubling, on CUDA).
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch

from . import cpu_ext, reference
from .cells import BLOCK2, DIAG, STRUCTURES
from .checks import check_device, check_dtype, check_floating, check_shape

BACKENDS = ("auto", "reference", "cpu", "torch", "doubling", "triton")
MODES = ("auto", "sequential", "parallel", "triton", "fused")
DIRECTIONS = ("forward", "backward")


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, or on CPU tensors under the Triton interpreter, and
    only where the triton package is installed."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


class Path(NamedTuple):
    """What runs one direction of a ``parallel_rnn`` call (see :func:`choose_path`).

    mode:  the forward solve: "sequential", "parallel", "triton" or "fused";
    scan:  the ``linear_scan`` backend of this direction ("cpu", "torch", "doubling", "triton"), or
           None when it runs no scan (a sequential forward, a fused adjoint kernel);
    fused: "c" or "triton" when a fused kernel of the built-in GRU/LSTM cell does this
           direction's work (the compiled C loop or adjoint; the Triton Newton or adjoint
           kernel), else None. A fused Newton forward whose result is not accepted continues
           with Newton iterations on ``scan``.
    """

    mode: str
    scan: str | None
    fused: str | None


def _resolve_mode(mode: str, device: torch.device, builtin: bool) -> str:
    if mode == "auto":
        # measured (docs/benchmarks.md): on a few CPU cores a Newton forward does ~4x the work of one
        # sequential pass and loses; on CUDA the fused kernels are the fast path of the built-in cells
        if device.type != "cuda":
            return "sequential"
        if not triton_usable(device):
            return "parallel"
        return "fused" if builtin else "triton"
    if mode in ("triton", "fused") and not triton_usable(device):
        raise ValueError(f"mode={mode!r} needs the triton package and CUDA tensors (got {device}) "
                         "or TRITON_INTERPRET=1 set before newtonlm is imported; use mode='auto'")
    if mode == "fused" and not builtin:
        raise ValueError("mode='fused' exists for the built-in GRU/LSTM cells only; use mode='triton' "
                         "or 'parallel' for other cells")
    return mode


def choose_path(mode: str, device: torch.device, structure: str, direction: str, dtype: torch.dtype,
                builtin: bool = False) -> Path:
    """The one decision of what runs: forward solve, scan backend and fused kernel for
    (mode, device, structure, direction, dtype). ``builtin``: the cell is exactly the built-in
    GRUCell or LSTMCell (the only cells with fused C and Triton kernels). The table is in
    docs/kernels.md ("Paths"); every backend handles both structures.

    ``direction`` is "forward" (the solve of ``h``) or "backward" (the adjoint). ``dtype`` is the
    dtype the tensors have when they reach the solver (``parallel_rnn`` solves in fp32 or fp64).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r}; expected one of {STRUCTURES}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; expected one of {DIRECTIONS}")
    device = torch.device(device)
    mode = _resolve_mode(mode, device, builtin)
    on_cpu = device.type == "cpu"
    has_c = on_cpu and dtype in (torch.float32, torch.float64) and cpu_ext.available()
    # the PyTorch-side scan: compiled C on CPU, a PyTorch loop without it, doubling elsewhere
    plain = ("cpu" if has_c else "torch") if on_cpu else "doubling"
    if mode == "fused":  # extra Newton iterations after the fused kernel use the Triton scan
        return Path(mode, "triton" if direction == "forward" else None, "triton")
    if mode == "triton":
        return Path(mode, "triton", None)
    if direction == "forward":
        if mode == "sequential":
            return Path(mode, None, "c" if builtin and has_c else None)
        return Path(mode, plain, None)
    if builtin and has_c:  # the compiled adjoint fuses the reversed scan and the VJPs
        return Path(mode, None, "c")
    if mode == "sequential" and device.type == "cuda" and triton_usable(device):
        return Path(mode, "triton", None)
    return Path(mode, plain, None)


def _check(J, r, h0, structure):
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r}; expected one of {STRUCTURES}")
    if structure == DIAG:
        check_shape("r", r, (None, None, None), "[B, T, N]")
        B, T, N = r.shape
        j_shape, h_shape, j_doc, h_doc = (B, T, N), (B, N), "[B, T, N] like r", "[B, N]"
    else:
        check_shape("r", r, (None, None, 2, None), "[B, T, 2, N]")
        B, T, _, N = r.shape
        j_shape, h_shape, j_doc, h_doc = (B, T, 2, 2, N), (B, 2, N), "[B, T, 2, 2, N]", "[B, 2, N]"
    check_shape("J", J, j_shape, j_doc)
    if h0 is not None:
        check_shape("h0", h0, h_shape, h_doc)
    for name, t in (("J", J), ("h0", h0)):
        if t is not None:
            check_device(name, t, r.device, "r")
            check_dtype(name, t, r.dtype, "r")
    check_floating("r", r)


def _apply(J, h, structure):
    if structure == DIAG:
        return J * h
    return (J * h.unsqueeze(-3)).sum(-2)


def _scan_torch(J, r, h0, reverse, structure):
    """Preallocated loop: one fused multiply-add per step, no allocation inside the loop."""
    T = r.shape[1]
    out = torch.empty_like(r)
    h = torch.zeros_like(r[:, 0]) if h0 is None else h0
    for s in range(T):
        t = T - 1 - s if reverse else s
        if structure == DIAG:
            torch.addcmul(r[:, t], J[:, t], h, out=out[:, t])
        else:
            torch.add(r[:, t], _apply(J[:, t], h, structure), out=out[:, t])
        h = out[:, t]
    return out


def _compose(Ja, Jb, structure):
    """The operator of applying Ja after Jb: Ja @ Jb."""
    if structure == DIAG:
        return Ja * Jb
    return torch.einsum("...ijn,...jkn->...ikn", Ja, Jb)


def _scan_doubling(J, r, h0, reverse, structure):
    """Hillis-Steele doubling over the time axis (dim 1)."""
    if reverse:
        J, r = J.flip(1), r.flip(1)
    b = r.clone()
    if h0 is not None:
        b[:, 0] = b[:, 0] + _apply(J[:, 0], h0, structure)
    a = J.clone()
    T, k = r.shape[1], 1
    while k < T:
        b_new = b.clone()
        b_new[:, k:] = _apply(a[:, k:], b[:, :-k], structure) + b[:, k:]
        a_new = a.clone()
        a_new[:, k:] = _compose(a[:, k:], a[:, :-k], structure)
        a, b, k = a_new, b_new, 2 * k
    return b.flip(1) if reverse else b


def linear_scan(J: torch.Tensor, r: torch.Tensor, h0: torch.Tensor | None = None, *,
                reverse: bool = False, structure: str = DIAG, backend: str = "auto") -> torch.Tensor:
    """Solve the linear recurrence (see module docstring). Returns h shaped like r."""
    _check(J, r, h0, structure)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    if backend == "auto":  # the adjoint's choice: every mode's adjoint runs a scan
        backend = choose_path("auto", r.device, structure, "backward", r.dtype).scan
    if backend == "reference":
        fn = reference.scan_diag_ref if structure == DIAG else reference.scan_block2_ref
        return fn(J, r, h0, reverse)
    if backend == "cpu":
        if not cpu_ext.supports(J, r, h0):
            raise ValueError(f"backend='cpu' needs fp32/fp64 CPU tensors and the compiled library "
                             f"(got {r.dtype} on {r.device}; library {cpu_ext.status()})")
        fn = cpu_ext.scan_diag if structure == DIAG else cpu_ext.scan_block2
        return fn(J, r, h0, reverse)
    if backend == "torch":
        return _scan_torch(J, r, h0, reverse, structure)
    if backend == "doubling":
        return _scan_doubling(J, r, h0, reverse, structure)
    if not triton_usable(r.device):
        raise ValueError(f"backend='triton' needs the triton package and CUDA tensors (got "
                         f"{r.device}) or TRITON_INTERPRET=1 set before newtonlm is imported")
    from . import triton_scan

    fn = triton_scan.triton_scan_diag if structure == DIAG else triton_scan.triton_scan_block2
    return fn(J, r, h0, reverse=reverse).to(r.dtype)


__all__ = ["BACKENDS", "BLOCK2", "DIAG", "DIRECTIONS", "MODES", "Path", "choose_path", "linear_scan",
           "triton_usable"]
