"""``parallel_rnn``: the differentiable entry point (forward solve + adjoint backward).

Forward: one of the modes below solves ``h_t = f(h_{t-1}, u_t)``. Backward (every mode): the
adjoint. Only ``u``, ``h0``, the parameters and the converged ``h`` are saved; with
``g_t = dL/dh_t``,

    lambda_t = g_t + J_{t+1}^T lambda_{t+1}     (one reversed linear scan)

and then ``du_t``, ``d params`` and ``dh0`` are vector-Jacobian products of ``f`` at
``(h_{t-1}, u_t)`` with ``lambda_t``, evaluated for all t at once. No autograd through a time loop
or through Newton iterates.

Modes (what runs for each is decided by :func:`~newtonlm.kernels.scan.choose_path`, one table in
docs/kernels.md):
  "sequential" apply f step by step (compiled C loop for the built-in cells on CPU);
  "parallel"   Newton in PyTorch, linear solves by the compiled CPU scan (CPU) or log-depth
               doubling (GPU);
  "triton"     Newton in PyTorch, linear solves by the Triton scan kernels;
  "fused"      the whole Newton routine and the adjoint in one Triton kernel each (GRU/LSTM only);
               a result the kernel leaves unconverged gets extra Newton iterations with Triton scans;
  "auto"       the fastest measured path for the device (docs/benchmarks.md): CPU -> "sequential"
               (on a few cores a Newton forward does ~4x the work of one pass and loses, for the
               compiled GRU/LSTM loops and for custom cells' PyTorch loops alike); CUDA -> "fused"
               for built-in cells, "triton" otherwise ("parallel" when triton is not installed).
"""

from __future__ import annotations

import torch

from . import cpu_ext
from .cells import BLOCK2, DIAG, Cell, GRUCell
from .checks import check_device, check_floating, check_shape
from .newton import NewtonConfig, NewtonStats, is_builtin, shift, solve, state_shape
from .scan import MODES, choose_path, linear_scan


def resolve_mode(mode: str, cell: Cell, device: torch.device) -> str:
    """The forward solve that ``mode`` means for ``cell`` on ``device`` (see
    :func:`~newtonlm.kernels.scan.choose_path`)."""
    dtype = torch.float32  # the mode does not depend on the dtype
    return choose_path(mode, device, cell.structure, "forward", dtype, is_builtin(cell)).mode


def adjoint_backward(cell, u, params, h0, h, grad_h, scan_backend: str | None, fused: str | None = None):
    """Gradients (du, dh0, dparams) from the converged states ``h`` and ``grad_h = dL/dh``.

    ``fused == "c"`` (the built-in cells on CPU, see ``choose_path``): the compiled kernel does the
    same computation in one fused pass (the carried ``J_{t+1}^T lambda_{t+1}`` is the VJP of step
    t+1 with respect to h_t). Otherwise one reversed ``linear_scan`` on ``scan_backend`` and the
    cell's VJP for all t at once."""
    if fused == "c":
        if type(cell) is GRUCell:
            du, dA, dh0 = cpu_ext.gru_adjoint(u, params[0], h0, h, grad_h)
            return du, dh0, (dA,)
        du, dA, dC, dh0 = cpu_ext.lstm_adjoint(u, params[0], params[1], h0, h, grad_h)
        return du, dh0, (dA, dC)
    h_prev = shift(h, h0, cell.structure)
    J = cell.jacobian(h_prev, u, params)
    # A_t = J_{t+1}^T for t < T-1 and 0 at the end: lambda_t = g_t + A_t lambda_{t+1}
    A = torch.empty_like(J)
    if cell.structure == DIAG:
        A[:, :-1] = J[:, 1:]
    else:
        A[:, :-1] = J[:, 1:].transpose(-3, -2)
    A[:, -1].zero_()
    lam = linear_scan(A, grad_h.contiguous(), None, reverse=True, structure=cell.structure,
                      backend=scan_backend)
    dh_prev, du, dparams = cell.vjp(h_prev, u, params, lam)
    dh0 = None if h0 is None else dh_prev[:, 0]
    return du, dh0, dparams


