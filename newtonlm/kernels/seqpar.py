"""Sequence parallelism: one ParaRNN solve split over the time axis of K ranks.

Rank k of a ``torch.distributed`` process group holds a contiguous chunk ``[B, L_k, ...]`` of a
``[B, T, ...]`` sequence (:func:`split_lengths`: the first ``T % K`` ranks get one step more).
Every step of the solve is either local to a chunk or a small exchange of per-sequence summaries
(O(N) per sequence, never O(T)):

* Newton iteration: the residual at the chunk's first step needs the previous rank's last state
  (one point-to-point message of ``[B, N]``, ``[B, 2, N]`` for 2x2 blocks); the residual and
  ``max|h|`` are reduced with one all-reduce (MAX), so every rank takes the same decisions
  (iterations, acceptance, fallback). The linear solve ``delta_t = J_t delta_{t-1} + r_t`` is a
  local scan from zero, then an all-gather of each chunk's summary (the product of its Jacobians
  ``P_k`` and its local solution at the end ``e_k``: the affine map ``delta_in -> P_k delta_in +
  e_k``), a sequential composition of the summaries of the ranks before (K is small), and the local
  scan again from the incoming ``delta`` (the fix-up; it runs on the same scan kernel).
* Fallback: a result not accepted is recomputed by sequential application rank after rank (each
  rank waits for its predecessor's final state: K - 1 point-to-point hops), as the single-process
  solver applies the cell sequentially; with ``fallback="raise"`` every rank raises.
* Adjoint: ``lambda_t = g_t + J_{t+1}^T lambda_{t+1}`` backward in time. The quantity crossing a
  boundary is ``mu_k = J_0^T lambda_0`` of chunk k (what chunk k adds to the previous chunk's last
  ``lambda``), affine in the next chunk's: ``mu_k = P_k^T mu_{k+1} + c_k``. After a local reversed
  scan and one all-gather of ``(P_k^T, c_k)``, each rank adds the incoming ``mu`` to its last
  ``g`` and runs the single-process adjoint of its chunk (fused kernels included).

Parameter gradients are each rank's partial sums over its chunk (as for any other layer applied
to a chunk): the caller sums them over the group like data-parallel gradients. ``h0`` (the state
before the whole sequence) is read on rank 0 only; its gradient comes back on rank 0.

The chunk solves run what :func:`~newtonlm.kernels.scan.choose_path` picks for the mode (on GPU
the Triton scans, and the fused adjoint kernels); the fused Newton kernel solves a whole sequence
in one launch and cannot stop for exchanges, so mode "fused" runs its Newton iterations with the
Triton scans. Cross-rank steps are plain torch.distributed calls on small tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import newton as nt
from .cells import DIAG, Cell
from .function import _check_inputs, mode_adjoint, resolve_mode
from .newton import NewtonConfig, NewtonDivergence, NewtonResult, NewtonStats
from .scan import choose_path, linear_scan

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- splitting


def split_lengths(T: int, K: int) -> list[int]:
    """Chunk lengths of a sequence of ``T`` steps over ``K`` ranks: the first ``T % K`` ranks get
    ``T // K + 1`` steps, the others ``T // K``. Raises when ``T < K`` (a rank would get no step)."""
    for name, v in (("T", T), ("K", K)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name}={v!r}; expected a positive integer")
    if T < K:
        raise ValueError(f"a sequence of T={T} steps cannot be split over K={K} ranks; sequence "
                         f"parallelism needs T >= K (at least one step per rank)")
    return [T // K + (1 if k < T % K else 0) for k in range(K)]


def chunk_bounds(T: int, K: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s chunk in a sequence of ``T`` steps over ``K`` ranks."""
    lengths = split_lengths(T, K)
    if not 0 <= rank < K:
        raise ValueError(f"rank={rank!r}; expected 0 <= rank < K={K}")
    start = sum(lengths[:rank])
    return start, start + lengths[rank]


def _group_of(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence parallelism needs an initialized torch.distributed process group "
                         "(torch.distributed.init_process_group); none is initialized")
    return dist.group.WORLD if group is None else group


def split_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's chunk of ``x`` (the whole sequence, the same on every rank) along ``dim``
    (default 1: ``[B, T, ...]``), by :func:`chunk_bounds`. A view, differentiable."""
    group = _group_of(group)
    start, stop = chunk_bounds(x.shape[dim], dist.get_world_size(group), dist.get_rank(group))
    return x.narrow(dim, start, stop - start)


def gather_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's chunk ``x`` (chunks of any lengths, concatenated in
    rank order along ``dim``), on every rank. Not differentiable (for checks and evaluation)."""
    group = _group_of(group)
    K = dist.get_world_size(group)
    x = x.detach().contiguous()
    lengths = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(K)]
    dist.all_gather(lengths, torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device),
                    group=group)
    lengths = [int(n) for n in lengths]
    longest = max(lengths)
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    padded = torch.cat((x, x.new_zeros(pad)), dim=dim)
    parts = [torch.empty_like(padded) for _ in range(K)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths)], dim=dim)


# ----------------------------------------------------------------------------- communication


@dataclass
class CommStats:
    """Counted communication of one rank, by kind, accumulated until :meth:`reset`.

    ``bytes[kind]`` counts the payload this rank receives (a point-to-point message: its size; an
    all-gather or all-reduce over K ranks: (K - 1) x the rank's input, what a direct exchange
    moves); ``calls[kind]`` the number of operations. Kinds: ``"state"`` (the previous rank's last
    state), ``"residual"`` (the all-reduce of the residual and max|h|), ``"summary"`` (chunk
    summaries, forward and adjoint), ``"check"`` (the start-up check of every call), ``"halo"``
    (the convolution's halo and its gradient). ``newton_iterations`` counts the linear solves.
    """

    bytes: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    newton_iterations: int = 0

    def add(self, kind: str, nbytes: int):
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def reset(self):
        self.__init__()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Ring:
    """The ranks of ``group`` in sequence order, with the few exchanges the solve needs."""

    def __init__(self, group, comm: CommStats | None):
        self.group = _group_of(group)
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.comm = comm
        self.first, self.last = self.rank == 0, self.rank == self.size - 1

    def _count(self, kind, nbytes):
        if self.comm is not None:
            self.comm.add(kind, nbytes)

    def shift(self, t: torch.Tensor, kind: str, reverse: bool = False) -> torch.Tensor | None:
        """Send ``t`` to the next rank (the previous with ``reverse``) and return the previous's
        (next's) ``t``; None on the first (last) rank."""
        src, dst = (self.rank + 1, self.rank - 1) if reverse else (self.rank - 1, self.rank + 1)
        t = t.contiguous()
        out, works = None, []
        if 0 <= src < self.size:
            out = torch.empty_like(t)
            works.append(dist.irecv(out, group=self.group, group_src=src))
            self._count(kind, _nbytes(out))
        if 0 <= dst < self.size:
            works.append(dist.isend(t, group=self.group, group_dst=dst))
        for w in works:
            w.wait()
        return out

    def recv_prev(self, like: torch.Tensor, kind: str) -> torch.Tensor:
        out = torch.empty_like(like)
        dist.recv(out, group=self.group, group_src=self.rank - 1)
        self._count(kind, _nbytes(out))
        return out

    def send_next(self, t: torch.Tensor):
        dist.send(t.contiguous(), group=self.group, group_dst=self.rank + 1)

    def all_max(self, values: list[torch.Tensor]) -> list[float]:
        """Global max of scalar tensors; a NaN anywhere gives +inf (never a finite answer)."""
        v = torch.stack([x.detach().double().reshape(()) for x in values])
        v = torch.where(torch.isnan(v), torch.full_like(v, math.inf), v)
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.group)
        self._count("residual", (self.size - 1) * _nbytes(v))
        return v.tolist()

    def all_gather(self, t: torch.Tensor, kind: str) -> list[torch.Tensor]:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        self._count(kind, (self.size - 1) * _nbytes(t))
        return parts

    def check(self, meta: list[int], error: str | None, what: str, device) -> list[list[int]]:
        """Start-up check of a call: gather every rank's ``meta`` and whether its local checks
        failed, so that a bad input raises on every rank (no rank left waiting in a collective).
        ``device``: where the group's tensors live (NCCL needs CUDA tensors)."""
        t = torch.tensor([int(error is not None), *meta], dtype=torch.int64, device=device)
        parts = self.all_gather(t, "check")
        rows = [p.tolist() for p in parts]
        failed = [k for k, row in enumerate(rows) if row[0]]
        if error is not None:
            raise ValueError(f"{what} (rank {self.rank} of {self.size}): {error}")
        if failed:
            raise ValueError(f"{what}: rank(s) {failed} of {self.size} rejected their inputs (their "
                             f"error names the problem); no rank ran the solve")
        return [row[1:] for row in rows]


# ----------------------------------------------------------------------------- chunk summaries


def _apply(M: torch.Tensor, x: torch.Tensor, structure: str) -> torch.Tensor:
    """M x for a diagonal ``M [B, N]`` or a 2x2 block ``M [B, 2, 2, N]`` (x ``[B, 2, N]``)."""
    return M * x if structure == DIAG else (M * x.unsqueeze(-3)).sum(-2)


def _transpose(M: torch.Tensor, structure: str) -> torch.Tensor:
    return M if structure == DIAG else M.transpose(-3, -2)


def chunk_product(J: torch.Tensor, structure: str) -> torch.Tensor:
    """``J_{L-1} ... J_1 J_0`` over the time axis (dim 1) of ``J [B, L, N]`` or ``[B, L, 2, 2, N]``:
    the map from the state entering a chunk to the state leaving it. 2x2 blocks: a pairwise tree,
    O(L) work in O(log L) tensor operations."""
    if structure == DIAG:
        return J.prod(dim=1)
    P = J
    while P.shape[1] > 1:
        tail = P[:, -1:] if P.shape[1] % 2 else None  # the latest step, kept in time order
        even = P[:, :P.shape[1] - (tail is not None)]
        P = torch.einsum("btijn,btjkn->btikn", even[:, 1::2], even[:, 0::2])  # later @ earlier
        if tail is not None:
            P = torch.cat((P, tail), dim=1)
    return P[:, 0]


def _pack(M: torch.Tensor, v: torch.Tensor, structure: str) -> torch.Tensor:
    """One contiguous ``[B, 2, N]`` (diag) or ``[B, 6, N]`` (2x2 blocks) summary message."""
    if structure == DIAG:
        return torch.stack((M, v), dim=1)
    B, N = v.shape[0], v.shape[-1]
    return torch.cat((M.reshape(B, 4, N), v), dim=1)


def _unpack(s: torch.Tensor, structure: str):
    if structure == DIAG:
        return s[:, 0], s[:, 1]
    B, N = s.shape[0], s.shape[-1]
    return s[:, :4].reshape(B, 2, 2, N), s[:, 4:]


def compose_incoming(parts: list, upto: int, structure: str, reverse: bool = False):
    """The state entering chunk ``upto`` from the summaries ``(M_j, v_j)`` of the chunks before it
    (after it with ``reverse``), starting from 0: ``x <- M_j x + v_j`` in sequence order; None when
    there is no chunk before (after) it."""
    order = range(len(parts) - 1, upto, -1) if reverse else range(upto)
    x = None
    for j in order:
        M, v = parts[j]
        x = v if x is None else _apply(M, x, structure) + v
    return x


# ----------------------------------------------------------------------------- forward solves


def _scan_backend(mode: str, device, structure: str, direction: str, dtype) -> str | None:
    """The PyTorch-side scan of ``mode`` (fused -> its Triton scans), as the single-process
    solver picks it; None for a sequential forward."""
    plain_mode = "triton" if mode == "fused" else mode
    return choose_path(plain_mode, device, structure, direction, dtype, False).scan


def _newton_sp(ring: _Ring, cell, u, params, h0, cfg: NewtonConfig, scan: str):
    """Newton over the split sequence; the decisions of ``newton.newton_forward`` on the global
    residual. -> (NewtonResult, the previous rank's last state for the final iterate)."""
    structure = cell.structure
    h = cell.step(u.new_zeros(nt.state_shape(u, structure)), u, params)  # f(0, u_t) for all t
    if ring.first and h0 is not None:
        h[:, 0] = cell.step(h0, u[:, 0], params)
    history, k = [], 0

    def done(res, scale, ok, h_in):
        accept = cfg.accept_for(u.dtype, scale)
        return NewtonResult(h, k, max(0, k - cfg.max_iters), res, history, accept, ok), h_in

    while True:
        h_in = ring.shift(h[:, -1], "state")
        if ring.first:
            h_in = h0
        h_prev = nt.shift(h, h_in, structure)
        r = cell.step(h_prev, u, params).sub_(h)
        res, scale = ring.all_max([r.abs().max(), h.abs().max()])
        history.append(res)
        if not math.isfinite(res):
            return done(res, scale, False, h_in)
        stop_early = cfg.tol is not None and res <= cfg.tol
        prev = history[-2] if len(history) > 1 else None
        if k >= cfg.max_iters or stop_early:
            if res <= cfg.accept_for(u.dtype, scale):
                return done(res, scale, True, h_in)
            shrinking = prev is None or res <= nt.SHRINK * prev
            if stop_early or k - cfg.max_iters >= cfg.max_extra_iters or not shrinking:
                return done(res, scale, False, h_in)
        elif prev is not None and res > prev and res > cfg.accept_for(u.dtype, scale):
            return done(res, scale, False, h_in)  # growing: diverging
        J = cell.jacobian(h_prev, u, params)
        delta = linear_scan(J, r, None, structure=structure, backend=scan)
        summary = _pack(chunk_product(J, structure), delta[:, -1], structure)
        parts = [_unpack(s, structure) for s in ring.all_gather(summary, "summary")]
        if ring.comm is not None:
            ring.comm.newton_iterations += 1
        x = compose_incoming(parts, ring.rank, structure)
        if x is not None:  # the fix-up: the local solve from the incoming delta
            delta = linear_scan(J, r, x, structure=structure, backend=scan)
        h = h + delta
        k += 1


def _sequential_sp(ring: _Ring, cell, u, params, h0, fused):
    """Sequential application rank after rank. -> (states, the state entering this chunk)."""
    shape = nt.state_shape(u, cell.structure)
    like = u.new_empty(shape[:1] + shape[2:])
    h_in = h0 if ring.first else ring.recv_prev(like, "state")
    h = nt.sequential_forward(cell, u, params, h_in, fused)
    if not ring.last:
        ring.send_next(h[:, -1])
    return h, h_in


def _solve_sp(ring, cell, u, params, h0, cfg, mode, stats):
    builtin = nt.is_builtin(cell)
    if mode == "sequential":
        fused = choose_path(mode, u.device, cell.structure, "forward", u.dtype, builtin).fused
        h, h_in = _sequential_sp(ring, cell, u, params, h0, fused)
        if stats is not None:
            stats.record_sequential(mode)
        return h, h_in
    scan = _scan_backend(mode, u.device, cell.structure, "forward", u.dtype)
    result, h_in = _newton_sp(ring, cell, u, params, h0, cfg, scan)
    if result.converged or cfg.fallback != "raise":
        if stats is not None:
            stats.record_newton(result, mode)
    if result.converged:
        return result.h, h_in
    msg = (f"sequence-parallel Newton ({mode}, {ring.size} ranks) did not converge for cell "
           f"{cell.name!r}: residual {result.residual:.3g} over all ranks after {result.iterations} "
           f"iterations (accepted: <= {result.accept_tol:.2g}); history "
           f"{[f'{r:.2g}' for r in result.history]}")
    if cfg.fallback == "raise":
        raise NewtonDivergence(msg)
    nt._warn_once(msg + "; every rank falls back to sequential application, rank after rank (this "
               "warning is shown once; the count is in NewtonStats.fallbacks)")
    seq = choose_path("sequential", u.device, cell.structure, "forward", u.dtype, builtin)
    return _sequential_sp(ring, cell, u, params, h0, seq.fused)


# ----------------------------------------------------------------------------- adjoint


def _local_adjoint(cell, mode, u, params, h_in, h, g):
    """The single-process adjoint of one chunk entered with state ``h_in`` (what
    ``function._ParallelRNN.backward`` runs). -> (du, d h_in, dparams)."""
    return mode_adjoint(cell, mode, u, params, h_in, h, g)


def _adjoint_sp(ring: _Ring, cell, mode, u, params, h_in, h, g):
    structure = cell.structure
    J = cell.jacobian(nt.shift(h, h_in, structure), u, params)
    A = torch.empty_like(J)  # A_t = J_{t+1}^T, 0 at the chunk's end: the local solve from zero
    A[:, :-1] = _transpose(J[:, 1:], structure)
    A[:, -1].zero_()
    scan = _scan_backend(mode, u.device, structure, "backward", u.dtype)
    lam = linear_scan(A, g, None, reverse=True, structure=structure, backend=scan)
    mu = _apply(_transpose(J[:, 0], structure), lam[:, 0], structure)
    summary = _pack(_transpose(chunk_product(J, structure), structure), mu, structure)
    parts = [_unpack(s, structure) for s in ring.all_gather(summary, "summary")]
    incoming = compose_incoming(parts, ring.rank, structure, reverse=True)
    if incoming is not None:
        g = g.clone()
        g[:, -1] += incoming
    return _local_adjoint(cell, mode, u, params, h_in, h, g)


class _SeqParRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell, cfg, stats, mode, ring, u, h0, *params):
        h, h_in = _solve_sp(ring, cell, u, params, h0, cfg, mode, stats)
        ctx.cell, ctx.mode, ctx.ring, ctx.has_h0 = cell, mode, ring, h0 is not None
        ctx.save_for_backward(u, h_in, h, *params)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        u, h_in, h, *params = ctx.saved_tensors
        du, dh_in, dparams = _adjoint_sp(ctx.ring, ctx.cell, ctx.mode, u, tuple(params), h_in, h,
                                         grad_h.to(u.dtype).contiguous())
        dparams = tuple(g.to(p.dtype) for g, p in zip(dparams, params))
        dh0 = dh_in if (ctx.has_h0 and ctx.ring.first) else None
        return (None, None, None, None, None, du.to(u.dtype), dh0, *dparams)


# ----------------------------------------------------------------------------- entry point


def _local_error(cell, u, params, h0) -> str | None:
    try:
        if isinstance(u, torch.Tensor) and u.dim() == 4 and u.shape[1] == 0:
            return None  # an empty chunk: reported with every rank's length below
        _check_inputs(cell, u, tuple(params), h0)
    except ValueError as e:
        return str(e)
    return None


def seqpar_rnn(cell: Cell, u: torch.Tensor, params: tuple = (), h0: torch.Tensor | None = None, *,
               group=None, mode: str = "auto", newton: NewtonConfig | None = None,
               stats: NewtonStats | None = None, comm: CommStats | None = None) -> torch.Tensor:
    """:func:`~newtonlm.kernels.parallel_rnn` over a sequence split across the ranks of ``group``
    (None: the default group): ``u [B, L_k, K, N]`` is this rank's chunk (in rank order along
    time; any lengths >= 1, :func:`split_sequence` gives the standard split) -> this chunk's states
    ``[B, L_k, N]`` (or ``[B, L_k, 2, N]``). Every rank of the group must make the same call.

    ``h0`` is the state before the whole sequence: read on rank 0, ignored elsewhere. Gradients:
    ``u`` of this chunk; ``params``: this chunk's partial sums (sum them over the group); ``h0`` on
    rank 0. Telemetry in ``stats`` is the same on every rank; ``comm`` counts this rank's traffic.
    A bad input on any rank raises a ``ValueError`` on every rank before any work.
    """
    ring = _Ring(group, comm)
    error = _local_error(cell, u, params, h0)
    if error is None and ring.first is False and h0 is not None:
        h0 = None  # the state before the sequence belongs to rank 0
    dtype_code = _DTYPES.index(u.dtype) if error is None and u.dtype in _DTYPES else -1
    meta = [-1] * 4 if error is not None else [u.shape[0], u.shape[1], u.shape[3], dtype_code]
    device = u.device if isinstance(u, torch.Tensor) else torch.device("cpu")
    rows = ring.check(meta, error, "seqpar_rnn", device)
    lengths = [row[1] for row in rows]
    if any(n < 1 for n in lengths):
        raise ValueError(f"seqpar_rnn: chunk lengths {lengths} over {ring.size} ranks; every rank "
                         f"needs at least one step (a sequence of T={sum(lengths)} steps needs "
                         f"T >= {ring.size})")
    for i, name in ((0, "batch size B"), (2, "state size N"), (3, "dtype")):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            shown = [str(_DTYPES[v]) for v in values] if i == 3 else values
            raise ValueError(f"seqpar_rnn: the ranks' chunks differ in {name}: {shown} (rank order); "
                             "every rank needs the same batch, state size and dtype")
    resolved = resolve_mode(mode, cell, u.device)
    cfg = newton or NewtonConfig()
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        args = [u.to(dtype).contiguous(), None if h0 is None else h0.to(dtype).contiguous(),
                *(p.to(dtype) for p in params)]
        return _SeqParRNN.apply(cell, cfg, stats, resolved, ring, *args)


seqpar_rnn = torch.compiler.disable(seqpar_rnn)


# ----------------------------------------------------------------------------- halo exchange


def halo_exchange(x: torch.Tensor, width: int, group=None, comm: CommStats | None = None):
    """The previous rank's last ``width`` steps of ``x [B, L_k, C]`` (zeros on rank 0), the context
    a causal convolution of kernel ``width + 1`` needs before this chunk: ``[B, width, C]``.
    Differentiable: the halo's gradient is sent back and added to the previous rank's ``x``
    gradient. Every rank's chunk needs at least ``width`` steps (checked on every rank)."""
    ring = _Ring(group, comm)
    error = None
    if not isinstance(width, int) or isinstance(width, bool) or width < 0:
        error = f"width={width!r}; expected an integer >= 0"
    elif not isinstance(x, torch.Tensor) or x.dim() != 3:
        error = f"x has shape {tuple(getattr(x, 'shape', ()))}; expected [B, L, C]"
    meta = [-1, -1] if error else [x.shape[1], x.shape[2]]
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    rows = ring.check(meta, error, "halo_exchange", device)
    lengths = [row[0] for row in rows]
    if width == 0:
        return x[:, :0]
    if min(lengths) < width or len({row[1] for row in rows}) > 1:
        raise ValueError(f"halo_exchange: chunk lengths {lengths} over {ring.size} ranks; a causal "
                         f"convolution of kernel {width + 1} needs every chunk to have at least "
                         f"{width} steps and the same channel count (got {[row[1] for row in rows]})")
    return _HaloFn.apply(x, width, ring)


class _HaloFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, width, ring):
        ctx.width, ctx.ring, ctx.shape = width, ring, x.shape
        tail = x[:, x.shape[1] - width:]
        got = ring.shift(tail, "halo")
        return torch.zeros_like(tail) if got is None else got

    @staticmethod
    def backward(ctx, g):
        back = ctx.ring.shift(g, "halo", reverse=True)  # d halo goes back to the previous rank
        gx = g.new_zeros(ctx.shape)
        if back is not None:
            gx[:, ctx.shape[1] - ctx.width:] = back
        return gx, None, None


__all__ = ["CommStats", "chunk_bounds", "chunk_product", "compose_incoming", "gather_sequence",
           "halo_exchange", "seqpar_rnn", "split_lengths", "split_sequence"]
