"""Saturated gates: pre-activations of +-100 and +-1000 through every CPU path of the built-in cells
(the compiled C kernels, the PyTorch loops and Newton, the Triton kernels under the interpreter),
forward and adjoint, against the float64 PyTorch reference (autograd through the step loop).

The compiled kernel used to return NaN there: it is built with -ffast-math (no infinities), and
its sigmoid 1 / (1 + exp(-x)) overflowed for x < -88.7 (tanh for x < -44.4) in fp32. Also here:
the C kernel's tanh near 0 (the former 2 / (1 + exp(-2x)) - 1 cancelled) and that loading the
library leaves the process's denormal handling alone (gcc < 13 linked crtfastmath.o, which sets
flush-to-zero, into a -ffast-math shared library).
"""

import pytest
import torch

from newtonlm.kernels import cpu_ext
from newtonlm.kernels.cells import GRU, LSTM
from newtonlm.kernels.function import parallel_rnn
from newtonlm.kernels.reference import sequential_apply

needs_c = pytest.mark.skipif(not cpu_ext.available(), reason=f"C kernels: {cpu_ext.status()}")

SATURATING = (100.0, -100.0, 1000.0, -1000.0)
# N = 80: one full block of 64 channels (the vectorized loop, where the NaN appeared) + a tail
B, T, N = 2, 5, 80


