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

Launch parameters: ``BLOCK_N`` and warps of the chunk kernels are ``triton.autotune``
configurations (:func:`launch_configs`; one fixed configuration under the interpreter); the
chunk length is chosen on the host (``_pick_chunk``) because the carry buffers of all three
phases depend on it; the carry pass has one fixed launch. ``chunk`` and ``block_n`` override
the choices. Results do not depend on ``BLOCK_N``; the chunk length changes them by rounding.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .checks import check_device, check_shape

# Decided once, like Triton itself decides at import whether kernels are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Launch parameters of the chunk kernels (phases 1 and 3) are triton.autotune configurations
# (:func:`launch_configs`), keyed on N, the T and B buckets (powers of two) and the phase. A
# program is latency bound (each step waits for its loads, then one dependent FMA chain), so the
# candidates vary the channels per program (BLOCK_N: coalesced loads of 4 * BLOCK_N bytes per
# step) and per thread (1 or 2 independent chains). num_stages stays 1: Triton 3.7 compiles
# these kernels to identical PTX for 1 to 4 stages (it pipelines loads that feed tl.dot only).
# Under the interpreter there is exactly one configuration (autotuning with several needs a GPU
# driver).
INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 64}, num_warps=2, num_stages=1)
_GPU_BLOCKS = ((32, 1), (64, 1), (64, 2), (128, 2), (128, 4), (256, 4))  # (BLOCK_N, num_warps)
# The chunk length is not a per-kernel launch parameter: it sets the [B, C, ...] carry buffers
# shared by the three phases, so it is chosen here from the number of programs. Below
# _MIN_PROGRAMS (batch x channel-block, counted with _NOMINAL_BLOCK_N channels) programs, time is
# split into chunks aiming at _TARGET_PROGRAMS programs (~32 per SM of an H100/H200), never
# shorter than _MIN_CHUNK steps so that the per-chunk summaries (P, S) stay a small fraction
# (<= 1/32) of the traffic. Chunking reads J and r twice (5 instead of 3 passes over [B, T, N]),
# so it is skipped once the grid is half full. These are estimates, not yet measured on a GPU.
_NOMINAL_BLOCK_N = 64
_MIN_CHUNK = 64
_MIN_PROGRAMS = 2048
_TARGET_PROGRAMS = 4096
# The carry pass (phase 2) runs B x N / 64 programs over C chunk summaries, a few percent of the
# traffic; it updates S in place, so it keeps one fixed launch instead of being benchmarked.
_CARRY_META = {"BLOCK_N": 64, "num_warps": 2}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def launch_configs(interpret: bool = INTERPRET) -> list:
    """The autotuning candidates of the chunk kernels: ``[INTERPRETER_CONFIG]`` under the
    interpreter, else ``triton.Config({"BLOCK_N"}, num_warps, num_stages=1)`` per GPU block."""
    if interpret:
        return [INTERPRETER_CONFIG]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=1) for bn, w in _GPU_BLOCKS]


def _fit_configs(configs, named_args, **kwargs):
    """Autotune pruning: no wider than the channels need (>= 16), at most one warp per 32
    channels; no duplicates."""
    width = max(16, triton.next_power_of_2(named_args["N"]))
    out = {}
    for cfg in configs:
        bn = min(cfg.kwargs["BLOCK_N"], width)
        fitted = triton.Config({"BLOCK_N": bn}, num_warps=max(1, min(cfg.num_warps, bn // 32)),
                               num_stages=cfg.num_stages)
        out.setdefault(str(fitted), fitted)
    return list(out.values())


def _autotune(fn):
    """T_BUCKET and B_BUCKET are kernel arguments used only as the autotuning key."""
    return triton.autotune(configs=launch_configs(), key=["N", "T_BUCKET", "B_BUCKET", "SUMMARY"],
                           prune_configs_by={"early_config_prune": _fit_configs})(fn)


@_autotune
@triton.jit
def _diag_chunk_kernel(J, R, INIT, OUT, P, S, T, N, L, C, T_BUCKET, B_BUCKET, HAS_INIT: tl.constexpr,
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


@_autotune
@triton.jit
def _block2_chunk_kernel(J, R, INIT, OUT, P, S, T, N, L, C, T_BUCKET, B_BUCKET, HAS_INIT: tl.constexpr,
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


def _check(name: str, x, shape: tuple, doc: str, ref) -> None:
    """``x`` must be a float tensor of ``shape`` (None entries match any size, ``doc`` names the
    layout) on ``ref``'s device: TypeError if it is no tensor, else ValueError."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_shape(name, x, shape, doc)
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; expected float16, bfloat16, float32 or "
                         "float64")
    check_device(name, x, ref.device, "r")


def _pick_chunk(B: int, T: int, N: int) -> int:
    """Chunk length: the whole sequence if batch x channel blocks already fill the GPU, else
    enough chunks to reach ~_TARGET_PROGRAMS programs, each at least _MIN_CHUNK long."""
    programs = B * triton.cdiv(N, _NOMINAL_BLOCK_N)
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
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if chunk is None:
        chunk = _pick_chunk(B, T, N)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of time steps, got {chunk}")
    C = triton.cdiv(T, chunk)
    keys = (triton.next_power_of_2(T), triton.next_power_of_2(B))

    def run_chunks(rows, *args, **consts):  # autotuned, or the explicit block_n
        if block_n is None:
            chunk_kernel[lambda m: (rows, triton.cdiv(N, m["BLOCK_N"]))](*args, *keys, **consts)
        else:
            chunk_kernel.fn[(rows, triton.cdiv(N, block_n))](
                *args, *keys, BLOCK_N=block_n, num_warps=max(1, block_n // 32), **consts)

    # Triton launches on the current CUDA device: make it r's.
    with torch.cuda.device(r.device) if r.is_cuda else contextlib.nullcontext():
        if C == 1:  # single pass straight from h0 (read as a [B, 1, *state] carry buffer)
            run_chunks(B, J, r, h0 if h0 is not None else out, out, out, out, T, N, T, 1,
                       HAS_INIT=h0 is not None, SUMMARY=False, REVERSE=bool(reverse))
            return out
        carry = torch.empty((B, C, *state_shape), dtype=acc, device=r.device)
        prod = torch.empty((B, C, *state_shape[:-1], *state_shape), dtype=acc, device=r.device)
        run_chunks(B * C, J, r, out, out, prod, carry, T, N, chunk, C,
                   HAS_INIT=False, SUMMARY=True, REVERSE=bool(reverse))
        carry_kernel[(B, triton.cdiv(N, _CARRY_META["BLOCK_N"]))](
            h0 if h0 is not None else carry, prod, carry, N, C, HAS_H0=h0 is not None,
            REVERSE=bool(reverse), **_CARRY_META)
        run_chunks(B * C, J, r, carry, out, prod, carry, T, N, chunk, C,
                   HAS_INIT=True, SUMMARY=False, REVERSE=bool(reverse))
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
    _check("J", J, (B, T, N), "[B, T, N] like r", r)
    if h0 is not None:
        _check("h0", h0, (B, N), "[B, N]", r)
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
    _check("J", J, (B, T, 2, 2, N), "[B, T, 2, 2, N]", r)
    if h0 is not None:
        _check("h0", h0, (B, 2, N), "[B, 2, N]", r)
    return _scan(_block2_chunk_kernel, _block2_carry_kernel, J, r, h0, reverse, chunk, block_n,
                 (2, N))
