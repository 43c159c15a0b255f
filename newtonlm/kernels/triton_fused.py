"""Fused Triton kernels for ParaGRU / ParaLSTM: the whole Newton solve in one forward kernel and
the whole adjoint in one backward kernel (the performance path on GPU).

Design (both cells, both directions):

* one program per (batch row ``b``, block of ``BLOCK_N`` channels); channels never interact, so
  programs are independent and the result is deterministic (no atomics);
* a program walks the time axis in chunks of ``CHUNK`` steps and holds a ``[CHUNK, BLOCK_N]``
  tile of the chunk in registers;
* forward: the chunk before is fully converged when a chunk starts, so its final state (carried
  in registers as ``prev``) is the exact initial state of this chunk: the result is exact, not a
  truncation. Initial guess ``h_t = f(0, u_t)`` (row 0 from ``prev``), then ``num_iters`` Newton
  iterations, each ``h_{t-1}`` from the current iterate, ``r = f(h_{t-1}, u) - h``, ``J = df/dh``
  for the whole tile, and the chunk's linear recurrence ``d_t = J_t d_{t-1} + r_t`` (``d`` = 0
  before row 0, whose predecessor is exact) solved by ``tl.associative_scan`` along time
  (diagonal combine for GRU, 2x2-block combine for LSTM). The one-step time shift ``h_{t-1}`` is
  a ``tl.gather`` of the register tile (:func:`_shift_down`): the exchange between threads stays
  inside the program and the compiler inserts its synchronization, so there is no global-memory
  round trip to order by hand (an earlier version stored the iterate and read it back at
  ``t - 1`` between two ``tl.debug_barrier()`` calls, a pattern the interpreter, which runs one
  program at a time with no threads, cannot check). The tile is stored once per chunk, after
  the last iteration; ``max |f(h_{t-1}, u_t) - h_t|`` is reduced per channel into a ``[B, N]``
  buffer and the host takes the max.
* backward: the adjoint ``lam_t = g_t + J_{t+1}^T lam_{t+1}`` runs chunk by chunk in reverse time
  order. The tile is loaded time-reversed by index arithmetic (row ``i`` is time
  ``c0 + CHUNK - 1 - i``), so a forward ``tl.associative_scan`` solves the reverse recurrence.
  ``J_{t+1}`` is evaluated at ``(h_t, u_{t+1})`` read straight from memory (``h`` is an input
  here, written by an earlier kernel, so these reads need no ordering), which handles the
  chunk's last row (it needs the next chunk's first step) exactly; ``J_T`` is 0. ``lam`` at the
  chunk's first time step is carried to the next (earlier) chunk. Then the local VJPs of the
  tile give ``du`` (stored), per-program partial sums of ``dA`` (``dC``) (summed over ``B`` on the
  host) and, at ``t = 0``, ``dh0``.

Launch parameters (``CHUNK``, ``BLOCK_N``, warps; stages stay 1, see ``_GPU_TILES``) are
``triton.autotune`` configurations (:func:`launch_configs`) keyed on ``N`` and on ``T`` and ``B``
rounded up to powers of two (a new length within the bucket reuses the tuned choice);
configurations larger than the problem are clamped to it. Under the Triton interpreter there is
exactly one configuration (:data:`INTERPRETER_CONFIG`: autotuning with several needs a GPU
driver). ``BLOCK_N`` does not change results. ``CHUNK`` does: each chunk runs ``num_iters``
iterations from an exact start, so once Newton has converged the results differ by rounding
only, but a GPU run's bits can depend on the tuned choice; pass ``chunk`` and ``block_n`` to fix
it.

All arithmetic is in fp32 (fp64 when ``u`` is fp64); bf16/fp16 inputs are upcast on load.
``tanh``: libdevice's on a GPU; under the interpreter (no libdevice) an expm1-based formula of
the same accuracy (:func:`_tanh`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .checks import check_device, check_shape

__all__ = ["INTERPRETER_CONFIG", "fused_gru_backward", "fused_gru_forward", "fused_lstm_backward",
           "fused_lstm_forward", "launch_configs"]

# Decided once, like Triton itself decides at import whether kernels are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LIBDEVICE: tl.constexpr = tl.constexpr(not INTERPRET)

# ----------------------------------------------------------------------------- launch configs
# The interpreter's associative_scan runs the combine once per tile element in Python and every
# program costs a fixed overhead, so its one configuration is a small tile, 16 steps x 32
# channels (one program per row for up to 32 channels; measured ~10% faster than 16 x 16 on
# the tests' 20 channels).
INTERPRETER_CONFIG = triton.Config({"CHUNK": 16, "BLOCK_N": 32}, num_warps=1, num_stages=1)
# GPU candidates (CHUNK, BLOCK_N, num_warps): 16 fp32 elements of each tile per thread, from few
# wide programs to many narrow ones. ptxas (Triton 3.7, sm_90a, fp32) puts every one of them at
# the 255-register cap with little or no spilling (at most 0.7 kB, LSTM forward); 32 elements per
# thread (the former fixed 64 x 64 tile with 4 warps) spilled 0.9-3.6 kB, so it is not offered.
# num_stages stays 1: Triton 3.7 compiles these kernels (no tl.dot) to identical PTX for 1 to 4
# stages, so more stages would only repeat compilations and benchmarks.
_GPU_TILES = ((16, 32, 1), (16, 64, 2), (32, 32, 2), (32, 64, 4), (64, 32, 4), (64, 64, 8))
_MIN_TILE = 16  # the GPU compiler's smallest tile dimension for these layouts
# An explicit ``chunk`` or ``block_n`` alone takes this for the other one.
_OVERRIDE_DEFAULT = 64


def launch_configs(interpret: bool = INTERPRET) -> list:
    """The autotuning candidates of the four kernels: ``[INTERPRETER_CONFIG]`` under the
    interpreter, else ``triton.Config({"CHUNK", "BLOCK_N"}, num_warps, num_stages=1)`` per GPU
    tile."""
    if interpret:
        return [INTERPRETER_CONFIG]
    return [triton.Config({"CHUNK": c, "BLOCK_N": bn}, num_warps=w, num_stages=1)
            for c, bn, w in _GPU_TILES]


def _fit(size: int, tile: int) -> int:
    """A power-of-two tile no larger than the problem needs (never below _MIN_TILE)."""
    return min(tile, max(_MIN_TILE, triton.next_power_of_2(size)))


def _warps(chunk: int, block_n: int) -> int:
    """Warps for 16 elements of a [chunk, block_n] tile per thread (1 to 8)."""
    return max(1, min(8, chunk * block_n // (16 * 32)))


def _fit_configs(configs, named_args, **kwargs):
    """Autotune pruning: clamp each candidate's tile to the problem (T, N), with no more warps
    than 16 elements per thread allow, and drop duplicates."""
    T, N = named_args["T"], named_args["N"]
    out = {}
    for cfg in configs:
        chunk, block_n = _fit(T, cfg.kwargs["CHUNK"]), _fit(N, cfg.kwargs["BLOCK_N"])
        fitted = triton.Config({"CHUNK": chunk, "BLOCK_N": block_n},
                               num_warps=min(cfg.num_warps, _warps(chunk, block_n)),
                               num_stages=cfg.num_stages)
        out.setdefault(str(fitted), fitted)
    return list(out.values())


# Tuned per (N, T bucket, B bucket): T_BUCKET and B_BUCKET are kernel arguments used only as the
# key (the autotuner adds the tensors' dtypes to it).
_autotune = triton.autotune(configs=launch_configs(), key=["N", "T_BUCKET", "B_BUCKET"],
                            prune_configs_by={"early_config_prune": _fit_configs})


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def _sigmoid(x):
    """exp only of -|x| <= 0: never overflows (1 / (1 + exp(-x)) relied on exp(-x) = inf giving
    1 / inf = 0, and numpy warned of the overflow under the interpreter); the tail x < 0 keeps
    its relative accuracy as e / (1 + e)."""
    e = tl.exp(-tl.abs(x))
    s = 1.0 / (1.0 + e)
    return tl.where(x >= 0, s, e * s)


@triton.jit
def _tanh(x):
    """tanh with a few ulp of relative error everywhere, also near 0 (where the former
    ``2 sigmoid(2x) - 1`` returned 0 in fp32 for |x| < 3e-8 and lost ~log10(1/|x|) digits)."""
    if _LIBDEVICE:
        return libdevice.tanh(x)
    else:
        # |tanh x| = -m / (2 + m) with m = expm1(-2|x|); expm1 by Kahan's trick (the rounding
        # error of e = exp(y) cancels between e - 1 and log(e)): within 3 ulp in fp32 and fp64.
        y = -2.0 * tl.abs(x)
        e = tl.exp(y)
        em1 = e - 1.0
        exact = (e == 1.0) | (em1 == -1.0)  # expm1(y) = y, or -1, to working precision
        m = tl.where(exact, tl.where(e == 1.0, y, -1.0), em1 * y / tl.log(tl.where(exact, 0.5, e)))
        t = -m / (2.0 + m)
        return tl.where(x < 0, -t, t)


@triton.jit
def _combine_diag(a1, b1, a2, b2):
    # compose x -> a1 x + b1 (earlier) with x -> a2 x + b2 (later)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _combine_block2(p11, p12, p21, p22, p1, p2, q11, q12, q21, q22, q1, q2):
    # compose x -> P x + p (earlier) with x -> Q x + q (later): (Q P, Q p + q)
    return (q11 * p11 + q12 * p21, q11 * p12 + q12 * p22,
            q21 * p11 + q22 * p21, q21 * p12 + q22 * p22,
            q11 * p1 + q12 * p2 + q1, q21 * p1 + q22 * p2 + q2)


@triton.jit
def _channels(BLOCK_N: tl.constexpr, N):
    """This program's batch row b (int64), channels n [BLOCK_N] and their mask (n < N)."""
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.program_id(0).to(tl.int64), n, n < N


