"""Fused Triton kernels for ParaGRU / ParaLSTM: the whole Newton solve in one forward kernel and
the whole adjoint in one backward kernel (the performance path on GPU).

Design (both cells, both directions):

* one program per (batch row ``b``, block of ``BLOCK_N`` channels); channels never interact, so
  programs are independent and the result is deterministic (no atomics);
* a program walks the time axis in chunks of ``CHUNK`` steps and holds a ``[CHUNK, BLOCK_N]``
  tile of the chunk in registers;
* forward: the chunk before is fully converged when a chunk starts, so its final state is the
  exact initial state of this chunk (the result is exact, not a truncation). Initial guess
  ``h_t = f(0, u_t)`` (row 0 uses the carried state), then ``num_iters`` Newton iterations, each
  ``h_{t-1}`` from the current iterate, ``r = f(h_{t-1}, u) - h``, ``J = df/dh`` for the whole
  tile, and the chunk's linear recurrence ``d_t = J_t d_{t-1} + r_t`` (``d`` = 0 before row 0,
  whose predecessor is exact) solved by ``tl.associative_scan`` along time (diagonal combine for
  GRU, 2x2-block combine for LSTM). The one-step time shift ``h_{t-1}`` is done through the
  output buffer: the iterate is stored, a ``tl.debug_barrier()`` makes it visible to the whole
  program, and it is read back at offset ``t - 1`` (row 0 then reads the previous chunk's final
  state, or ``h0``). A second barrier after the read guards the next store (write-after-read).
  After the last iteration ``f`` is evaluated once more and ``max |f(h_{t-1}, u_t) - h_t|`` is
  reduced per program into a buffer; the host takes the max.
* backward: the adjoint ``lam_t = g_t + J_{t+1}^T lam_{t+1}`` runs chunk by chunk in reverse time
  order. The tile is loaded time-reversed by index arithmetic (row ``i`` is time
  ``c0 + CHUNK - 1 - i``), so a forward ``tl.associative_scan`` solves the reverse recurrence.
  ``J_{t+1}`` is evaluated at ``(h_t, u_{t+1})`` read straight from memory, which handles the
  chunk's last row (it needs the next chunk's first step) exactly; ``J_T`` is 0. ``lam`` at the
  chunk's first time step is carried to the next (earlier) chunk. Then the local VJPs of the
  tile give ``du`` (stored), per-program partial sums of ``dA`` (``dC``) (summed over ``B`` on the
  host) and, at ``t = 0``, ``dh0``.

All arithmetic is in fp32 (fp64 when ``u`` is fp64); bf16/fp16 inputs are upcast on load.
``tanh`` is written as ``2 sigmoid(2x) - 1`` (no libdevice in the Triton interpreter).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["fused_gru_backward", "fused_gru_forward", "fused_lstm_backward", "fused_lstm_forward"]

DEFAULT_CHUNK = 64
DEFAULT_BLOCK_N = 64


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


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
@triton.jit
def _gru_fwd_kernel(u_ptr, a_ptr, h0_ptr, h_ptr, res_ptr, T, N, num_iters,
                    HAS_H0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    DT = h_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    rows = tl.arange(0, CHUNK)
    az = tl.load(a_ptr + n, mask=nmask, other=0.0).to(DT)[None, :]
    ar = tl.load(a_ptr + N + n, mask=nmask, other=0.0).to(DT)[None, :]
    ah = tl.load(a_ptr + 2 * N + n, mask=nmask, other=0.0).to(DT)[None, :]
    if HAS_H0:
        h0 = tl.load(h0_ptr + b * N + n, mask=nmask, other=0.0).to(DT)[None, :]
    else:
        h0 = tl.zeros([1, BLOCK_N], dtype=DT)
    res = tl.zeros([BLOCK_N], dtype=DT)
    for k in range(tl.cdiv(T, CHUNK)):
        t = (k * CHUNK + rows).to(tl.int64)[:, None]
        mask = (t < T) & nmask[None, :]
        prev_mask = mask & (t >= 1)
        u_off = ((b * T + t) * 3) * N + n[None, :]
        uz = tl.load(u_ptr + u_off, mask=mask, other=0.0).to(DT)
        ur = tl.load(u_ptr + u_off + N, mask=mask, other=0.0).to(DT)
        uh = tl.load(u_ptr + u_off + 2 * N, mask=mask, other=0.0).to(DT)
        h_off = (b * T + t) * N + n[None, :]
        # initial guess f(0, u); row 0 starts from the carried (exact) state
        hp = tl.load(h_ptr + h_off - N, mask=prev_mask & (rows[:, None] == 0), other=0.0)
        hp = tl.where(t == 0, h0, hp)
        h, jac = _gru_step_jac(hp, uz, ur, uh, az, ar, ah)
        for _ in range(num_iters):
            tl.store(h_ptr + h_off, h, mask=mask)
            tl.debug_barrier()
            hp = tl.where(t == 0, h0, tl.load(h_ptr + h_off - N, mask=prev_mask, other=0.0))
            tl.debug_barrier()
            fh, jac = _gru_step_jac(hp, uz, ur, uh, az, ar, ah)
            jac = tl.where(rows[:, None] == 0, 0.0, jac)  # the state before row 0 is exact
            _, delta = tl.associative_scan((jac, fh - h), 0, _combine_diag)
            h = h + delta
        tl.store(h_ptr + h_off, h, mask=mask)
        tl.debug_barrier()
        hp = tl.where(t == 0, h0, tl.load(h_ptr + h_off - N, mask=prev_mask, other=0.0))
        tl.debug_barrier()
        fh, jac = _gru_step_jac(hp, uz, ur, uh, az, ar, ah)
        res = tl.maximum(res, tl.max(tl.where(mask, tl.abs(fh - h), 0.0), axis=0))
    tl.store(res_ptr + b * tl.num_programs(1) + pid_n, tl.max(res, axis=0))


@triton.jit
def _gru_bwd_kernel(u_ptr, a_ptr, h0_ptr, h_ptr, g_ptr, du_ptr, da_ptr, dh0_ptr, T, N,
                    HAS_H0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    DT = da_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    rows = tl.arange(0, CHUNK)
    az = tl.load(a_ptr + n, mask=nmask, other=0.0).to(DT)[None, :]
    ar = tl.load(a_ptr + N + n, mask=nmask, other=0.0).to(DT)[None, :]
    ah = tl.load(a_ptr + 2 * N + n, mask=nmask, other=0.0).to(DT)[None, :]
    if HAS_H0:
        h0 = tl.load(h0_ptr + b * N + n, mask=nmask, other=0.0).to(DT)[None, :]
    else:
        h0 = tl.zeros([1, BLOCK_N], dtype=DT)
    carry = tl.zeros([BLOCK_N], dtype=DT)  # lam at the first step of the chunk processed last
    dh0 = tl.zeros([BLOCK_N], dtype=DT)
    sz = tl.zeros([BLOCK_N], dtype=DT)
    sr = tl.zeros([BLOCK_N], dtype=DT)
    sh = tl.zeros([BLOCK_N], dtype=DT)
    num_chunks = tl.cdiv(T, CHUNK)
    for kk in range(num_chunks):
        c0 = (num_chunks - 1 - kk) * CHUNK
        t = (c0 + CHUNK - 1 - rows).to(tl.int64)[:, None]  # time-reversed tile
        mask = (t < T) & nmask[None, :]
        nxt = mask & (t + 1 < T)
        h_off = (b * T + t) * N + n[None, :]
        u_off = ((b * T + t) * 3) * N + n[None, :]
        g = tl.load(g_ptr + h_off, mask=mask, other=0.0).to(DT)
        # J_{t+1} at (h_t, u_{t+1}); 0 past the end of the sequence
        h_t = tl.load(h_ptr + h_off, mask=mask, other=0.0).to(DT)
        _, jn = _gru_step_jac(h_t,
                              tl.load(u_ptr + u_off + 3 * N, mask=nxt, other=0.0).to(DT),
                              tl.load(u_ptr + u_off + 4 * N, mask=nxt, other=0.0).to(DT),
                              tl.load(u_ptr + u_off + 5 * N, mask=nxt, other=0.0).to(DT),
                              az, ar, ah)
        jn = tl.where(nxt, jn, 0.0)
        g = tl.where(rows[:, None] == 0, g + jn * carry[None, :], g)
        _, lam = tl.associative_scan((jn, g), 0, _combine_diag)
        carry = tl.sum(tl.where(rows[:, None] == CHUNK - 1, lam, 0.0), axis=0)
        # local VJP at (h_{t-1}, u_t) with cotangent lam_t
        hp = tl.load(h_ptr + h_off - N, mask=mask & (t >= 1), other=0.0).to(DT)
        hp = tl.where(t == 0, h0, hp)
        uz = tl.load(u_ptr + u_off, mask=mask, other=0.0).to(DT)
        ur = tl.load(u_ptr + u_off + N, mask=mask, other=0.0).to(DT)
        uh = tl.load(u_ptr + u_off + 2 * N, mask=mask, other=0.0).to(DT)
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
@triton.jit
def _lstm_fwd_kernel(u_ptr, a_ptr, cpar_ptr, s0_ptr, s_ptr, res_ptr, T, N, num_iters,
                     HAS_S0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    DT = s_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    rows = tl.arange(0, CHUNK)
    af = tl.load(a_ptr + n, mask=nmask, other=0.0).to(DT)[None, :]
    ao = tl.load(a_ptr + N + n, mask=nmask, other=0.0).to(DT)[None, :]
    ac = tl.load(a_ptr + 2 * N + n, mask=nmask, other=0.0).to(DT)[None, :]
    cf = tl.load(cpar_ptr + n, mask=nmask, other=0.0).to(DT)[None, :]
    co = tl.load(cpar_ptr + N + n, mask=nmask, other=0.0).to(DT)[None, :]
    if HAS_S0:
        c0v = tl.load(s0_ptr + b * 2 * N + n, mask=nmask, other=0.0).to(DT)[None, :]
        h0v = tl.load(s0_ptr + b * 2 * N + N + n, mask=nmask, other=0.0).to(DT)[None, :]
    else:
        c0v = tl.zeros([1, BLOCK_N], dtype=DT)
        h0v = tl.zeros([1, BLOCK_N], dtype=DT)
    res = tl.zeros([BLOCK_N], dtype=DT)
    for k in range(tl.cdiv(T, CHUNK)):
        t = (k * CHUNK + rows).to(tl.int64)[:, None]
        mask = (t < T) & nmask[None, :]
        prev_mask = mask & (t >= 1)
        u_off = ((b * T + t) * 3) * N + n[None, :]
        uf = tl.load(u_ptr + u_off, mask=mask, other=0.0).to(DT)
        uo = tl.load(u_ptr + u_off + N, mask=mask, other=0.0).to(DT)
        uc = tl.load(u_ptr + u_off + 2 * N, mask=mask, other=0.0).to(DT)
        s_off = ((b * T + t) * 2) * N + n[None, :]  # c at s_off, h at s_off + N
        first = prev_mask & (rows[:, None] == 0)
        cp = tl.where(t == 0, c0v, tl.load(s_ptr + s_off - 2 * N, mask=first, other=0.0))
        hp = tl.where(t == 0, h0v, tl.load(s_ptr + s_off - N, mask=first, other=0.0))
        c, h, j00, j01, j10, j11 = _lstm_step_jac(cp, hp, uf, uo, uc, af, ao, ac, cf, co)
        for _ in range(num_iters):
            tl.store(s_ptr + s_off, c, mask=mask)
            tl.store(s_ptr + s_off + N, h, mask=mask)
            tl.debug_barrier()
            cp = tl.where(t == 0, c0v, tl.load(s_ptr + s_off - 2 * N, mask=prev_mask, other=0.0))
            hp = tl.where(t == 0, h0v, tl.load(s_ptr + s_off - N, mask=prev_mask, other=0.0))
            tl.debug_barrier()
            fc, fh, j00, j01, j10, j11 = _lstm_step_jac(cp, hp, uf, uo, uc, af, ao, ac, cf, co)
            first_row = rows[:, None] == 0  # the state before row 0 is exact
            j00 = tl.where(first_row, 0.0, j00)
            j01 = tl.where(first_row, 0.0, j01)
            j10 = tl.where(first_row, 0.0, j10)
            j11 = tl.where(first_row, 0.0, j11)
            _, _, _, _, dc, dh = tl.associative_scan((j00, j01, j10, j11, fc - c, fh - h), 0,
                                                     _combine_block2)
            c = c + dc
            h = h + dh
        tl.store(s_ptr + s_off, c, mask=mask)
        tl.store(s_ptr + s_off + N, h, mask=mask)
        tl.debug_barrier()
        cp = tl.where(t == 0, c0v, tl.load(s_ptr + s_off - 2 * N, mask=prev_mask, other=0.0))
        hp = tl.where(t == 0, h0v, tl.load(s_ptr + s_off - N, mask=prev_mask, other=0.0))
        tl.debug_barrier()
        fc, fh, j00, j01, j10, j11 = _lstm_step_jac(cp, hp, uf, uo, uc, af, ao, ac, cf, co)
        err = tl.maximum(tl.abs(fc - c), tl.abs(fh - h))
        res = tl.maximum(res, tl.max(tl.where(mask, err, 0.0), axis=0))
    tl.store(res_ptr + b * tl.num_programs(1) + pid_n, tl.max(res, axis=0))


@triton.jit
def _lstm_bwd_kernel(u_ptr, a_ptr, cpar_ptr, s0_ptr, s_ptr, g_ptr, du_ptr, da_ptr, dc_ptr,
                     ds0_ptr, T, N,
                     HAS_S0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    DT = da_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    rows = tl.arange(0, CHUNK)
    af = tl.load(a_ptr + n, mask=nmask, other=0.0).to(DT)[None, :]
    ao = tl.load(a_ptr + N + n, mask=nmask, other=0.0).to(DT)[None, :]
    ac = tl.load(a_ptr + 2 * N + n, mask=nmask, other=0.0).to(DT)[None, :]
    cf = tl.load(cpar_ptr + n, mask=nmask, other=0.0).to(DT)[None, :]
    co = tl.load(cpar_ptr + N + n, mask=nmask, other=0.0).to(DT)[None, :]
    if HAS_S0:
        c0v = tl.load(s0_ptr + b * 2 * N + n, mask=nmask, other=0.0).to(DT)[None, :]
        h0v = tl.load(s0_ptr + b * 2 * N + N + n, mask=nmask, other=0.0).to(DT)[None, :]
    else:
        c0v = tl.zeros([1, BLOCK_N], dtype=DT)
        h0v = tl.zeros([1, BLOCK_N], dtype=DT)
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
        t = (c0 + CHUNK - 1 - rows).to(tl.int64)[:, None]  # time-reversed tile
        mask = (t < T) & nmask[None, :]
        nxt = mask & (t + 1 < T)
        s_off = ((b * T + t) * 2) * N + n[None, :]
        u_off = ((b * T + t) * 3) * N + n[None, :]
        gc = tl.load(g_ptr + s_off, mask=mask, other=0.0).to(DT)
        gh = tl.load(g_ptr + s_off + N, mask=mask, other=0.0).to(DT)
        # J_{t+1} at (s_t, u_{t+1}); 0 past the end of the sequence
        _, _, j00, j01, j10, j11 = _lstm_step_jac(
            tl.load(s_ptr + s_off, mask=mask, other=0.0).to(DT),
            tl.load(s_ptr + s_off + N, mask=mask, other=0.0).to(DT),
            tl.load(u_ptr + u_off + 3 * N, mask=nxt, other=0.0).to(DT),
            tl.load(u_ptr + u_off + 4 * N, mask=nxt, other=0.0).to(DT),
            tl.load(u_ptr + u_off + 5 * N, mask=nxt, other=0.0).to(DT),
            af, ao, ac, cf, co)
        j00 = tl.where(nxt, j00, 0.0)
        j01 = tl.where(nxt, j01, 0.0)
        j10 = tl.where(nxt, j10, 0.0)
        j11 = tl.where(nxt, j11, 0.0)
        first_row = rows[:, None] == 0
        # lam_t = g_t + J_{t+1}^T lam_{t+1}; the transposed matrix is (j00, j10; j01, j11)
        gc = tl.where(first_row, gc + j00 * carry_c[None, :] + j10 * carry_h[None, :], gc)
        gh = tl.where(first_row, gh + j01 * carry_c[None, :] + j11 * carry_h[None, :], gh)
        _, _, _, _, lc, lh = tl.associative_scan((j00, j10, j01, j11, gc, gh), 0, _combine_block2)
        last_row = rows[:, None] == CHUNK - 1
        carry_c = tl.sum(tl.where(last_row, lc, 0.0), axis=0)
        carry_h = tl.sum(tl.where(last_row, lh, 0.0), axis=0)
        # local VJP at (s_{t-1}, u_t) with cotangent lam_t
        pm = mask & (t >= 1)
        cp = tl.where(t == 0, c0v, tl.load(s_ptr + s_off - 2 * N, mask=pm, other=0.0).to(DT))
        hp = tl.where(t == 0, h0v, tl.load(s_ptr + s_off - N, mask=pm, other=0.0).to(DT))
        uf = tl.load(u_ptr + u_off, mask=mask, other=0.0).to(DT)
        uo = tl.load(u_ptr + u_off + N, mask=mask, other=0.0).to(DT)
        uc = tl.load(u_ptr + u_off + 2 * N, mask=mask, other=0.0).to(DT)
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
    if x is None:
        raise ValueError(f"{name} is required, expected shape {list(shape)}")
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape):
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape {list(shape)}, got {got}")


def _setup(u, chunk, block_n):
    """Validate ``u`` and the device; return (B, T, N, compute dtype, CHUNK, BLOCK_N)."""
    if not isinstance(u, torch.Tensor) or u.dim() != 4 or u.shape[2] != 3:
        got = list(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"u must have shape [B, T, 3, N], got {got}")
    B, T, _, N = u.shape
    if T < 1 or B < 1 or N < 1:
        raise ValueError(f"u must have shape [B, T, 3, N] with B, T, N >= 1, got {list(u.shape)}")
    if not u.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("fused Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                         f"before import to run on CPU); got u on {u.device}")
    chunk = DEFAULT_CHUNK if chunk is None else int(chunk)
    block_n = DEFAULT_BLOCK_N if block_n is None else int(block_n)
    for name, v in (("chunk", chunk), ("block_n", block_n)):
        if v < 2 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 2, got {v}")
    chunk = min(chunk, max(16, triton.next_power_of_2(T)))
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    dt = torch.float64 if u.dtype == torch.float64 else torch.float32
    return B, T, N, dt, chunk, block_n


def _prep(t, device):
    if t is None:
        return None
    if t.device != device:
        raise ValueError(f"all tensors must be on {device}, got one on {t.device}")
    return t.contiguous()


def fused_gru_forward(u, A, h0=None, num_iters: int = 3, *, chunk: int | None = None,
                      block_n: int | None = None):
    """Newton solve of ParaGRU over the whole sequence in one kernel.

    u [B, T, 3, N] (rows z, r, h), A [3, N], h0 [B, N] or None (zeros).
    Returns (h [B, T, N], residual): h in fp32 (fp64 for fp64 ``u``); residual is a 0-dim tensor,
    ``max |f(h_{t-1}, u_t) - h_t|`` over everything after the last iteration.
    ``chunk`` (time steps per tile) and ``block_n`` (channels per program) are powers of two.
    """
    B, T, N, dt, CH, BN = _setup(u, chunk, block_n)
    _check("A", A, (3, N))
    if h0 is not None:
        _check("h0", h0, (B, N))
    u, A, h0 = (_prep(x, u.device) for x in (u, A, h0))
    h = torch.empty(B, T, N, device=u.device, dtype=dt)
    grid = (B, triton.cdiv(N, BN))
    res = torch.zeros(grid[0] * grid[1], device=u.device, dtype=dt)
    _gru_fwd_kernel[grid](u, A, h0 if h0 is not None else h, h, res, T, N, int(num_iters),
                          HAS_H0=h0 is not None, CHUNK=CH, BLOCK_N=BN)
    return h, res.max()


def fused_gru_backward(u, A, h0, h, grad_h, *, chunk: int | None = None,
                       block_n: int | None = None):
    """Adjoint backward of ParaGRU at the solution ``h`` [B, T, N] with output cotangent
    ``grad_h`` [B, T, N]. Returns (du [B, T, 3, N] in u's dtype, dA [3, N] in A's dtype,
    dh0 [B, N] or None when ``h0`` is None)."""
    B, T, N, dt, CH, BN = _setup(u, chunk, block_n)
    _check("A", A, (3, N))
    if h0 is not None:
        _check("h0", h0, (B, N))
    _check("h", h, (B, T, N))
    _check("grad_h", grad_h, (B, T, N))
    u, A, h0, h, grad_h = (_prep(x, u.device) for x in (u, A, h0, h, grad_h))
    du = torch.empty_like(u)
    dA = torch.empty(B, 3, N, device=u.device, dtype=dt)
    dh0 = torch.empty(B, N, device=u.device, dtype=dt) if h0 is not None else None
    grid = (B, triton.cdiv(N, BN))
    _gru_bwd_kernel[grid](u, A, h0 if h0 is not None else h, h, grad_h, du, dA,
                          dh0 if dh0 is not None else dA, T, N,
                          HAS_H0=h0 is not None, CHUNK=CH, BLOCK_N=BN)
    dh0 = dh0.to(h0.dtype) if dh0 is not None else None
    return du, dA.sum(0).to(A.dtype), dh0


def fused_lstm_forward(u, A, C, s0=None, num_iters: int = 3, *, chunk: int | None = None,
                       block_n: int | None = None):
    """Newton solve of ParaLSTM (CIFG with peepholes, state (c, h)) in one kernel.

    u [B, T, 3, N] rows (f, o, c); A [3, N] rows (f, o, c); C [2, N] peepholes (f, o);
    s0 [B, 2, N] or None (zeros). Returns (s [B, T, 2, N] with rows (c, h), residual as for GRU).
    """
    B, T, N, dt, CH, BN = _setup(u, chunk, block_n)
    _check("A", A, (3, N))
    _check("C", C, (2, N))
    if s0 is not None:
        _check("s0", s0, (B, 2, N))
    u, A, C, s0 = (_prep(x, u.device) for x in (u, A, C, s0))
    s = torch.empty(B, T, 2, N, device=u.device, dtype=dt)
    grid = (B, triton.cdiv(N, BN))
    res = torch.zeros(grid[0] * grid[1], device=u.device, dtype=dt)
    _lstm_fwd_kernel[grid](u, A, C, s0 if s0 is not None else s, s, res, T, N, int(num_iters),
                           HAS_S0=s0 is not None, CHUNK=CH, BLOCK_N=BN)
    return s, res.max()


def fused_lstm_backward(u, A, C, s0, s, grad_s, *, chunk: int | None = None,
                        block_n: int | None = None):
    """Adjoint backward of ParaLSTM at the solution ``s`` [B, T, 2, N] with cotangent ``grad_s``
    [B, T, 2, N]. Returns (du [B, T, 3, N], dA [3, N], dC [2, N], ds0 [B, 2, N] or None)."""
    B, T, N, dt, CH, BN = _setup(u, chunk, block_n)
    _check("A", A, (3, N))
    _check("C", C, (2, N))
    if s0 is not None:
        _check("s0", s0, (B, 2, N))
    _check("s", s, (B, T, 2, N))
    _check("grad_s", grad_s, (B, T, 2, N))
    u, A, C, s0, s, grad_s = (_prep(x, u.device) for x in (u, A, C, s0, s, grad_s))
    du = torch.empty_like(u)
    dA = torch.empty(B, 3, N, device=u.device, dtype=dt)
    dC = torch.empty(B, 2, N, device=u.device, dtype=dt)
    ds0 = torch.empty(B, 2, N, device=u.device, dtype=dt) if s0 is not None else None
    grid = (B, triton.cdiv(N, BN))
    _lstm_bwd_kernel[grid](u, A, C, s0 if s0 is not None else s, s, grad_s, du, dA, dC,
                           ds0 if ds0 is not None else dA, T, N,
                           HAS_S0=s0 is not None, CHUNK=CH, BLOCK_N=BN)
    ds0 = ds0.to(s0.dtype) if ds0 is not None else None
    return du, dA.sum(0).to(A.dtype), dC.sum(0).to(C.dtype), ds0
