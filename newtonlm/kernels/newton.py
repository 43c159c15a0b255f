"""Newton's method over the whole sequence, and sequential application (the exact fallback).

All T steps of ``h_t = f(h_{t-1}, u_t)`` are one nonlinear system ``F(h) = 0`` with
``F_t(h) = h_t - f(h_{t-1}, u_t)``. Starting from ``h_t = f(0, u_t)`` (and ``h0`` for the first
step), each Newton iteration evaluates ``f`` and ``J_t = df/dh(h_{t-1}, u_t)`` for all t at once and
solves the block-bidiagonal system, a linear recurrence::

    delta_t = J_t delta_{t-1} + r_t,   r_t = f(h_{t-1}, u_t) - h_t,   h <- h + delta

The residual ``max |r|`` is measured before every iteration and once after the last. If it is not
finite, grows between iterations, or is still above ``accept_tol`` after ``max_iters``, the call is
answered by sequential application instead (a warning once per process, counted in the stats):
never a silently wrong answer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from . import cpu_ext
from .cells import DIAG, GRUCell, LSTMCell
from .scan import linear_scan

FALLBACKS = ("sequential", "raise")


@dataclass
class NewtonConfig:
    """Newton settings.

    max_iters: Newton iterations (the ParaRNN reference always runs 3).
    tol: stop early once the residual max|f(h_{t-1}, u_t) - h_t| is at or below this (None: never).
    accept_tol: a result whose final residual is above this is rejected (fallback); None picks
        1e-4 for fp32 and 1e-9 for fp64 (residuals of converged solves are ~1e-7 and ~1e-15),
        or ``tol`` if that is larger (a result meeting the user's tolerance is accepted).
    fallback: "sequential" (recompute step by step, warn once) or "raise".
    """

    max_iters: int = 3
    tol: float | None = None
    accept_tol: float | None = None
    fallback: str = "sequential"

    def __post_init__(self):
        if not isinstance(self.max_iters, int) or self.max_iters < 0:
            raise ValueError(f"max_iters={self.max_iters!r}; expected an integer >= 0")
        for name in ("tol", "accept_tol"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name}={v!r}; expected None or a number >= 0")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback={self.fallback!r}; expected one of {FALLBACKS}")

    def accept_for(self, dtype: torch.dtype) -> float:
        if self.accept_tol is not None:
            return self.accept_tol
        default = 1e-9 if dtype == torch.float64 else 1e-4
        return max(default, self.tol) if self.tol is not None else default


@dataclass
class NewtonStats:
    """Telemetry of solver calls, accumulated (``calls`` counts them; the last call's figures are in
    ``iterations`` and ``residual``; ``max_residual`` is the worst over the calls)."""

    calls: int = 0
    iterations: int = 0
    residual: float = 0.0
    max_residual: float = 0.0
    total_iterations: int = 0
    fallbacks: int = 0
    mode: str = ""
    history: list = field(default_factory=list, repr=False)

    def record(self, iterations: int, residual: float, fallback: bool, mode: str):
        self.calls += 1
        self.iterations = iterations
        self.residual = residual
        self.total_iterations += iterations
        if not math.isnan(residual):
            self.max_residual = max(self.max_residual, residual)
        else:
            self.max_residual = float("nan")
        self.fallbacks += int(fallback)
        self.mode = mode

    def reset(self):
        self.__init__()

    def as_dict(self) -> dict:
        mean = self.total_iterations / self.calls if self.calls else 0.0
        return {"calls": self.calls, "iterations": self.iterations, "mean_iterations": mean,
                "residual": self.residual, "max_residual": self.max_residual,
                "fallbacks": self.fallbacks}


class NewtonDivergence(RuntimeError):
    """Raised when Newton does not converge and ``fallback="raise"``."""


_warned = False


def _warn_once(msg: str):
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def shift(h: torch.Tensor, h0: torch.Tensor | None, structure: str) -> torch.Tensor:
    """h_{t-1} for every t: ``[B, T, ...]`` with ``h0`` (or 0) at t = 0."""
    prev = torch.empty_like(h)
    if h0 is None:
        prev[:, 0].zero_()
    else:
        prev[:, 0] = h0
    prev[:, 1:] = h[:, :-1]
    return prev


def state_shape(u: torch.Tensor, structure: str):
    B, T, _, N = u.shape
    return (B, T, N) if structure == DIAG else (B, T, 2, N)


def sequential_forward(cell, u, params, h0=None) -> torch.Tensor:
    """Apply the cell step by step (no autograd). The compiled C loop for the built-in cells on
    CPU; otherwise a preallocated PyTorch loop over ``cell.step``."""
    if cpu_ext.supports(u, h0, *params):
        if type(cell) is GRUCell:
            return cpu_ext.gru_sequential(u, params[0], h0)
        if type(cell) is LSTMCell:
            return cpu_ext.lstm_sequential(u, params[0], params[1], h0)
    out = u.new_empty(state_shape(u, cell.structure))
    h = out.new_zeros(out[:, 0].shape) if h0 is None else h0
    for t in range(u.shape[1]):
        out[:, t] = cell.step(h, u[:, t], params)
        h = out[:, t]
    return out


def newton_forward(cell, u, params, h0, cfg: NewtonConfig, scan_backend: str):
    """Newton solve of the whole sequence. Returns (h, iterations, residual, converged)."""
    accept = cfg.accept_for(u.dtype)
    h = cell.step(u.new_zeros(state_shape(u, cell.structure)), u, params)  # f(0, u_t) for all t
    if h0 is not None:
        h[:, 0] = cell.step(h0, u[:, 0], params)
    prev_res = math.inf
    res = math.inf
    k = 0
    for k in range(cfg.max_iters + 1):
        h_prev = shift(h, h0, cell.structure)
        r = cell.step(h_prev, u, params).sub_(h)
        res = r.abs().max().item()
        if not math.isfinite(res):
            return h, k, res, False
        if k == cfg.max_iters or (cfg.tol is not None and res <= cfg.tol):
            break
        if k > 0 and res > prev_res and res > accept:  # not shrinking: diverging
            return h, k, res, False
        prev_res = res
        J = cell.jacobian(h_prev, u, params)
        h = h + linear_scan(J, r, None, structure=cell.structure, backend=scan_backend)
    return h, k, res, res <= accept


def solve(cell, u, params, h0, cfg: NewtonConfig, mode: str, stats: NewtonStats | None):
    """Forward solve in a resolved mode ("sequential", "parallel", "triton", "fused")."""
    if mode == "sequential":
        h = sequential_forward(cell, u, params, h0)
        if stats is not None:
            stats.record(0, 0.0, False, mode)
        return h
    if mode == "fused":
        from . import triton_fused

        if type(cell) is GRUCell:
            h, res = triton_fused.fused_gru_forward(u, params[0], h0, num_iters=cfg.max_iters)
        else:
            h, res = triton_fused.fused_lstm_forward(u, params[0], params[1], h0,
                                                     num_iters=cfg.max_iters)
        res = float(res)
        iters, ok = cfg.max_iters, math.isfinite(res) and res <= cfg.accept_for(u.dtype)
    else:
        backend = "triton" if mode == "triton" else ("cpu" if cpu_ext.supports(u) else
                                                     "torch" if u.device.type == "cpu" else "doubling")
        h, iters, res, ok = newton_forward(cell, u, params, h0, cfg, backend)
    if not ok:
        msg = (f"Newton ({mode}) did not converge for cell {cell.name!r}: residual {res:.3g} after "
               f"{iters} iterations (accept_tol {cfg.accept_for(u.dtype):.1g})")
        if cfg.fallback == "raise":
            raise NewtonDivergence(msg)
        _warn_once(msg + "; falling back to sequential application (this warning is shown once; "
                   "the count is in NewtonStats.fallbacks)")
        h = sequential_forward(cell, u, params, h0)
    if stats is not None:
        stats.record(iters, res, not ok, mode)
    return h