@triton.jit
def _row(ptr, n, nmask, DT: tl.constexpr):
    """One per-channel row ``ptr[n]`` as a [1, BLOCK_N] tile in DT (masked channels 0)."""
    return tl.load(ptr + n, mask=nmask, other=0.0).to(DT)[None, :]


@triton.jit
def _state_row(ptr, n, nmask, HAS: tl.constexpr, DT: tl.constexpr, BLOCK_N: tl.constexpr):
    """An initial-state row (``ptr`` at the program's batch row), or zeros when there is none."""
    if HAS:
        return _row(ptr, n, nmask, DT)
    else:
        return tl.zeros([1, BLOCK_N], dtype=DT)


@triton.jit
def _gru_params(a_ptr, n, nmask, N, DT: tl.constexpr):
    """A [3, N] rows (z, r, h) as [1, BLOCK_N] tiles."""
    return _row(a_ptr, n, nmask, DT), _row(a_ptr + N, n, nmask, DT), _row(a_ptr + 2 * N, n, nmask, DT)


@triton.jit
def _lstm_params(a_ptr, c_ptr, n, nmask, N, DT: tl.constexpr):
    """A [3, N] rows (f, o, c) and the peepholes C [2, N] rows (f, o) as [1, BLOCK_N] tiles."""
    af, ao, ac = _gru_params(a_ptr, n, nmask, N, DT)
    return af, ao, ac, _row(c_ptr, n, nmask, DT), _row(c_ptr + N, n, nmask, DT)