def _inputs(dtype, lstm: bool):
    """u [B, T, 3, N]: ordinary drives with every gate row saturated at +-100 / +-1000 in a
    pattern that differs per channel and step (a channel sees mixed saturated and normal gates)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B, T, 3, N, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 2 * len(SATURATING), (B, T, 3, N), generator=g)
    values = torch.tensor(SATURATING, dtype=torch.float64)
    sat = pick < len(SATURATING)  # about half of all gate entries
    u[sat] = values[pick[sat]]
    A = (torch.rand(3, N, generator=g, dtype=torch.float64) - 0.5)
    params = (A, torch.rand(2, N, generator=g, dtype=torch.float64) - 0.5) if lstm else (A,)
    shape = (B, T, 2, N) if lstm else (B, T, N)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return u.to(dtype), tuple(p.to(dtype) for p in params), grad.to(dtype)


def _reference(cell, u, params, grad):
    """float64 states and gradients (du, dparams) by autograd through the step loop."""
    u = u.double().requires_grad_(True)
    ps = tuple(p.double().requires_grad_(True) for p in params)
    ndim = 2 if cell is LSTM else 1
    h0 = torch.zeros(u.shape[0], *((2,) if ndim == 2 else ()), u.shape[-1], dtype=torch.float64)
    h = sequential_apply(cell.step, u, ps, h0, state_ndim=ndim)
    h.backward(grad.double())
    return h.detach(), u.grad, tuple(p.grad for p in ps)


def _run(cell, u, params, grad, mode):
    u = u.clone().requires_grad_(True)
    ps = tuple(p.clone().requires_grad_(True) for p in params)
    h = parallel_rnn(cell, u, ps, None, mode=mode)
    h.backward(grad)
    return h.detach(), u.grad, tuple(p.grad for p in ps)


def _assert_matches(got, want, dtype):
    atol = {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]
    names = ("h", "du") + tuple(f"d params[{i}]" for i in range(len(want[2])))
    for name, x, y in zip(names, (got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        assert torch.isfinite(x).all(), f"{name}: {(~torch.isfinite(x)).sum().item()} non-finite values"
        err = (x.double() - y).abs().max().item()
        assert err <= atol * max(1.0, y.abs().max().item()), f"{name}: max abs error {err:.3g}"


CELLS = [pytest.param(GRU, id="gru"), pytest.param(LSTM, id="lstm")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_c_kernels_saturate_like_the_fp64_reference(cell, dtype, mode):
    """sequential: the compiled loop forward + compiled adjoint; parallel: Newton in PyTorch with
    the compiled scans + compiled adjoint."""
    u, params, grad = _inputs(dtype, cell is LSTM)
    _assert_matches(_run(cell, u, params, grad, mode), _reference(cell, u, params, grad), dtype)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_pytorch_paths_saturate_like_the_fp64_reference(cell, mode, monkeypatch):
    monkeypatch.setattr(cpu_ext, "available", lambda: False)  # the paths without the C library
    u, params, grad = _inputs(torch.float32, cell is LSTM)
    _assert_matches(_run(cell, u, params, grad, mode), _reference(cell, u, params, grad),
                    torch.float32)


@pytest.mark.filterwarnings("error:overflow encountered:RuntimeWarning")  # numpy's, interpreter
@pytest.mark.parametrize("cell", CELLS)
def test_triton_fused_kernels_saturate_like_the_fp64_reference(cell):
    triton_fused = pytest.importorskip("newtonlm.kernels.triton_fused")
    if not triton_fused.INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a GPU")
    dev = "cuda" if torch.cuda.is_available() and not triton_fused.INTERPRET else "cpu"
    u, params, grad = _inputs(torch.float32, cell is LSTM)
    u, grad = u[:, :, :, :20], grad[..., :20]  # interpreter: small tiles (~0.1 ms per element)
    params = tuple(p[:, :20] for p in params)
    want = _reference(cell, u, params, grad)
    ud, pd, gd = u.to(dev), tuple(p.to(dev) for p in params), grad.to(dev)
    if cell is GRU:
        h, _ = triton_fused.fused_gru_forward(ud, pd[0], None, num_iters=T)
        du, dA, _ = triton_fused.fused_gru_backward(ud, pd[0], None, h, gd)
        got = (h.cpu(), du.cpu(), (dA.cpu(),))
    else:
        h, _ = triton_fused.fused_lstm_forward(ud, pd[0], pd[1], None, num_iters=T)
        du, dA, dC, _ = triton_fused.fused_lstm_backward(ud, pd[0], pd[1], None, h, gd)
        got = (h.cpu(), du.cpu(), (dA.cpu(), dC.cpu()))
    _assert_matches(got, want, torch.float32)


def _c_gate(dtype, x: torch.Tensor, which: str) -> torch.Tensor:
    """sigmoid(x) or tanh(x) as the C kernel computes them: one GRU step from h0 = 0 with A = 0 is
    z * c; the other gate is saturated to exactly 1 (z = sigmoid(200), c = tanh(200))."""
    u = torch.zeros(1, 1, 3, x.numel(), dtype=dtype)
    u[0, 0, 0], u[0, 0, 2] = (200.0, x) if which == "tanh" else (x, 200.0)
    return cpu_ext.gru_sequential(u, torch.zeros(3, x.numel(), dtype=dtype))[0, 0]


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_c_tanh_is_accurate_near_zero_and_everywhere(dtype):
    small = torch.logspace(-30, -3, 109, dtype=torch.float64)
    wide = torch.linspace(-20, 20, 161, dtype=torch.float64)
    x = torch.cat((small, -small, wide)).to(dtype)  # 379 values: 5 full vector blocks + a tail
    got = _c_gate(dtype, x, "tanh").double()
    want = torch.tanh(x.double())
    rel = ((got - want).abs() / want.abs()).nan_to_num(0.0)  # 0/0 at x = 0
    eps = torch.finfo(dtype).eps
    assert rel[: 2 * 109].max() <= 4 * eps, f"|x| < 1e-3: {rel[:218].max() / eps:.1f} ulp"
    assert rel.max() <= 4 * eps, f"{rel.max() / eps:.1f} ulp"
    # the former formula fails this bound near 0 (it cancels: 0 for |x| < 3e-8 in fp32)
    old = (2.0 / (1.0 + torch.exp(-2.0 * x[:218])) - 1.0).double()
    assert ((old - want[:218]).abs() / want[:218].abs()).max() > 1e3 * eps


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_c_sigmoid_and_tanh_limits(dtype):
    x = torch.tensor(SATURATING + (-88.8, -44.5, 0.0) * 4, dtype=dtype).repeat(6)  # vector blocks
    sig, tanh = _c_gate(dtype, x, "sigmoid").double(), _c_gate(dtype, x, "tanh").double()
    # sigmoid's exponent is clamped at 80 (fp32) / 700 (fp64): an absolute error below 1/(1+e^L)
    bound = {torch.float32: 2e-35, torch.float64: 1e-304}[dtype]
    assert (sig - torch.sigmoid(x.double())).abs().max() <= max(bound, 2 * torch.finfo(dtype).eps)
    assert torch.equal(tanh, torch.tanh(x.double()).to(dtype).double())  # +-1 (and 0) exactly


@needs_c
def test_loading_the_c_library_keeps_denormals():
    """gcc < 13 links crtfastmath.o (FTZ/DAZ for the whole process) into a -ffast-math .so; the
    library is linked without -ffast-math so torch's own CPU arithmetic is unchanged."""
    assert cpu_ext.available()
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a float32 denormal
    assert (tiny * 1.0).item() > 0.0
    assert (torch.tensor([1e-310], dtype=torch.float64) * 1.0).item() > 0.0
