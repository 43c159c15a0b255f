"""Every forward path and the adjoint backward against autograd through sequential application."""

import pytest
import torch
from helpers import cell_inputs, state_ndim, zeros_state

from newtonlm.kernels import GRU, LSTM, NewtonConfig, ParaGRU, parallel_rnn
from newtonlm.kernels.reference import sequential_apply

CELLS = [GRU, LSTM]
F64 = {"rtol": 1e-10, "atol": 1e-10}
# fp32: 3 Newton iterations reach ~1e-7 residual; gradients summed over T steps: ~1e-5 relative.
F32 = {"rtol": 2e-4, "atol": 2e-5}


def reference_grads(cell, u, params, h0, g):
    """Outputs and gradients from autograd through the step loop, in float64."""
    u = u.detach().double().requires_grad_(True)
    params = tuple(p.detach().double().requires_grad_(True) for p in params)
    h0d = (zeros_state(cell, u) if h0 is None else h0.detach().double()).requires_grad_(True)
    h = sequential_apply(cell.step, u, params, h0d, state_ndim(cell))
    grads = torch.autograd.grad((h * g.double()).sum(), (u, h0d, *params))
    return h.detach(), grads


def path_grads(cell, u, params, h0, g, mode, newton=None):
    u = u.detach().requires_grad_(True)
    params = tuple(p.detach().requires_grad_(True) for p in params)
    h0 = None if h0 is None else h0.detach().requires_grad_(True)
    h = parallel_rnn(cell, u, params, h0, mode=mode, newton=newton)
    inputs = (u, *((h0,) if h0 is not None else ()), *params)
    grads = torch.autograd.grad((h * g).sum(), inputs)
    if h0 is None:
        grads = (grads[0], None, *grads[1:])
    return h.detach(), grads


def check(cell, B, T, N, mode, dtype, with_h0, tol, newton=None):
    u, params, h0 = cell_inputs(cell, B, T, N, dtype=dtype, with_h0=with_h0)
    g = torch.randn(B, T, *((N,) if state_ndim(cell) == 1 else (2, N)), dtype=dtype)
    h_ref, g_ref = reference_grads(cell, u, params, h0, g)
    h, grads = path_grads(cell, u, params, h0, g, mode, newton)
    assert h.dtype == dtype
    torch.testing.assert_close(h.double(), h_ref, **tol)
    names = ["du", "dh0"] + list(cell.recurrent_params)
    for name, a, b in zip(names, grads, g_ref):
        if a is None:
            continue
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("T", [1, 2, 7, 128, 1000])
def test_cpu_paths_fp64(cell, mode, T):
    check(cell, 3 if T < 1000 else 1, T, 70 if T < 1000 else 6, mode, torch.float64,
          with_h0=T != 7, tol=F64, newton=NewtonConfig(max_iters=12))


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_cpu_paths_fp32_long(cell, mode):
    check(cell, 2, 4097, 4, mode, torch.float32, with_h0=True, tol=F32)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["triton", "fused"])
@pytest.mark.parametrize("T", [1, 7])
def test_triton_paths_interpreter(cell, mode, T):
    # The Triton interpreter runs programs in Python: tiny sizes only.
    check(cell, 1, T, 5, mode, torch.float64, with_h0=True, tol=F64,
          newton=NewtonConfig(max_iters=10))


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_gradcheck_fp64(cell, mode):
    u, params, h0 = cell_inputs(cell, 2, 5, 3)
    cfg = NewtonConfig(max_iters=12)

    def fn(u, h0, *params):
        return parallel_rnn(cell, u, params, h0, mode=mode, newton=cfg)

    args = (u.requires_grad_(), h0.requires_grad_(), *(p.requires_grad_() for p in params))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


def test_autocast_bf16_solves_in_fp32():
    u, params, h0 = cell_inputs(GRU, 2, 16, 8, dtype=torch.float32)
    u16 = u.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = parallel_rnn(GRU, u16, params, h0)
    assert h.dtype == torch.float32
    # The solve saw the bf16 values exactly, in fp32 arithmetic.
    torch.testing.assert_close(h, parallel_rnn(GRU, u16.detach().float(), params, h0))
    h.sum().backward()
    assert u16.grad.dtype == torch.bfloat16 and torch.isfinite(u16.grad.float()).all()


def test_torch_compile_of_a_model_using_it():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), ParaGRU(8, 16, 2))
    x = torch.randn(2, 12, 8)
    expected = model(x)
    compiled = torch.compile(model, backend="aot_eager")  # graph break at parallel_rnn
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert model[1].A.grad is not None and model[0].weight.grad is not None


@pytest.mark.parametrize("bad, match", [
    (lambda u, p, h0: (u[:, :, :2], p, h0), r"u has shape \(2, 4, 2, 5\); expected \[B, T, 3, N\]"),
    (lambda u, p, h0: (u[:, :0], p, h0), r"expected at least one time step"),
    (lambda u, p, h0: (u, p, h0[:, :3]), r"h0 has shape \(2, 3\); expected \(2, 5\)"),
    (lambda u, p, h0: (u.long(), p, h0), r"u has dtype torch.int64"),
    (lambda u, p, h0: (u, (p[0].to("meta"),), h0), r"params\[0\] is on meta; expected cpu"),
])
def test_bad_inputs(bad, match):
    u, params, h0 = cell_inputs(GRU, 2, 4, 5)
    with pytest.raises(ValueError, match=match):
        parallel_rnn(GRU, *bad(u, params, h0))


def test_bad_mode():
    u, params, h0 = cell_inputs(GRU, 2, 4, 5)
    with pytest.raises(ValueError, match="mode='fast'"):
        parallel_rnn(GRU, u, params, h0, mode="fast")