def mode_adjoint(cell, mode: str, u, params, h0, h, grad_h):
    """(du, dh0, dparams) of a solve in ``mode``: the fused Triton adjoint for mode ``fused``,
    otherwise :func:`adjoint_backward` on the path ``choose_path`` picks (also for one rank's chunk
    of a sequence-parallel solve, entered with its incoming state as ``h0``)."""
    if mode == "fused":
        from . import triton_fused

        if type(cell) is GRUCell:
            du, dA, dh0 = triton_fused.fused_gru_backward(u, params[0], h0, h, grad_h)
            return du, dh0, (dA,)
        du, dA, dC, dh0 = triton_fused.fused_lstm_backward(u, params[0], params[1], h0, h, grad_h)
        return du, dh0, (dA, dC)
    path = choose_path(mode, u.device, cell.structure, "backward", u.dtype, is_builtin(cell))
    return adjoint_backward(cell, u, tuple(params), h0, h, grad_h, path.scan, path.fused)


class _ParallelRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell, cfg, stats, mode, u, h0, *params):
        h = solve(cell, u, params, h0, cfg, mode, stats)
        ctx.cell, ctx.mode, ctx.has_h0 = cell, mode, h0 is not None
        ctx.save_for_backward(u, h0, h, *params)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        u, h0, h, *params = ctx.saved_tensors
        grad_h = grad_h if ctx.mode == "fused" else grad_h.to(u.dtype)
        du, dh0, dparams = mode_adjoint(ctx.cell, ctx.mode, u, tuple(params), h0, h, grad_h)
        dparams = tuple(g.to(p.dtype) for g, p in zip(dparams, params))
        dh0 = dh0 if ctx.has_h0 else None
        return (None, None, None, None, du.to(u.dtype), dh0, *dparams)


def _check_inputs(cell, u, params, h0):
    if not isinstance(cell, Cell):
        raise ValueError(f"cell is {type(cell).__name__}; expected a newtonlm.kernels.Cell")
    if cell.structure not in (DIAG, BLOCK2):
        raise ValueError(f"cell.structure={cell.structure!r}; expected 'diag' or 'block2'")
    K = cell.num_gates
    check_shape("u", u, (None, None, K, None),
                f"[B, T, {K}, N] (B batch, T time, {K} gate rows of cell {cell.name!r})")
    if u.shape[1] == 0:
        raise ValueError(f"u has shape {tuple(u.shape)}; expected at least one time step (T >= 1)")
    check_floating("u", u)
    B, _, _, N = u.shape
    if h0 is not None:
        check_shape("h0", h0, (B, N) if cell.structure == DIAG else (B, 2, N))
        check_device("h0", h0, u.device, "u")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"params[{i}] is {type(p).__name__}; expected a tensor")
        check_device(f"params[{i}]", p, u.device, "u")


def parallel_rnn(cell: Cell, u: torch.Tensor, params: tuple = (), h0: torch.Tensor | None = None, *,
                 mode: str = "auto", newton: NewtonConfig | None = None,
                 stats: NewtonStats | None = None) -> torch.Tensor:
    """Apply ``cell`` over the sequence: ``u [B, T, K, N]`` -> states ``[B, T, N]`` (diagonal cells)
    or ``[B, T, 2, N]`` (2x2-block cells). Differentiable in ``u``, ``h0`` and ``params``.

    The solve runs in fp32 (fp64 stays fp64), also under ``torch.autocast``. Newton telemetry is
    accumulated into ``stats`` when given. Under ``torch.compile`` this call is a graph break.
    """
    _check_inputs(cell, u, tuple(params), h0)
    resolved = resolve_mode(mode, cell, u.device)
    cfg = newton or NewtonConfig()
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        args = [u.to(dtype).contiguous(), None if h0 is None else h0.to(dtype).contiguous(),
                *(p.to(dtype) for p in params)]
        return _ParallelRNN.apply(cell, cfg, stats, resolved, *args)


parallel_rnn = torch.compiler.disable(parallel_rnn)

__all__ = ["parallel_rnn", "adjoint_backward", "mode_adjoint", "resolve_mode", "MODES", "state_shape"]
