"""Newton's method over the whole sequence, sequential application (the exact fallback), and the
solver telemetry.

All T steps of ``h_t = f(h_{t-1}, u_t)`` are one nonlinear system ``F(h) = 0`` with
``F_t(h) = h_t - f(h_{t-1}, u_t)``. Starting from ``h_t = f(0, u_t)`` (and ``h0`` for the first
step), each Newton iteration evaluates ``f`` and ``J_t = df/dh(h_{t-1}, u_t)`` for all t at once and
solves the block-bidiagonal system, a linear recurrence::

    delta_t = J_t delta_{t-1} + r_t,   r_t = f(h_{t-1}, u_t) - h_t,   h <- h + delta

The residual ``max |r|`` is measured before every iteration and after the last (one max-reduction
each; the values are the call's ``history``).

Acceptance (converged to the dtype's precision): ``residual <= 16 * eps(dtype) * max|h|``
(fp32: 1.9e-6 at max|h| = 1; fp64: 3.6e-15). Converged solves measure 1.4-3 eps * max|h|
(docs/kernels.md), so 16 leaves a margin of 5x while rejecting a 3-iteration result with a 1e-4
error. ``NewtonConfig.accept_tol`` replaces the bound; a larger ``tol`` widens it.

Adaptive iterations: after ``max_iters``, a result that is not accepted gets up to
``max_extra_iters`` more iterations as long as the residual is finite and shrinking fast: the
last iteration at least halved it (``res_k <= 0.5 res_{k-1}``; with no previous residual, after
the fused kernel, the first extra iteration is granted). Newton entering
its quadratic regime shrinks it by 3-1000x per iteration (docs/kernels.md), a stalled or
diverging solve does not. The bound is loose on purpose: an extra iteration costs about a quarter
of a Newton forward, a fallback on a GPU 100x. A result still not accepted, non-finite, or whose
residual grew during the first ``max_iters`` iterations is answered by sequential application (a
warning once per process, counted in the stats) or raises :class:`NewtonDivergence` with
``fallback="raise"``: never a silently wrong answer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from . import cpu_ext
from .cells import DIAG, GRUCell, LSTMCell
from .scan import Path, choose_path, linear_scan

FALLBACKS = ("sequential", "raise")
PATHS = ("newton", "sequential", "fallback")
ACCEPT_EPS = 16  # residual <= ACCEPT_EPS * eps(dtype) * max|h| is converged
SHRINK = 0.5  # an extra iteration follows one that divided the residual by >= 1 / SHRINK


@dataclass
class NewtonConfig:
    """Newton settings.

    max_iters: Newton iterations always run (the ParaRNN reference always runs 3).
    max_extra_iters: at most this many more while the result is not accepted but the residual
        shrinks fast (see the module docstring); 0 restores a fixed iteration count.
    tol: stop early once the residual max|f(h_{t-1}, u_t) - h_t| is at or below this (None: never).
    accept_tol: a result whose final residual is above this is rejected (fallback); None: the
        dtype's precision, ``16 * eps(dtype) * max|h|`` (or ``tol`` if that is larger: a result
        meeting the user's tolerance is accepted).
    fallback: "sequential" (recompute step by step, warn once) or "raise".
    """

    max_iters: int = 3
    tol: float | None = None
    accept_tol: float | None = None
    fallback: str = "sequential"
    max_extra_iters: int = 3

    def __post_init__(self):
        for name in ("max_iters", "max_extra_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}={v!r}; expected an integer >= 0")
        for name in ("tol", "accept_tol"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name}={v!r}; expected None or a number >= 0")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback={self.fallback!r}; expected one of {FALLBACKS}")

    def accept_for(self, dtype: torch.dtype, scale: float) -> float:
        """The largest accepted residual for a solve in ``dtype`` whose states have max|h| = scale."""
        if self.accept_tol is not None:
            return self.accept_tol
        bound = ACCEPT_EPS * torch.finfo(dtype).eps * scale
        return max(bound, self.tol) if self.tol is not None else bound


@dataclass
class NewtonResult:
    """One Newton solve. ``history[k]`` is the residual after k iterations (None for iterations run
    inside the fused kernel, which reports only its final iterate)."""

    h: torch.Tensor
    iterations: int
    extra_iterations: int
    residual: float
    history: list
    accept_tol: float
    converged: bool


@dataclass
class NewtonStats:
    """Telemetry of solver calls, accumulated until :meth:`reset`.

    Counts: ``calls`` = ``newton`` (answered by an accepted Newton solve) + ``sequential``
    (answered by sequential application by choice: mode "sequential", or "auto" on CPU) +
    ``fallbacks`` (Newton ran, was rejected, and sequential application answered).
    Last call: ``path`` (one of :data:`PATHS`), ``mode``, and, when Newton ran (also when it was
    rejected), ``iterations``, ``extra_iterations``, ``residual`` and ``history``; when Newton did
    not run they are 0, 0, None and [] (never a residual Newton did not measure).
    Over the calls that ran Newton: ``total_iterations``, ``total_extra_iterations``,
    ``max_residual`` (None before any).
    """

    calls: int = 0
    newton: int = 0
    sequential: int = 0
    fallbacks: int = 0
    path: str | None = None
    mode: str = ""
    iterations: int = 0
    extra_iterations: int = 0
    residual: float | None = None
    max_residual: float | None = None
    total_iterations: int = 0
    total_extra_iterations: int = 0
    history: list = field(default_factory=list, repr=False)

    @property
    def newton_runs(self) -> int:
        """Calls that ran Newton (accepted or not)."""
        return self.newton + self.fallbacks

    @property
    def fallback_rate(self) -> float:
        """Share of the calls that ran Newton whose result was rejected (0.0 when none ran)."""
        return self.fallbacks / self.newton_runs if self.newton_runs else 0.0

    def record_sequential(self, mode: str):
        self.calls += 1
        self.sequential += 1
        self.path, self.mode = "sequential", mode
        self.iterations, self.extra_iterations, self.residual, self.history = 0, 0, None, []

    def record_newton(self, result: NewtonResult, mode: str):
        self.calls += 1
        accepted = result.converged
        self.newton += int(accepted)
        self.fallbacks += int(not accepted)
        self.path, self.mode = ("newton" if accepted else "fallback"), mode
        self.iterations, self.extra_iterations = result.iterations, result.extra_iterations
        self.residual, self.history = result.residual, list(result.history)
        self.total_iterations += result.iterations
        self.total_extra_iterations += result.extra_iterations
        self.max_residual = _max_or_none([self.max_residual, result.residual])

    def reset(self):
        self.__init__()

    def as_dict(self) -> dict:
        runs = self.newton_runs
        return {"calls": self.calls, "newton": self.newton, "sequential": self.sequential,
                "fallbacks": self.fallbacks, "fallback_rate": self.fallback_rate, "path": self.path,
                "iterations": self.iterations, "extra_iterations": self.extra_iterations,
                "mean_iterations": self.total_iterations / runs if runs else None,
                "total_extra_iterations": self.total_extra_iterations, "residual": self.residual,
                "max_residual": self.max_residual, "history": list(self.history)}


def _max_or_none(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return float("nan") if any(math.isnan(v) for v in vals) else max(vals)


def newton_telemetry(stats: list[NewtonStats], prefix: str = "newton/") -> dict:
    """Flat telemetry of several layers' stats (index i = position in ``stats``), for metrics logs.

    Per layer, over the calls since the last reset: ``layer{i}/calls``, ``/newton``, ``/sequential``,
    ``/fallbacks`` (counts of each path), ``/fallback_rate``, ``/path`` (the last call's),
    ``/iterations`` (mean per Newton run), ``/extra_iterations`` (total), ``/residual`` (last Newton
    run's final residual), ``/max_residual``, ``/history`` (the last Newton run's residual after
    each iteration). Over all layers: ``calls``, ``newton``, ``sequential``, ``fallbacks``,
    ``fallback_rate``, ``mean_iterations``, ``extra_iterations``, ``max_residual``.
    Figures of Newton runs are None when no call ran Newton (the sequential path).
    """
    out = {}
    for i, s in enumerate(stats):
        d = s.as_dict()
        key = f"{prefix}layer{i}/"
        for name in ("calls", "newton", "sequential", "fallbacks", "fallback_rate", "path"):
            out[key + name] = d[name]
        out[key + "iterations"] = d["mean_iterations"]
        out[key + "extra_iterations"] = d["total_extra_iterations"]
        ran = s.newton_runs > 0
        out[key + "residual"] = d["residual"] if ran else None
        out[key + "max_residual"] = d["max_residual"] if ran else None
        out[key + "history"] = d["history"] if ran else []
    runs = sum(s.newton_runs for s in stats)
    fallbacks = sum(s.fallbacks for s in stats)
    out[prefix + "calls"] = sum(s.calls for s in stats)
    out[prefix + "newton"] = sum(s.newton for s in stats)
    out[prefix + "sequential"] = sum(s.sequential for s in stats)
    out[prefix + "fallbacks"] = fallbacks
    out[prefix + "fallback_rate"] = fallbacks / runs if runs else 0.0
    out[prefix + "mean_iterations"] = sum(s.total_iterations for s in stats) / runs if runs else None
    out[prefix + "extra_iterations"] = sum(s.total_extra_iterations for s in stats)
    out[prefix + "max_residual"] = _max_or_none([s.max_residual for s in stats])
    return out


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


def is_builtin(cell) -> bool:
    """Exactly the built-in GRU/LSTM cell (subclasses may change the math): the cells with fused
    C and Triton kernels."""
    return type(cell) in (GRUCell, LSTMCell)


def sequential_forward(cell, u, params, h0=None, fused: str | None = None) -> torch.Tensor:
    """Apply the cell step by step (no autograd): the compiled C loop when ``fused == "c"`` (see
    :func:`~newtonlm.kernels.scan.choose_path`), otherwise a preallocated PyTorch loop over
    ``cell.step``."""
    if fused == "c":
        if type(cell) is GRUCell:
            return cpu_ext.gru_sequential(u, params[0], h0)
        return cpu_ext.lstm_sequential(u, params[0], params[1], h0)
    out = u.new_empty(state_shape(u, cell.structure))
    h = out.new_zeros(out[:, 0].shape) if h0 is None else h0
    for t in range(u.shape[1]):
        out[:, t] = cell.step(h, u[:, t], params)
        h = out[:, t]
    return out


def newton_forward(cell, u, params, h0, cfg: NewtonConfig, scan_backend: str, *,
                   start: torch.Tensor | None = None, start_iters: int = 0) -> NewtonResult:
    """Newton solve of the whole sequence ``u [B, T, K, N]`` -> states ``[B, T, N]`` (or
    ``[B, T, 2, N]``), with linear solves by ``linear_scan(backend=scan_backend)``.

    ``start``: an iterate to continue from (e.g. the fused kernel's result after ``start_iters``
    iterations) instead of the initial guess ``f(0, u_t)``."""
    if start is None:
        h = cell.step(u.new_zeros(state_shape(u, cell.structure)), u, params)  # f(0, u_t) for all t
        if h0 is not None:
            h[:, 0] = cell.step(h0, u[:, 0], params)
    else:
        h = start
    history = [None] * start_iters
    k = start_iters

    def done(res, accept, ok):
        return NewtonResult(h, k, max(0, k - cfg.max_iters), res, history, accept, ok)

    while True:
        h_prev = shift(h, h0, cell.structure)
        r = cell.step(h_prev, u, params).sub_(h)
        res = r.abs().max().item()
        history.append(res)
        if not math.isfinite(res):
            return done(res, cfg.accept_for(u.dtype, h.abs().max().item()), False)
        stop_early = cfg.tol is not None and res <= cfg.tol
        prev = history[-2] if len(history) > 1 else None
        if k >= cfg.max_iters or stop_early:
            accept = cfg.accept_for(u.dtype, h.abs().max().item())
            if res <= accept:
                return done(res, accept, True)
            shrinking = prev is None or res <= SHRINK * prev  # no history: the fused kernel's iterate
            if stop_early or k - cfg.max_iters >= cfg.max_extra_iters or not shrinking:
                return done(res, accept, False)
        elif prev is not None and res > prev:  # growing: diverging, unless at the precision floor
            accept = cfg.accept_for(u.dtype, h.abs().max().item())
            if res > accept:
                return done(res, accept, False)
        J = cell.jacobian(h_prev, u, params)
        h = h + linear_scan(J, r, None, structure=cell.structure, backend=scan_backend)
        k += 1


def _fused_forward(cell, u, params, h0, iters):
    from . import triton_fused

    if type(cell) is GRUCell:
        return triton_fused.fused_gru_forward(u, params[0], h0, num_iters=iters)[0]
    return triton_fused.fused_lstm_forward(u, params[0], params[1], h0, num_iters=iters)[0]


def solve(cell, u, params, h0, cfg: NewtonConfig, mode: str, stats: NewtonStats | None):
    """Forward solve in a resolved mode ("sequential", "parallel", "triton", "fused")."""
    path: Path = choose_path(mode, u.device, cell.structure, "forward", u.dtype, is_builtin(cell))
    if path.mode == "sequential":
        h = sequential_forward(cell, u, params, h0, path.fused)
        if stats is not None:
            stats.record_sequential(path.mode)
        return h
    if path.fused == "triton":
        # the kernel runs max_iters iterations; its result is checked here (an independent check of
        # the kernel) and, if not accepted, Newton continues from it with Triton scans
        start = _fused_forward(cell, u, params, h0, cfg.max_iters)
        result = newton_forward(cell, u, params, h0, cfg, path.scan, start=start,
                                start_iters=cfg.max_iters)
    else:
        result = newton_forward(cell, u, params, h0, cfg, path.scan)
    if result.converged or cfg.fallback != "raise":
        if stats is not None:
            stats.record_newton(result, path.mode)
    if result.converged:
        return result.h
    msg = (f"Newton ({path.mode}) did not converge for cell {cell.name!r}: residual "
           f"{result.residual:.3g} after {result.iterations} iterations ({result.extra_iterations} "
           f"beyond max_iters={cfg.max_iters}; accepted: <= {result.accept_tol:.2g}); history "
           f"{['-' if r is None else f'{r:.2g}' for r in result.history]}")
    if cfg.fallback == "raise":
        raise NewtonDivergence(msg)
    _warn_once(msg + "; falling back to sequential application (this warning is shown once; "
               "the count is in NewtonStats.fallbacks)")
    seq = choose_path("sequential", u.device, cell.structure, "forward", u.dtype, is_builtin(cell))
    return sequential_forward(cell, u, params, h0, seq.fused)
