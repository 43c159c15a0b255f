"""Fused Triton Newton / adjoint kernels vs. the sequential references (runs under the Triton
interpreter on CPU; conftest.py sets TRITON_INTERPRET=1 before the kernels are imported).

Sizes are tiny because every ``tl.associative_scan`` element costs ~0.1 ms in the interpreter.
"""

import pytest
import torch

from newtonlm.kernels.cells import GRU, LSTM
from newtonlm.kernels.reference import sequential_apply
from newtonlm.kernels.triton_fused import (
    fused_gru_backward,
    fused_gru_forward,
    fused_lstm_backward,
    fused_lstm_forward,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
B, N, BLOCK_N = 2, 20, 16  # N = 20 over blocks of 16: the second block is partial
# (T, chunk): one partial chunk (T = 1, 2), several chunks with a partial last one (7, 40)
CASES = [(1, 16), (2, 16), (7, 4), (40, 16)]


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
                                              (7, 4, False), (20, 8, True)])
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
    with pytest.raises(ValueError, match="u must have shape"):
        fused_gru_forward(u[:, :, :2], A, h0)
    with pytest.raises(ValueError, match=r"A must have shape \[3, 20\]"):
        fused_gru_forward(u, A[:2], h0)
    with pytest.raises(ValueError, match=r"h0 must have shape \[2, 20\]"):
        fused_gru_forward(u, A, h0[:, :5])
    h, _ = fused_gru_forward(u, A, h0)
    with pytest.raises(ValueError, match=r"grad_h must have shape \[2, 3, 20\]"):
        fused_gru_backward(u, A, h0, h, h[:, :2])
    A2, C = _params(torch.float32, lstm=True)
    with pytest.raises(ValueError, match=r"C must have shape \[2, 20\]"):
        fused_lstm_forward(u, A2, C[:1])
    with pytest.raises(ValueError, match=r"s0 must have shape \[2, 2, 20\]"):
        fused_lstm_forward(u, A2, C, h0)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        fused_gru_forward(u, A, h0, chunk=12)


def test_cpu_rejected_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    A = _params(torch.float32).cpu()
    u = torch.randn(1, 2, 3, N)
    with pytest.raises(ValueError, match="CUDA"):
        fused_gru_forward(u, A)
