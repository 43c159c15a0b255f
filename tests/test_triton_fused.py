"""Fused Triton Newton / adjoint kernels vs. the sequential references (runs under the Triton
interpreter on CPU; conftest.py sets TRITON_INTERPRET=1 before the kernels are imported).

Sizes are tiny because every ``tl.associative_scan`` element costs ~0.1 ms in the interpreter.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

from newtonlm.kernels import triton_fused
from newtonlm.kernels.cells import GRU, LSTM
from newtonlm.kernels.reference import sequential_apply
from newtonlm.kernels.triton_fused import (
    INTERPRETER_CONFIG,
    _last_row,
    _shift_down,
    _tanh,
    fused_gru_backward,
    fused_gru_forward,
    fused_lstm_backward,
    fused_lstm_forward,
    launch_configs,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
B, N, BLOCK_N = 2, 20, 16  # N = 20 over blocks of 16: the second block is partial
# (T, chunk): one partial chunk (T = 1, 2), several chunks with a partial last one (7, 40)
CASES = [(1, 16), (2, 16), (7, 4), pytest.param(40, 16, marks=pytest.mark.slow)]


def _params(dtype, lstm=False):
    A = (0.5 * torch.randn(3, N)).clamp(-0.5, 0.5).to(DEV, dtype)
    if not lstm:
        return A
    C = (0.5 * torch.randn(2, N)).clamp(-0.5, 0.5).to(DEV, dtype)
    return A, C


def _inputs(T, dtype, with_state, lstm=False):
    u = (0.7 * torch.randn(B, T, 3, N)).to(DEV, dtype)
    state_shape = (B, 2, N) if lstm else (B, N)
    s0 = (0.5 * torch.randn(state_shape)).to(DEV, dtype) if with_state else None
    return u, s0


def _gru_ref(u, A, h0, grad=None):
    """Sequential GRU and, with ``grad``, autograd gradients (du, dA, dh0)."""
    u = u.detach().requires_grad_(True)
    A = A.detach().requires_grad_(True)
    h0r = torch.zeros_like(u[:, 0, 0]) if h0 is None else h0.detach().requires_grad_(True)
    h = sequential_apply(GRU.step, u, (A,), h0r, state_ndim=1)
    if grad is None:
        return h.detach()
    h.backward(grad)
    return u.grad, A.grad, (None if h0 is None else h0r.grad)


def _lstm_ref(u, A, C, s0, grad=None):
    u = u.detach().requires_grad_(True)
    A = A.detach().requires_grad_(True)
    C = C.detach().requires_grad_(True)
    s0r = (torch.zeros_like(u[:, 0, :2]) if s0 is None else s0.detach().requires_grad_(True))
    s = sequential_apply(LSTM.step, u, (A, C), s0r, state_ndim=2)
    if grad is None:
        return s.detach()
    s.backward(grad)
    return u.grad, A.grad, C.grad, (None if s0 is None else s0r.grad)


def _close(x, y, tol):
    assert x.shape == y.shape, (x.shape, y.shape)
    err = (x.double() - y.double()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("T,chunk", CASES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_gru_fp64(T, chunk, with_h0):
    A = _params(torch.float64)
    u, h0 = _inputs(T, torch.float64, with_h0)
    h, res = fused_gru_forward(u, A, h0, num_iters=8, chunk=chunk, block_n=BLOCK_N)
    assert h.dtype == torch.float64 and res.dim() == 0
    _close(h, _gru_ref(u, A, h0), 1e-10)
    assert res.item() < 1e-10
    g = torch.randn(B, T, N, dtype=torch.float64, device=DEV)
    du, dA, dh0 = fused_gru_backward(u, A, h0, h, g, chunk=chunk, block_n=BLOCK_N)
    rdu, rdA, rdh0 = _gru_ref(u, A, h0, g)
    _close(du, rdu, 1e-10)
    _close(dA, rdA, 1e-10)
    if with_h0:
        _close(dh0, rdh0, 1e-10)
    else:
        assert dh0 is None


@pytest.mark.parametrize("T,chunk,with_s0", [(1, 2, True), (2, 2, False), (7, 4, True),
                                              (7, 4, False),
                                              pytest.param(20, 8, True, marks=pytest.mark.slow)])
def test_lstm_fp64(T, chunk, with_s0):
    A, C = _params(torch.float64, lstm=True)
    u, s0 = _inputs(T, torch.float64, with_s0, lstm=True)
    s, res = fused_lstm_forward(u, A, C, s0, num_iters=8, chunk=chunk, block_n=BLOCK_N)
    assert s.shape == (B, T, 2, N) and s.dtype == torch.float64
    _close(s, _lstm_ref(u, A, C, s0), 1e-10)
    assert res.item() < 1e-10
    g = torch.randn(B, T, 2, N, dtype=torch.float64, device=DEV)
    du, dA, dC, ds0 = fused_lstm_backward(u, A, C, s0, s, g, chunk=chunk, block_n=BLOCK_N)
    rdu, rdA, rdC, rds0 = _lstm_ref(u, A, C, s0, g)
    _close(du, rdu, 1e-10)
    _close(dA, rdA, 1e-10)
    _close(dC, rdC, 1e-10)
    if with_s0:
        _close(ds0, rds0, 1e-10)
    else:
        assert ds0 is None


def test_fp32_three_iterations():
    """The default 3 Newton iterations in fp32 reach fp32 precision (tolerance 1e-5 on states
    of magnitude ~1; fp32 eps is 1.2e-7), for both cells, with default chunk and block sizes."""
    T = 16
    A64, C64 = _params(torch.float64, lstm=True)
    u64, s064 = _inputs(T, torch.float64, True, lstm=True)
    h0_64 = s064[:, 1]
    h, res = fused_gru_forward(u64.float(), A64.float(), h0_64.float())
    assert h.dtype == torch.float32
    _close(h, _gru_ref(u64, A64, h0_64), 1e-5)
    assert res.item() < 1e-5
    s, res = fused_lstm_forward(u64.float(), A64.float(), C64.float(), s064.float())
    assert s.dtype == torch.float32
    _close(s, _lstm_ref(u64, A64, C64, s064), 1e-5)
    assert res.item() < 1e-5


def test_residual_without_iterations():
    A = _params(torch.float64)
    u, h0 = _inputs(7, torch.float64, True)
    h, res = fused_gru_forward(u, A, h0, num_iters=0, chunk=4, block_n=BLOCK_N)
    assert res.item() > 1e-3
    # the reported residual is exactly max |f(h_{t-1}, u_t) - h_t| of the returned h
    hprev = torch.cat((h0[:, None], h[:, :-1]), dim=1)
    _close(res, (GRU.step(hprev, u, (A,)) - h).abs().max(), 1e-14)
    A, C = _params(torch.float64, lstm=True)
    u, s0 = _inputs(7, torch.float64, True, lstm=True)
    _, res = fused_lstm_forward(u, A, C, s0, num_iters=0, chunk=4, block_n=BLOCK_N)
    assert res.item() > 1e-3


def test_bf16_inputs_upcast():
    A = _params(torch.float32)
    u, h0 = _inputs(5, torch.float32, True)
    ub = u.bfloat16()
    h, _ = fused_gru_forward(ub, A, h0)
    assert h.dtype == torch.float32
    _close(h, _gru_ref(ub.double(), A.double(), h0.double()), 1e-5)
    du, dA, dh0 = fused_gru_backward(ub, A, h0, h, torch.ones_like(h))
    assert du.dtype == torch.bfloat16 and dA.dtype == torch.float32 and dh0.dtype == torch.float32


def test_bad_shapes():
    A = _params(torch.float32)
    u, h0 = _inputs(3, torch.float32, True)
    with pytest.raises(ValueError, match=r"u has shape \(2, 3, 2, 20\); expected \[B, T, 3, N\]"):
        fused_gru_forward(u[:, :, :2], A, h0)
    with pytest.raises(ValueError, match=r"A has shape \(2, 20\); expected \(3, 20\)"):
        fused_gru_forward(u, A[:2], h0)
    with pytest.raises(ValueError, match=r"h0 has shape \(2, 5\); expected \(2, 20\)"):
        fused_gru_forward(u, A, h0[:, :5])
    h, _ = fused_gru_forward(u, A, h0)
    with pytest.raises(ValueError, match=r"grad_h has shape \(2, 2, 20\); expected \(2, 3, 20\)"):
        fused_gru_backward(u, A, h0, h, h[:, :2])
    A2, C = _params(torch.float32, lstm=True)
    with pytest.raises(ValueError, match=r"C has shape \(1, 20\); expected \(2, 20\)"):
        fused_lstm_forward(u, A2, C[:1])
    with pytest.raises(ValueError, match=r"s0 has shape \(2, 20\); expected \(2, 2, 20\)"):
        fused_lstm_forward(u, A2, C, h0)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        fused_gru_forward(u, A, h0, chunk=12)


def test_device_mismatch():
    A = _params(torch.float32)
    u, h0 = _inputs(3, torch.float32, True)
    with pytest.raises(ValueError, match="A is on meta; expected .* like u"):
        fused_gru_forward(u, A.to("meta"), h0)


def test_cpu_rejected_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    A = _params(torch.float32).cpu()
    u = torch.randn(1, 2, 3, N)
    with pytest.raises(ValueError, match="CUDA"):
        fused_gru_forward(u, A)


KERNELS = (triton_fused._gru_fwd_kernel, triton_fused._gru_bwd_kernel, triton_fused._lstm_fwd_kernel,
           triton_fused._lstm_bwd_kernel)


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    tl.store(y_ptr + i, _tanh(tl.load(x_ptr + i, mask=m)), mask=m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_relative_accuracy(dtype):
    small = torch.logspace(-8, -2, 97, dtype=torch.float64)
    wide = torch.linspace(-20, 20, 161, dtype=torch.float64)
    x = torch.cat((small, -small, wide, torch.tensor([0.0, 1e-30, 5e-39, 60.0, -1e4, float("inf"),
                                                       -float("inf")]))).to(dtype)
    y = torch.empty_like(x)
    _tanh_kernel[(1,)](x.to(DEV), y.to(DEV), x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    y = y.cpu()
    want = torch.tanh(x.double())  # float64 reference on exactly the values the kernel sees
    eps = torch.finfo(dtype).eps
    rel = ((y.double() - want).abs() / want.abs().clamp_min(1e-300)).nan_to_num(0.0)
    assert rel[:194].max() <= 3 * eps, f"near 0: {rel[:194].max() / eps:.1f} ulp"
    assert rel.max() <= 4 * eps, f"{rel.max() / eps:.1f} ulp"
    assert y[-2:].tolist() == [1.0, -1.0] and torch.isnan(_tanh_nan(dtype))
    # the former formula would fail the first bound: 2 sigmoid(2x) - 1 cancels near 0
    old = (2 * torch.sigmoid(2 * x[:194]) - 1).double()
    assert ((old - want[:194]).abs() / want[:194].abs()).max() > 1e3 * eps


def _tanh_nan(dtype):
    x = torch.tensor([float("nan")], dtype=dtype, device=DEV)
    y = torch.empty_like(x)
    _tanh_kernel[(1,)](x, y, 1, BLOCK=16)
    return y.cpu()[0]


@triton.jit
def _shift_kernel(x_ptr, first_ptr, shifted_ptr, last_ptr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, CHUNK)[:, None]
    n = tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + rows * BLOCK_N + n[None, :])
    first = tl.load(first_ptr + n)[None, :]
    tl.store(shifted_ptr + rows * BLOCK_N + n[None, :], _shift_down(x, first, CHUNK, BLOCK_N))
    tl.store(last_ptr + n[None, :], _last_row(x, CHUNK))


@pytest.mark.parametrize("chunk", [2, 16])
def test_time_shift_in_registers_is_exact(chunk):
    """The forward's h_{t-1} tile: row i is row i - 1, row 0 the carried state; the next chunk's
    carried state is the last row. Bit-exact (a gather and a select-sum move values only)."""
    x = torch.randn(chunk, 16, dtype=torch.float64, device=DEV)
    first = torch.randn(16, dtype=torch.float64, device=DEV)
    shifted, last = torch.empty_like(x), torch.empty_like(first)
    _shift_kernel[(1,)](x, first, shifted, last, CHUNK=chunk, BLOCK_N=16)
    assert torch.equal(shifted, torch.cat((first[None], x[:-1])))
    assert torch.equal(last, x[-1])


def test_interpreter_runs_its_single_config():
    if not triton_fused.INTERPRET:
        pytest.skip("on a GPU the autotuner benchmarks several configurations")
    assert launch_configs() == [INTERPRETER_CONFIG]
    for kernel in KERNELS:
        assert kernel.configs == [INTERPRETER_CONFIG]
    A = _params(torch.float64)
    u, h0 = _inputs(5, torch.float64, True)
    h, _ = fused_gru_forward(u, A, h0)  # no chunk/block_n: through the autotuner
    assert triton_fused._gru_fwd_kernel.best_config is INTERPRETER_CONFIG
    fused_gru_backward(u, A, h0, h, torch.ones_like(h))
    assert triton_fused._gru_bwd_kernel.best_config is INTERPRETER_CONFIG


def _power_of_two(v):
    return v >= 1 and v & (v - 1) == 0


def test_gpu_config_list_is_well_formed():
    configs = launch_configs(interpret=False)
    assert len(configs) >= 6 and len({str(c) for c in configs}) == len(configs)
    for c in configs:
        assert set(c.kwargs) == {"CHUNK", "BLOCK_N"}
        chunk, block_n = c.kwargs["CHUNK"], c.kwargs["BLOCK_N"]
        assert all(_power_of_two(v) and 16 <= v <= 128 for v in (chunk, block_n)), c
        assert c.num_warps in (1, 2, 4, 8) and c.num_stages == 1, c
        assert chunk * block_n == 16 * 32 * c.num_warps, c  # 16 elements of each tile per thread
    for kernel in KERNELS:
        assert {"CHUNK", "BLOCK_N"} <= set(kernel.fn.arg_names)
        assert kernel.keys == ["N", "T_BUCKET", "B_BUCKET"]
        assert set(kernel.keys) <= set(kernel.fn.arg_names)


def test_gpu_configs_are_fitted_to_the_problem():
    configs = launch_configs(interpret=False)
    # T = 5 -> 16 steps, N = 20 -> 32 channels: every tile becomes 16 x 32 with one warp
    fitted = triton_fused._fit_configs(configs, {"T": 5, "N": 20})
    assert [(c.kwargs["CHUNK"], c.kwargs["BLOCK_N"], c.num_warps) for c in fitted] == [(16, 32, 1)]
    fitted = triton_fused._fit_configs(configs, {"T": 40, "N": 1000})  # T -> 64 steps: no change
    assert [str(c) for c in fitted] == [str(c) for c in configs]


_AOT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from newtonlm.kernels import triton_fused as tf, triton_scan as ts

    def build(kernel, pointers, ints, consts, cfg):
        sig = {**{p: "*fp32" for p in pointers}, **{i: "i32" for i in ints},
               **{c: "constexpr" for c in (*consts, *cfg.kwargs)}}
        src = ASTSource(fn=kernel.fn, signature=sig, constexprs={**consts, **cfg.kwargs})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        assert k.asm["cubin"], kernel
        return k

    ints = ("T", "N", "T_BUCKET", "B_BUCKET")
    cfg = tf.launch_configs(interpret=False)[0]
    k = build(tf._gru_fwd_kernel, ("u_ptr", "a_ptr", "h0_ptr", "h_ptr", "res_ptr"), (*ints, "num_iters"),
              {"HAS_H0": True}, cfg)
    assert "__nv_tanhf" in k.asm["llir"], "libdevice tanh not linked"
    build(tf._lstm_fwd_kernel, ("u_ptr", "a_ptr", "cpar_ptr", "s0_ptr", "s_ptr", "res_ptr"),
          (*ints, "num_iters"), {"HAS_S0": True}, cfg)
    build(tf._gru_bwd_kernel, ("u_ptr", "a_ptr", "h0_ptr", "h_ptr", "g_ptr", "du_ptr", "da_ptr",
                               "dh0_ptr"), ints, {"HAS_H0": True}, cfg)
    build(tf._lstm_bwd_kernel, ("u_ptr", "a_ptr", "cpar_ptr", "s0_ptr", "s_ptr", "g_ptr", "du_ptr",
                                "da_ptr", "dc_ptr", "ds0_ptr"), ints, {"HAS_S0": True}, cfg)
    for kernel in (ts._diag_chunk_kernel, ts._block2_chunk_kernel):
        build(kernel, ("J", "R", "INIT", "OUT", "P", "S"), ("T", "N", "L", "C", "T_BUCKET", "B_BUCKET"),
              {"HAS_INIT": True, "SUMMARY": True, "REVERSE": True}, ts.launch_configs(interpret=False)[0])
    print("compiled")
""")


@pytest.mark.skipif(os.environ.get("NEWTONLM_TEST_AOT") != "1",
                    reason="compiles for sm_90 with Triton's ptxas (~30 s cold): NEWTONLM_TEST_AOT=1")
def test_gpu_kernels_compile_for_sm90():
    """The GPU-only branches (libdevice tanh, the gather shift, the autotuned configurations)
    never run under the interpreter: compile every kernel ahead of time for an H100/H200 (sm_90),
    which needs no GPU, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
