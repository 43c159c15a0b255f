"""Linear recurrence solvers (the scan inside every Newton step and the adjoint).

``linear_scan(J, r, h0, reverse=..., structure=..., backend=...)`` solves

    forward:  h_t = J_t h_{t-1} + r_t   (t = 0..T-1, h_{-1} = h0 or 0)
    reverse:  h_t = J_t h_{t+1} + r_t   (t = T-1..0, h_T  = h0 or 0)

for a diagonal J (``J, r: [B, T, N]``, ``h0: [B, N]``) or 2x2 blocks of diagonals
(``J: [B, T, 2, 2, N]``, ``r: [B, T, 2, N]``, ``h0: [B, 2, N]``).

Backends (measured choices are in docs/benchmarks.md):

* ``"reference"``: the naive loop of :mod:`newtonlm.kernels.reference`;
* ``"cpu"``: the compiled C kernels (each thread walks time for a block of channels);
* ``"torch"``: a preallocated PyTorch loop (CPU fallback when no C compiler is available);
* ``"doubling"``: log-depth Hillis-Steele doubling in PyTorch (parallel over T, O(T log T) work;
  a pure-PyTorch option on GPU);
* ``"triton"``: chunked Triton kernels (GPU, or CPU under ``TRITON_INTERPRET=1``);
* ``"auto"``: ``cpu`` (else ``torch``) on CPU, ``triton`` on CUDA.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import cpu_ext, reference
from .cells import BLOCK2, DIAG, STRUCTURES

BACKENDS = ("auto", "reference", "cpu", "torch", "doubling", "triton")


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, or on CPU tensors under the Triton interpreter, and
    only where the triton package is installed."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_backend(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu" if cpu_ext.available() else "torch"
    return "triton" if triton_usable(device) else "doubling"


def _check(J, r, h0, structure):
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r}; expected one of {STRUCTURES}")
    if not isinstance(r, torch.Tensor) or not isinstance(J, torch.Tensor):
        raise ValueError("J and r must be tensors")
    if structure == DIAG:
        if r.dim() != 3:
            raise ValueError(f"r has shape {tuple(r.shape)}; expected [B, T, N]")
        j_shape, h_shape = tuple(r.shape), (r.shape[0], r.shape[2])
        j_doc, h_doc = "[B, T, N] like r", "[B, N]"
    else:
        if r.dim() != 4 or r.shape[2] != 2:
            raise ValueError(f"r has shape {tuple(r.shape)}; expected [B, T, 2, N]")
        B, T, _, N = r.shape
        j_shape, h_shape = (B, T, 2, 2, N), (B, 2, N)
        j_doc, h_doc = "[B, T, 2, 2, N]", "[B, 2, N]"
    if tuple(J.shape) != j_shape:
        raise ValueError(f"J has shape {tuple(J.shape)}; expected {j_shape} ({j_doc})")
    if h0 is not None and tuple(h0.shape) != h_shape:
        raise ValueError(f"h0 has shape {tuple(h0.shape)}; expected {h_shape} ({h_doc})")
    for name, t in (("J", J), ("h0", h0)):
        if t is not None and t.device != r.device:
            raise ValueError(f"{name} is on {t.device}; expected {r.device} like r")
        if t is not None and t.dtype != r.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}; expected {r.dtype} like r")
    if not r.dtype.is_floating_point:
        raise ValueError(f"r has dtype {r.dtype}; expected a floating-point dtype")


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
    if backend == "auto":
        backend = default_backend(r.device)
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


__all__ = ["linear_scan", "BACKENDS", "DIAG", "BLOCK2", "default_backend", "triton_usable"]
