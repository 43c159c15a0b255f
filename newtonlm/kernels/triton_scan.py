"""Triton kernels for linear recurrences (one Newton step, or the adjoint's backward pass).

* diagonal:  ``h_t = J_t * h_{t-1} + r_t``; ``J, r: [B, T, N]``, ``h0: [B, N]``;
* 2x2 blocks of diagonals (LSTM ``[c, h]``): ``s_t[i] = sum_j J_t[i, j] * s_{t-1}[j] + r_t[i]``;
  ``J: [B, T, 2, 2, N]``, ``r: [B, T, 2, N]``, ``h0: [B, 2, N]``;
* ``reverse=True`` runs the same recurrence from t = T-1 down to 0 with ``h_T = h0``.

Semantics match :mod:`newtonlm.kernels.reference` (``scan_diag_ref``, ``scan_block2_ref``).

Design. Time is sequential, so parallelism comes from batch x channel blocks and, when those are
too few to fill the GPU, from chunks of time (the classic 3-phase chunked scan):

1. ``_*_chunk_kernel`` in summary mode, grid ``(B * C, N / BLOCK_N)``: each program scans its
   chunk from a zero state and stores the chunk's final state ``S[b, c]`` and the product of its
   Jacobians ``P[b, c]`` (a 2x2 matrix per channel for blocks); nothing of size T is written.
2. ``_*_carry_kernel``, grid ``(B, N / BLOCK_N)``: a short sequential pass over the C chunks,
   ``carry = P[c] carry + S[c]``, overwriting ``S[b, c]`` with the state entering chunk c.
3. ``_*_chunk_kernel`` in output mode, same grid as 1: each chunk reruns its recurrence from the
   carried-in state and writes the outputs. This equals "local scan + cumulative J product times
   the carry" but reads J, r once more instead of writing and re-reading a local-state tensor.

With one chunk (short T, or enough batch x channel programs) only phase 3 runs, from h0. Time is
looped sequentially inside a program, one ``BLOCK_N``-wide vector per step (the style of fla's
hgrn kernels); pointers step by +-N so the reverse direction is plain pointer arithmetic.
Arithmetic is fp32 (fp64 if any input is fp64); fp16/bf16 values are upcast right after loading.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Launch parameters, chosen for H100/H200 (132 SMs, at most 32 resident blocks per SM) without
# measurements yet. BLOCK_N = 64 channels per program with 2 warps: one channel per thread and
# 256-byte coalesced fp32 loads per time step. A program is latency bound (each step waits for
# its loads, then one dependent FMA chain), so throughput comes from many resident programs:
# below _MIN_PROGRAMS (batch x channel-block) programs, time is split into chunks aiming at
# _TARGET_PROGRAMS programs (~32 per SM), never shorter than _MIN_CHUNK steps so that the
# per-chunk summaries (P, S) stay a small fraction (<= 1/32) of the traffic. Chunking reads J
# and r twice (5 instead of 3 passes over [B, T, N]), so it is skipped once the grid is half full.
_BLOCK_N = 64
_MIN_CHUNK = 64
_MIN_PROGRAMS = 2048
_TARGET_PROGRAMS = 4096
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _diag_chunk_kernel(J, R, INIT, OUT, P, S, T, N, L, C, HAS_INIT: tl.constexpr,
                       SUMMARY: tl.constexpr, REVERSE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scan chunk c of batch b: from INIT[b, c] (or zero), writes OUT (output mode) or the
    chunk's product of J and final state to P[b, c], S[b, c] (summary mode). INIT: [B, C, N]."""
    pid = tl.program_id(0)
    c = pid % C
    b = (pid // C).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < N
    acc_ty = OUT.dtype.element_ty
    t0 = c * L
    steps = tl.minimum(L, T - t0)
    if REVERSE:
        t_first = t0 + steps - 1
        delta = -N
    else:
        t_first = t0
        delta = N
    off = (b * T + t_first) * N + n
    summary_off = (b * C + c) * N + n
    if HAS_INIT:
        h = tl.load(INIT + summary_off, mask=mask, other=0.0).to(acc_ty)
    else:
        h = tl.zeros([BLOCK_N], dtype=acc_ty)
    p = tl.full([BLOCK_N], 1.0, dtype=acc_ty)
    j_ptr, r_ptr, o_ptr = J + off, R + off, OUT + off
    for _ in range(steps):  # masked lanes are never mixed with others, so no `other=` needed
        j = tl.load(j_ptr, mask=mask).to(acc_ty)
        h = j * h + tl.load(r_ptr, mask=mask).to(acc_ty)
        if SUMMARY:
            p = p * j
        else:
            tl.store(o_ptr, h, mask=mask)
            o_ptr += delta
        j_ptr += delta
        r_ptr += delta
    if SUMMARY:
        tl.store(P + summary_off, p, mask=mask)
        tl.store(S + summary_off, h, mask=mask)


@triton.jit
def _diag_carry_kernel(H0, P, S, N, C, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Carry states across chunks: S[b, c] <- state entering chunk c. H0: [B, N]."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < N
    acc_ty = S.dtype.element_ty
    if HAS_H0:
        h = tl.load(H0 + b * N + n, mask=mask, other=0.0).to(acc_ty)
    else:
        h = tl.zeros([BLOCK_N], dtype=acc_ty)
    if REVERSE:
        off = (b * C + C - 1) * N + n
        delta = -N
    else:
        off = b * C * N + n
        delta = N
    for _ in range(C):
        p = tl.load(P + off, mask=mask, other=0.0)
        s = tl.load(S + off, mask=mask, other=0.0)
        tl.store(S + off, h, mask=mask)
        h = p * h + s
        off += delta


@triton.jit
def _block2_chunk_kernel(J, R, INIT, OUT, P, S, T, N, L, C, HAS_INIT: tl.constexpr,
                         SUMMARY: tl.constexpr, REVERSE: tl.constexpr, BLOCK_N: tl.constexpr):
    """2x2-block version of ``_diag_chunk_kernel``. J: [B, T, 2, 2, N]; R, OUT: [B, T, 2, N];
    INIT, S: [B, C, 2, N]; P: [B, C, 2, 2, N] (product J_last ... J_first of the chunk)."""
    pid = tl.program_id(0)
    c = pid % C
    b = (pid // C).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < N
    acc_ty = OUT.dtype.element_ty
    t0 = c * L
    steps = tl.minimum(L, T - t0)
    if REVERSE:
        t_first = t0 + steps - 1
        delta = -2 * N
    else:
        t_first = t0
        delta = 2 * N
    r_off = (b * T + t_first) * (2 * N) + n  # J offsets are exactly twice the r offsets
    s_off = (b * C + c) * (2 * N) + n
    if HAS_INIT:
        h0 = tl.load(INIT + s_off, mask=mask, other=0.0).to(acc_ty)
        h1 = tl.load(INIT + s_off + N, mask=mask, other=0.0).to(acc_ty)
    else:
        h0 = tl.zeros([BLOCK_N], dtype=acc_ty)
        h1 = tl.zeros([BLOCK_N], dtype=acc_ty)
    p00 = tl.full([BLOCK_N], 1.0, dtype=acc_ty)
    p01 = tl.zeros([BLOCK_N], dtype=acc_ty)
    p10 = tl.zeros([BLOCK_N], dtype=acc_ty)
    p11 = tl.full([BLOCK_N], 1.0, dtype=acc_ty)
    j_ptr, r_ptr, o_ptr = J + (2 * r_off - n), R + r_off, OUT + r_off
    j_delta = 2 * delta
    for _ in range(steps):  # as in the diagonal kernel, no `other=` needed
        j00 = tl.load(j_ptr, mask=mask).to(acc_ty)
        j01 = tl.load(j_ptr + N, mask=mask).to(acc_ty)
        j10 = tl.load(j_ptr + 2 * N, mask=mask).to(acc_ty)
        j11 = tl.load(j_ptr + 3 * N, mask=mask).to(acc_ty)
        x0 = tl.load(r_ptr, mask=mask).to(acc_ty)
        x1 = tl.load(r_ptr + N, mask=mask).to(acc_ty)
        h0, h1 = j00 * h0 + j01 * h1 + x0, j10 * h0 + j11 * h1 + x1
        if SUMMARY:
            p00, p01, p10, p11 = (j00 * p00 + j01 * p10, j00 * p01 + j01 * p11,
                                  j10 * p00 + j11 * p10, j10 * p01 + j11 * p11)
        else:
            tl.store(o_ptr, h0, mask=mask)
            tl.store(o_ptr + N, h1, mask=mask)
            o_ptr += delta
        j_ptr += j_delta
        r_ptr += delta
    if SUMMARY:
        p_off = 2 * s_off - n
        tl.store(P + p_off, p00, mask=mask)
        tl.store(P + p_off + N, p01, mask=mask)
        tl.store(P + p_off + 2 * N, p10, mask=mask)
        tl.store(P + p_off + 3 * N, p11, mask=mask)
        tl.store(S + s_off, h0, mask=mask)
        tl.store(S + s_off + N, h1, mask=mask)


@triton.jit
def _block2_carry_kernel(H0, P, S, N, C, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """2x2-block version of ``_diag_carry_kernel``. H0: [B, 2, N]."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < N
    acc_ty = S.dtype.element_ty
    if HAS_H0:
        h0 = tl.load(H0 + b * 2 * N + n, mask=mask, other=0.0).to(acc_ty)
        h1 = tl.load(H0 + b * 2 * N + N + n, mask=mask, other=0.0).to(acc_ty)
    else:
        h0 = tl.zeros([BLOCK_N], dtype=acc_ty)
        h1 = tl.zeros([BLOCK_N], dtype=acc_ty)
    if REVERSE:
        s_off = (b * C + C - 1) * (2 * N) + n
        delta = -2 * N
    else:
        s_off = b * C * (2 * N) + n
        delta = 2 * N
    for _ in range(C):
        p_off = 2 * s_off - n
        p00 = tl.load(P + p_off, mask=mask, other=0.0)
        p01 = tl.load(P + p_off + N, mask=mask, other=0.0)
        p10 = tl.load(P + p_off + 2 * N, mask=mask, other=0.0)
        p11 = tl.load(P + p_off + 3 * N, mask=mask, other=0.0)
        s0 = tl.load(S + s_off, mask=mask, other=0.0)
        s1 = tl.load(S + s_off + N, mask=mask, other=0.0)
        tl.store(S + s_off, h0, mask=mask)
        tl.store(S + s_off + N, h1, mask=mask)
        h0, h1 = p00 * h0 + p01 * h1 + s0, p10 * h0 + p11 * h1 + s1
        s_off += delta


def _check(name: str, x, shape: tuple, expected: str, ref) -> None:
    """ValueError unless ``x`` is a float tensor of ``shape`` (None entries match any size) on
    ``ref``'s device; TypeError if it is not a tensor. ``expected`` describes the layout."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = expected if None in shape else f"{tuple(shape)} {expected}"
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {want}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}, expected float16, bfloat16, float32 or "
                         "float64")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device}, expected {ref.device} like r")


def _pick_chunk(B: int, T: int, n_blocks: int) -> int:
    """Chunk length: the whole sequence if batch x channel blocks already fill the GPU, else
    enough chunks to reach ~_TARGET_PROGRAMS programs, each at least _MIN_CHUNK long."""
    programs = B * n_blocks
    if programs >= _MIN_PROGRAMS:
        return T
    want_chunks = triton.cdiv(_TARGET_PROGRAMS, programs)
    return max(_MIN_CHUNK, triton.cdiv(T, want_chunks))


def _scan(chunk_kernel, carry_kernel, J, r, h0, reverse, chunk, block_n, state_shape):
    """Shared launcher. ``state_shape`` is (N,) or (2, N); J and r are validated by the caller."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if r.device.type != "cuda" and not interpret:
        raise ValueError(f"triton scans need CUDA tensors, got r on {r.device} (set "
                         "TRITON_INTERPRET=1 before importing triton to run on the CPU)")
    B, T, N = r.shape[0], r.shape[1], r.shape[-1]
    dtypes = {J.dtype, r.dtype} | ({h0.dtype} if h0 is not None else set())
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    out = torch.empty(r.shape, dtype=acc, device=r.device)
    if out.numel() == 0:
        return out
    J, r = J.contiguous(), r.contiguous()
    h0 = h0.contiguous() if h0 is not None else None
    if block_n is None:
        block_n = min(_BLOCK_N, max(16, triton.next_power_of_2(N)))
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    n_blocks = triton.cdiv(N, block_n)
    if chunk is None:
        chunk = _pick_chunk(B, T, n_blocks)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of time steps, got {chunk}")
    C = triton.cdiv(T, chunk)
    meta = {"REVERSE": bool(reverse), "BLOCK_N": block_n, "num_warps": max(1, block_n // 32)}
    # Triton launches on the current CUDA device: make it r's.
    with torch.cuda.device(r.device) if r.is_cuda else contextlib.nullcontext():
        if C == 1:  # single pass straight from h0 (read as a [B, 1, *state] carry buffer)
            chunk_kernel[(B, n_blocks)](J, r, h0 if h0 is not None else out, out, out, out,
                                        T, N, T, 1, HAS_INIT=h0 is not None, SUMMARY=False,
                                        **meta)
            return out
        carry = torch.empty((B, C, *state_shape), dtype=acc, device=r.device)
        prod = torch.empty((B, C, *state_shape[:-1], *state_shape), dtype=acc, device=r.device)
        grid = (B * C, n_blocks)
        chunk_kernel[grid](J, r, out, out, prod, carry, T, N, chunk, C,
                           HAS_INIT=False, SUMMARY=True, **meta)
        carry_kernel[(B, n_blocks)](h0 if h0 is not None else carry, prod, carry, N, C,
                                    HAS_H0=h0 is not None, **meta)
        chunk_kernel[grid](J, r, carry, out, prod, carry, T, N, chunk, C,
                           HAS_INIT=True, SUMMARY=False, **meta)
    return out


def triton_scan_diag(J: torch.Tensor, r: torch.Tensor, h0: torch.Tensor | None = None,
                     reverse: bool = False, *, chunk: int | None = None,
                     block_n: int | None = None) -> torch.Tensor:
    """Diagonal linear recurrence ``h_t = J_t * h_{t-1} + r_t`` (``h_{-1} = h0``), or with
    ``reverse=True`` ``h_t = J_t * h_{t+1} + r_t`` (``h_T = h0``).

    J, r: ``[B, T, N]``; h0: ``[B, N]`` or None (zeros). Returns ``[B, T, N]`` in float64 if any
    input is float64, else float32. ``chunk`` (time steps per chunk) and ``block_n`` (channels
    per program, a power of two >= 16) override the automatic choice; mainly for tests.
    """
    _check("r", r, (None, None, None), "[B, T, N]", r)
    B, T, N = r.shape
    _check("J", J, (B, T, N), "like r [B, T, N]", r)
    if h0 is not None:
        _check("h0", h0, (B, N), "[B, N] like r [B, T, N]", r)
    return _scan(_diag_chunk_kernel, _diag_carry_kernel, J, r, h0, reverse, chunk, block_n, (N,))


def triton_scan_block2(J: torch.Tensor, r: torch.Tensor, h0: torch.Tensor | None = None,
                       reverse: bool = False, *, chunk: int | None = None,
                       block_n: int | None = None) -> torch.Tensor:
    """2x2-block linear recurrence ``s_t[i] = sum_j J_t[i, j] * s_{t-1}[j] + r_t[i]`` per
    channel (``s_{-1} = h0``), or with ``reverse=True`` against ``s_{t+1}`` (``s_T = h0``).

    J: ``[B, T, 2, 2, N]`` with ``J[b, t, i, j, n] = d s_t[i, n] / d s_{t-1}[j, n]``;
    r: ``[B, T, 2, N]``; h0: ``[B, 2, N]`` or None (zeros). Returns ``[B, T, 2, N]`` in float64
    if any input is float64, else float32. ``chunk`` and ``block_n`` as in
    :func:`triton_scan_diag`.
    """
    _check("r", r, (None, None, 2, None), "[B, T, 2, N]", r)
    B, T, _, N = r.shape
    _check("J", J, (B, T, 2, 2, N), "[B, T, 2, 2, N] like r [B, T, 2, N]", r)
    if h0 is not None:
        _check("h0", h0, (B, 2, N), "[B, 2, N] like r [B, T, 2, N]", r)
    return _scan(_block2_chunk_kernel, _block2_carry_kernel, J, r, h0, reverse, chunk, block_n,
                 (2, N))