@triton.jit
def _drive(u_ptr, u_off, mask, N, DT: tl.constexpr):
    """The three gate rows of u [B, T, 3, N] at ``u_off`` (the offsets of row 0), as tiles."""
    return (tl.load(u_ptr + u_off, mask=mask, other=0.0).to(DT),
            tl.load(u_ptr + u_off + N, mask=mask, other=0.0).to(DT),
            tl.load(u_ptr + u_off + 2 * N, mask=mask, other=0.0).to(DT))


@triton.jit
def _shift_down(x, first, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row i of the result is row i - 1 of the [CHUNK, BLOCK_N] tile ``x``; row 0 is ``first``
    ([1, BLOCK_N]): the states h_{t-1} of the tile's rows. A gather within the program's
    registers (through shared memory or warp shuffles, synchronized by the compiler)."""
    rows = tl.arange(0, CHUNK)[:, None]
    src = tl.maximum(rows - 1, 0) + tl.zeros([CHUNK, BLOCK_N], dtype=tl.int32)
    return tl.where(rows == 0, first, tl.gather(x, src, 0))


@triton.jit
def _last_row(x, CHUNK: tl.constexpr):
    """Row CHUNK - 1 of the tile ``x`` as [1, BLOCK_N] (a select and a sum: exact)."""
    rows = tl.arange(0, CHUNK)[:, None]
    return tl.sum(tl.where(rows == CHUNK - 1, x, 0.0), axis=0)[None, :]


@triton.jit
def _gru_gates(h, uz, ur, uh, az, ar, ah):
    z = _sigmoid(uz + az * h)
    r = _sigmoid(ur + ar * h)
    c = _tanh(uh + ah * (h * r))
    return z, r, c


@triton.jit
def _gru_step_jac(h, uz, ur, uh, az, ar, ah):
    """GRU step and its diagonal Jacobian d h' / d h (formulas of ``GRUCell``)."""
    z, r, c = _gru_gates(h, uz, ur, uh, az, ar, ah)
    out = h + z * (c - h)
    jac = (1.0 - z) + (c - h) * z * (1.0 - z) * az + z * (1.0 - c * c) * ah * (r + h * r * (1.0 - r) * ar)
    return out, jac


@triton.jit
def _lstm_fwd(cp, hp, uf, uo, uc, af, ao, ac, cf, co):
    f = _sigmoid(uf + af * hp + cf * cp)
    ct = _tanh(uc + ac * hp)
    c = ct + f * (cp - ct)
    o = _sigmoid(uo + ao * hp + co * c)
    tc = _tanh(c)
    return f, ct, c, o, tc


@triton.jit
def _lstm_step_jac(cp, hp, uf, uo, uc, af, ao, ac, cf, co):
    """LSTM step (c, h) and its 2x2 Jacobian j_ij = d out_i / d s_j, s = (c, h) (``LSTMCell``)."""
    f, ct, c, o, tc = _lstm_fwd(cp, hp, uf, uo, uc, af, ao, ac, cf, co)
    dfp = (cp - ct) * f * (1.0 - f)
    j00 = f + dfp * cf
    j01 = dfp * af + (1.0 - f) * (1.0 - ct * ct) * ac
    do = o * (1.0 - o)
    k = do * co * tc + o * (1.0 - tc * tc)
    j10 = k * j00
    j11 = do * ao * tc + k * j01
    return c, o * tc, j00, j01, j10, j11


# ----------------------------------------------------------------------------- GRU kernels
@_autotune
@triton.jit
def _gru_fwd_kernel(u_ptr, a_ptr, h0_ptr, h_ptr, res_ptr, T, N, num_iters, T_BUCKET, B_BUCKET,
                    HAS_H0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    DT = h_ptr.dtype.element_ty
    b, n, nmask = _channels(BLOCK_N, N)
    rows = tl.arange(0, CHUNK)[:, None]
    az, ar, ah = _gru_params(a_ptr, n, nmask, N, DT)
    prev = _state_row(h0_ptr + b * N, n, nmask, HAS_H0, DT, BLOCK_N)  # exact state before the chunk
    res = tl.zeros([BLOCK_N], dtype=DT)
    for k in range(tl.cdiv(T, CHUNK)):
        t = (k * CHUNK + rows).to(tl.int64)
        mask = (t < T) & nmask[None, :]
        uz, ur, uh = _drive(u_ptr, ((b * T + t) * 3) * N + n[None, :], mask, N, DT)
        h, _ = _gru_step_jac(tl.where(rows == 0, prev, 0.0), uz, ur, uh, az, ar, ah)  # f(0, u)
        for _ in range(num_iters):
            fh, jac = _gru_step_jac(_shift_down(h, prev, CHUNK, BLOCK_N), uz, ur, uh, az, ar, ah)
            jac = tl.where(rows == 0, 0.0, jac)  # the state before row 0 is exact
            _, delta = tl.associative_scan((jac, fh - h), 0, _combine_diag)
            h = h + delta
        fh, _ = _gru_step_jac(_shift_down(h, prev, CHUNK, BLOCK_N), uz, ur, uh, az, ar, ah)
        res = tl.maximum(res, tl.max(tl.where(mask, tl.abs(fh - h), 0.0), axis=0))
        tl.store(h_ptr + (b * T + t) * N + n[None, :], h, mask=mask)
        prev = _last_row(h, CHUNK)
    tl.store(res_ptr + b * N + n, res, mask=nmask)


@_autotune
@triton.jit
def _gru_bwd_kernel(u_ptr, a_ptr, h0_ptr, h_ptr, g_ptr, du_ptr, da_ptr, dh0_ptr, T, N, T_BUCKET,
                    B_BUCKET, HAS_H0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    DT = da_ptr.dtype.element_ty
    b, n, nmask = _channels(BLOCK_N, N)
    rows = tl.arange(0, CHUNK)[:, None]
    az, ar, ah = _gru_params(a_ptr, n, nmask, N, DT)
    h0 = _state_row(h0_ptr + b * N, n, nmask, HAS_H0, DT, BLOCK_N)
    carry = tl.zeros([BLOCK_N], dtype=DT)  # lam at the first step of the chunk processed last
    dh0 = tl.zeros([BLOCK_N], dtype=DT)
    sz = tl.zeros([BLOCK_N], dtype=DT)
    sr = tl.zeros([BLOCK_N], dtype=DT)
    sh = tl.zeros([BLOCK_N], dtype=DT)
    num_chunks = tl.cdiv(T, CHUNK)
    for kk in range(num_chunks):
        c0 = (num_chunks - 1 - kk) * CHUNK
        t = (c0 + CHUNK - 1 - rows).to(tl.int64)  # time-reversed tile
        mask = (t < T) & nmask[None, :]
        nxt = mask & (t + 1 < T)
        h_off = (b * T + t) * N + n[None, :]
        u_off = ((b * T + t) * 3) * N + n[None, :]
        g = tl.load(g_ptr + h_off, mask=mask, other=0.0).to(DT)
        # J_{t+1} at (h_t, u_{t+1}); 0 past the end of the sequence
        h_t = tl.load(h_ptr + h_off, mask=mask, other=0.0).to(DT)
        nz, nr, nh = _drive(u_ptr, u_off + 3 * N, nxt, N, DT)
        _, jn = _gru_step_jac(h_t, nz, nr, nh, az, ar, ah)
        jn = tl.where(nxt, jn, 0.0)
        g = tl.where(rows == 0, g + jn * carry[None, :], g)
        _, lam = tl.associative_scan((jn, g), 0, _combine_diag)
        carry = tl.sum(tl.where(rows == CHUNK - 1, lam, 0.0), axis=0)
        # local VJP at (h_{t-1}, u_t) with cotangent lam_t
        hp = tl.load(h_ptr + h_off - N, mask=mask & (t >= 1), other=0.0).to(DT)
        hp = tl.where(t == 0, h0, hp)
        uz, ur, uh = _drive(u_ptr, u_off, mask, N, DT)
        z, r, c = _gru_gates(hp, uz, ur, uh, az, ar, ah)
        g_pz = lam * (c - hp) * z * (1.0 - z)
        g_pc = lam * z * (1.0 - c * c)
        g_pr = g_pc * ah * hp * r * (1.0 - r)
        tl.store(du_ptr + u_off, g_pz, mask=mask)
        tl.store(du_ptr + u_off + N, g_pr, mask=mask)
        tl.store(du_ptr + u_off + 2 * N, g_pc, mask=mask)
        sz += tl.sum(tl.where(mask, g_pz * hp, 0.0), axis=0)
        sr += tl.sum(tl.where(mask, g_pr * hp, 0.0), axis=0)
        sh += tl.sum(tl.where(mask, g_pc * hp * r, 0.0), axis=0)
        if HAS_H0:
            dh = lam * (1.0 - z) + g_pz * az + g_pr * ar + g_pc * ah * r
            dh0 += tl.sum(tl.where((t == 0) & mask, dh, 0.0), axis=0)
    da_off = b * 3 * N + n
    tl.store(da_ptr + da_off, sz, mask=nmask)
    tl.store(da_ptr + da_off + N, sr, mask=nmask)
    tl.store(da_ptr + da_off + 2 * N, sh, mask=nmask)
    if HAS_H0:
        tl.store(dh0_ptr + b * N + n, dh0, mask=nmask)


# ----------------------------------------------------------------------------- LSTM kernels
@_autotune
@triton.jit
def _lstm_fwd_kernel(u_ptr, a_ptr, cpar_ptr, s0_ptr, s_ptr, res_ptr, T, N, num_iters, T_BUCKET,
                     B_BUCKET, HAS_S0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    DT = s_ptr.dtype.element_ty
    b, n, nmask = _channels(BLOCK_N, N)
    rows = tl.arange(0, CHUNK)[:, None]
    af, ao, ac, cf, co = _lstm_params(a_ptr, cpar_ptr, n, nmask, N, DT)
    prev_c = _state_row(s0_ptr + b * 2 * N, n, nmask, HAS_S0, DT, BLOCK_N)
    prev_h = _state_row(s0_ptr + b * 2 * N + N, n, nmask, HAS_S0, DT, BLOCK_N)
    res = tl.zeros([BLOCK_N], dtype=DT)
    for k in range(tl.cdiv(T, CHUNK)):
        t = (k * CHUNK + rows).to(tl.int64)
        mask = (t < T) & nmask[None, :]
        uf, uo, uc = _drive(u_ptr, ((b * T + t) * 3) * N + n[None, :], mask, N, DT)
        c, h, _, _, _, _ = _lstm_step_jac(tl.where(rows == 0, prev_c, 0.0),
                                          tl.where(rows == 0, prev_h, 0.0),
                                          uf, uo, uc, af, ao, ac, cf, co)
        for _ in range(num_iters):
            fc, fh, j00, j01, j10, j11 = _lstm_step_jac(
                _shift_down(c, prev_c, CHUNK, BLOCK_N), _shift_down(h, prev_h, CHUNK, BLOCK_N),
                uf, uo, uc, af, ao, ac, cf, co)
            first = rows == 0  # the state before row 0 is exact
            j00 = tl.where(first, 0.0, j00)
            j01 = tl.where(first, 0.0, j01)
            j10 = tl.where(first, 0.0, j10)
            j11 = tl.where(first, 0.0, j11)
            _, _, _, _, dc, dh = tl.associative_scan((j00, j01, j10, j11, fc - c, fh - h), 0,
                                                     _combine_block2)
            c = c + dc
            h = h + dh
        fc, fh, _, _, _, _ = _lstm_step_jac(
            _shift_down(c, prev_c, CHUNK, BLOCK_N), _shift_down(h, prev_h, CHUNK, BLOCK_N),
            uf, uo, uc, af, ao, ac, cf, co)
        err = tl.maximum(tl.abs(fc - c), tl.abs(fh - h))
        res = tl.maximum(res, tl.max(tl.where(mask, err, 0.0), axis=0))
        s_off = ((b * T + t) * 2) * N + n[None, :]  # c at s_off, h at s_off + N
        tl.store(s_ptr + s_off, c, mask=mask)
        tl.store(s_ptr + s_off + N, h, mask=mask)
        prev_c = _last_row(c, CHUNK)
        prev_h = _last_row(h, CHUNK)
    tl.store(res_ptr + b * N + n, res, mask=nmask)


@_autotune
@triton.jit
def _lstm_bwd_kernel(u_ptr, a_ptr, cpar_ptr, s0_ptr, s_ptr, g_ptr, du_ptr, da_ptr, dc_ptr,
                     ds0_ptr, T, N, T_BUCKET, B_BUCKET,
                     HAS_S0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    DT = da_ptr.dtype.element_ty
    b, n, nmask = _channels(BLOCK_N, N)
    rows = tl.arange(0, CHUNK)[:, None]
    af, ao, ac, cf, co = _lstm_params(a_ptr, cpar_ptr, n, nmask, N, DT)
    c0v = _state_row(s0_ptr + b * 2 * N, n, nmask, HAS_S0, DT, BLOCK_N)
    h0v = _state_row(s0_ptr + b * 2 * N + N, n, nmask, HAS_S0, DT, BLOCK_N)
    carry_c = tl.zeros([BLOCK_N], dtype=DT)
    carry_h = tl.zeros([BLOCK_N], dtype=DT)
    ds0_c = tl.zeros([BLOCK_N], dtype=DT)
    ds0_h = tl.zeros([BLOCK_N], dtype=DT)
    s_af = tl.zeros([BLOCK_N], dtype=DT)
    s_ao = tl.zeros([BLOCK_N], dtype=DT)
    s_ac = tl.zeros([BLOCK_N], dtype=DT)
    s_cf = tl.zeros([BLOCK_N], dtype=DT)
    s_co = tl.zeros([BLOCK_N], dtype=DT)
    num_chunks = tl.cdiv(T, CHUNK)
    for kk in range(num_chunks):
        c0 = (num_chunks - 1 - kk) * CHUNK
        t = (c0 + CHUNK - 1 - rows).to(tl.int64)  # time-reversed tile
        mask = (t < T) & nmask[None, :]
        nxt = mask & (t + 1 < T)
        s_off = ((b * T + t) * 2) * N + n[None, :]
        u_off = ((b * T + t) * 3) * N + n[None, :]
        gc = tl.load(g_ptr + s_off, mask=mask, other=0.0).to(DT)
        gh = tl.load(g_ptr + s_off + N, mask=mask, other=0.0).to(DT)
        # J_{t+1} at (s_t, u_{t+1}); 0 past the end of the sequence
        nf, no, nc = _drive(u_ptr, u_off + 3 * N, nxt, N, DT)
        _, _, j00, j01, j10, j11 = _lstm_step_jac(
            tl.load(s_ptr + s_off, mask=mask, other=0.0).to(DT),
            tl.load(s_ptr + s_off + N, mask=mask, other=0.0).to(DT),
            nf, no, nc, af, ao, ac, cf, co)
        j00 = tl.where(nxt, j00, 0.0)
        j01 = tl.where(nxt, j01, 0.0)
        j10 = tl.where(nxt, j10, 0.0)
        j11 = tl.where(nxt, j11, 0.0)
        first_row = rows == 0
        # lam_t = g_t + J_{t+1}^T lam_{t+1}; the transposed matrix is (j00, j10; j01, j11)
        gc = tl.where(first_row, gc + j00 * carry_c[None, :] + j10 * carry_h[None, :], gc)
        gh = tl.where(first_row, gh + j01 * carry_c[None, :] + j11 * carry_h[None, :], gh)
        _, _, _, _, lc, lh = tl.associative_scan((j00, j10, j01, j11, gc, gh), 0, _combine_block2)
        last_row = rows == CHUNK - 1
        carry_c = tl.sum(tl.where(last_row, lc, 0.0), axis=0)
        carry_h = tl.sum(tl.where(last_row, lh, 0.0), axis=0)
        # local VJP at (s_{t-1}, u_t) with cotangent lam_t
        pm = mask & (t >= 1)
        cp = tl.where(t == 0, c0v, tl.load(s_ptr + s_off - 2 * N, mask=pm, other=0.0).to(DT))
        hp = tl.where(t == 0, h0v, tl.load(s_ptr + s_off - N, mask=pm, other=0.0).to(DT))
        uf, uo, uc = _drive(u_ptr, u_off, mask, N, DT)
        f, ct, c, o, tc = _lstm_fwd(cp, hp, uf, uo, uc, af, ao, ac, cf, co)
        g_po = lh * tc * o * (1.0 - o)
        g_c = lc + lh * o * (1.0 - tc * tc) + g_po * co
        g_pf = g_c * (cp - ct) * f * (1.0 - f)
        g_pc = g_c * (1.0 - f) * (1.0 - ct * ct)
        tl.store(du_ptr + u_off, g_pf, mask=mask)
        tl.store(du_ptr + u_off + N, g_po, mask=mask)
        tl.store(du_ptr + u_off + 2 * N, g_pc, mask=mask)
        s_af += tl.sum(tl.where(mask, g_pf * hp, 0.0), axis=0)
        s_ao += tl.sum(tl.where(mask, g_po * hp, 0.0), axis=0)
        s_ac += tl.sum(tl.where(mask, g_pc * hp, 0.0), axis=0)
        s_cf += tl.sum(tl.where(mask, g_pf * cp, 0.0), axis=0)
        s_co += tl.sum(tl.where(mask, g_po * c, 0.0), axis=0)
        if HAS_S0:
            at0 = (t == 0) & mask
            ds0_c += tl.sum(tl.where(at0, g_c * f + g_pf * cf, 0.0), axis=0)
            ds0_h += tl.sum(tl.where(at0, g_pf * af + g_po * ao + g_pc * ac, 0.0), axis=0)
    da_off = b * 3 * N + n
    tl.store(da_ptr + da_off, s_af, mask=nmask)
    tl.store(da_ptr + da_off + N, s_ao, mask=nmask)
    tl.store(da_ptr + da_off + 2 * N, s_ac, mask=nmask)
    dc_off = b * 2 * N + n
    tl.store(dc_ptr + dc_off, s_cf, mask=nmask)
    tl.store(dc_ptr + dc_off + N, s_co, mask=nmask)
    if HAS_S0:
        tl.store(ds0_ptr + b * 2 * N + n, ds0_c, mask=nmask)
        tl.store(ds0_ptr + b * 2 * N + N + n, ds0_h, mask=nmask)


# ----------------------------------------------------------------------------- host side
def _check(name: str, x, shape) -> None:
    check_shape(name, x, tuple(shape))


def _setup(u, chunk, block_n):
    """Validate ``u``, the device and the optional tile override; return (B, T, N, compute dtype,
    tile) with tile None (autotuned) or (CHUNK, BLOCK_N)."""
    check_shape("u", u, (None, None, 3, None), "[B, T, 3, N]")
    B, T, _, N = u.shape
    if T < 1 or B < 1 or N < 1:
        raise ValueError(f"u has shape {tuple(u.shape)}; expected [B, T, 3, N] with B, T, N >= 1")
    if not u.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("fused Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                         f"before import to run on CPU); got u on {u.device}")
    dt = torch.float64 if u.dtype == torch.float64 else torch.float32
    if chunk is None and block_n is None:
        return B, T, N, dt, None
    chunk = _OVERRIDE_DEFAULT if chunk is None else int(chunk)
    block_n = _OVERRIDE_DEFAULT if block_n is None else int(block_n)
    for name, v in (("chunk", chunk), ("block_n", block_n)):
        if v < 2 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 2, got {v}")
    return B, T, N, dt, (_fit(T, chunk), _fit(N, block_n))


def _prep(ref, **tensors):
    """The named tensors (None stays None), checked to be on ``ref``'s (u's) device, made
    contiguous."""
    for name, t in tensors.items():
        if t is not None:
            check_device(name, t, ref.device, "u")
    return (t if t is None else t.contiguous() for t in tensors.values())


def _launch(kernel, tile, B, T, N, *args, **consts):
    """Run ``kernel(*args, T_BUCKET, B_BUCKET, **consts)`` over (B, channel blocks): autotuned,
    or with the explicit ``tile`` = (CHUNK, BLOCK_N) through the undecorated kernel."""
    keys = (triton.next_power_of_2(T), triton.next_power_of_2(B))
    if tile is None:
        kernel[lambda meta: (B, triton.cdiv(N, meta["BLOCK_N"]))](*args, *keys, **consts)
    else:
        chunk, block_n = tile
        kernel.fn[(B, triton.cdiv(N, block_n))](*args, *keys, CHUNK=chunk, BLOCK_N=block_n,
                                                 num_warps=_warps(chunk, block_n), **consts)


def fused_gru_forward(u, A, h0=None, num_iters: int = 3, *, chunk: int | None = None,
                      block_n: int | None = None):
    """Newton solve of ParaGRU over the whole sequence in one kernel.

    u [B, T, 3, N] (rows z, r, h), A [3, N], h0 [B, N] or None (zeros).
    Returns (h [B, T, N], residual): h in fp32 (fp64 for fp64 ``u``); residual is a 0-dim tensor,
    ``max |f(h_{t-1}, u_t) - h_t|`` over everything after the last iteration.
    ``chunk`` (time steps per tile) and ``block_n`` (channels per program), powers of two,
    replace the autotuned launch configuration (tests, reproducibility).
    """
    B, T, N, dt, tile = _setup(u, chunk, block_n)
    _check("A", A, (3, N))
    if h0 is not None:
        _check("h0", h0, (B, N))
    u, A, h0 = _prep(u, u=u, A=A, h0=h0)
    h = torch.empty(B, T, N, device=u.device, dtype=dt)
    res = torch.empty(B, N, device=u.device, dtype=dt)
    _launch(_gru_fwd_kernel, tile, B, T, N, u, A, h0 if h0 is not None else h, h, res, T, N,
            int(num_iters), HAS_H0=h0 is not None)
    return h, res.max()


def fused_gru_backward(u, A, h0, h, grad_h, *, chunk: int | None = None,
                       block_n: int | None = None):
    """Adjoint backward of ParaGRU at the solution ``h`` [B, T, N] with output cotangent
    ``grad_h`` [B, T, N]. Returns (du [B, T, 3, N] in u's dtype, dA [3, N] in A's dtype,
    dh0 [B, N] or None when ``h0`` is None)."""
    B, T, N, dt, tile = _setup(u, chunk, block_n)
    _check("A", A, (3, N))
    if h0 is not None:
        _check("h0", h0, (B, N))
    _check("h", h, (B, T, N))
    _check("grad_h", grad_h, (B, T, N))
    u, A, h0, h, grad_h = _prep(u, u=u, A=A, h0=h0, h=h, grad_h=grad_h)
    du = torch.empty_like(u)
    dA = torch.empty(B, 3, N, device=u.device, dtype=dt)
    dh0 = torch.empty(B, N, device=u.device, dtype=dt) if h0 is not None else None
    _launch(_gru_bwd_kernel, tile, B, T, N, u, A, h0 if h0 is not None else h, h, grad_h, du, dA,
            dh0 if dh0 is not None else dA, T, N, HAS_H0=h0 is not None)
    dh0 = dh0.to(h0.dtype) if dh0 is not None else None
    return du, dA.sum(0).to(A.dtype), dh0


def fused_lstm_forward(u, A, C, s0=None, num_iters: int = 3, *, chunk: int | None = None,
                       block_n: int | None = None):
    """Newton solve of ParaLSTM (CIFG with peepholes, state (c, h)) in one kernel.

    u [B, T, 3, N] rows (f, o, c); A [3, N] rows (f, o, c); C [2, N] peepholes (f, o);
    s0 [B, 2, N] or None (zeros). Returns (s [B, T, 2, N] with rows (c, h), residual as for GRU).
    """
    B, T, N, dt, tile = _setup(u, chunk, block_n)
    _check("A", A, (3, N))
    _check("C", C, (2, N))
    if s0 is not None:
        _check("s0", s0, (B, 2, N))
    u, A, C, s0 = _prep(u, u=u, A=A, C=C, s0=s0)
    s = torch.empty(B, T, 2, N, device=u.device, dtype=dt)
    res = torch.empty(B, N, device=u.device, dtype=dt)
    _launch(_lstm_fwd_kernel, tile, B, T, N, u, A, C, s0 if s0 is not None else s, s, res, T, N,
            int(num_iters), HAS_S0=s0 is not None)
    return s, res.max()


def fused_lstm_backward(u, A, C, s0, s, grad_s, *, chunk: int | None = None,
                        block_n: int | None = None):
    """Adjoint backward of ParaLSTM at the solution ``s`` [B, T, 2, N] with cotangent ``grad_s``
    [B, T, 2, N]. Returns (du [B, T, 3, N], dA [3, N], dC [2, N], ds0 [B, 2, N] or None)."""
    B, T, N, dt, tile = _setup(u, chunk, block_n)
    _check("A", A, (3, N))
    _check("C", C, (2, N))
    if s0 is not None:
        _check("s0", s0, (B, 2, N))
    _check("s", s, (B, T, 2, N))
    _check("grad_s", grad_s, (B, T, 2, N))
    u, A, C, s0, s, grad_s = _prep(u, u=u, A=A, C=C, s0=s0, s=s, grad_s=grad_s)
    du = torch.empty_like(u)
    dA = torch.empty(B, 3, N, device=u.device, dtype=dt)
    dC = torch.empty(B, 2, N, device=u.device, dtype=dt)
    ds0 = torch.empty(B, 2, N, device=u.device, dtype=dt) if s0 is not None else None
    _launch(_lstm_bwd_kernel, tile, B, T, N, u, A, C, s0 if s0 is not None else s, s, grad_s, du,
            dA, dC, ds0 if ds0 is not None else dA, T, N, HAS_S0=s0 is not None)
    ds0 = ds0.to(s0.dtype) if ds0 is not None else None
    return du, dA.sum(0).to(A.dtype), dC.sum(0).to(C.dtype), ds0
