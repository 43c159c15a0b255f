"""The one-file reference (newtonlm/kernels/minimal.py) against independent references and against
the package's fast paths, in float64: outputs, gradients, the scans.

Independent references: autograd through the plain time loop (``sequential_apply``), finite
differences (``gradcheck``) and the loop scans of ``newtonlm.kernels.reference``. Fast paths:
``parallel_rnn`` in every mode that runs on this machine (Triton ones under the interpreter, so
their sizes stay tiny) and ``linear_scan``'s backends.
"""

import pytest
import torch
from helpers import cell_inputs

from newtonlm.kernels import minimal
from newtonlm.kernels.cells import GRU
from newtonlm.kernels.function import parallel_rnn
from newtonlm.kernels.newton import NewtonConfig
from newtonlm.kernels.reference import scan_diag_ref, sequential_apply
from newtonlm.kernels.scan import linear_scan, triton_usable

TOL = {"rtol": 1e-12, "atol": 1e-12}
ITERS = 10  # enough for float64 convergence on these contracting problems (|A| <= 0.5)


def _ref_grads(u, A, h0, g):
    """Autograd through the time loop of the package's GRU step: (h, du, dA, dh0)."""
    u, A, h0 = (x.detach().requires_grad_(True) for x in (u, A, h0))
    h = sequential_apply(GRU.step, u, (A,), h0)
    du, dA, dh0 = torch.autograd.grad(h, (u, A, h0), g)
    return h.detach(), du, dA, dh0


def _minimal_grads(u, A, h0, g, iters=ITERS):
    u, A, h0 = (x.detach().requires_grad_(True) for x in (u, A, h0))
    h = minimal.para_gru(u, A, h0, iters)
    du, dA, dh0 = torch.autograd.grad(h, (u, A, h0), g)
    return h.detach(), du, dA, dh0


def test_step_and_jacobian_match_the_package_cell():
    u, (A,), h = cell_inputs(GRU, 3, 1, 7)
    u = u[:, 0]
    torch.testing.assert_close(minimal.gru_step(h, u, A), GRU.step(h, u, (A,)), **TOL)
    torch.testing.assert_close(minimal.gru_jacobian(h, u, A), GRU.jacobian(h, u, (A,)), **TOL)
    # and the Jacobian is the true derivative (forward-mode AD of the minimal step itself)
    jvp = torch.func.jvp(lambda x: minimal.gru_step(x, u, A), (h,), (torch.ones_like(h),))[1]
    torch.testing.assert_close(minimal.gru_jacobian(h, u, A), jvp, **TOL)


@pytest.mark.parametrize("T", [1, 2, 5, 16, 37])
def test_scans_match_reference_and_backends(T):
    g = torch.Generator().manual_seed(T)
    J = 0.9 * (2 * torch.rand(2, T, 6, generator=g, dtype=torch.float64) - 1)
    r = torch.randn(2, T, 6, generator=g, dtype=torch.float64)
    x0 = torch.randn(2, 6, generator=g, dtype=torch.float64)
    want = scan_diag_ref(J, r, x0)
    torch.testing.assert_close(minimal.scan_loop(J, r, x0), want, **TOL)
    torch.testing.assert_close(minimal.scan_assoc(J, r, x0), want, **TOL)
    for backend in ("cpu", "doubling") + (("triton",) if triton_usable(r.device) else ()):
        torch.testing.assert_close(linear_scan(J, r, x0, backend=backend),
                                   minimal.scan_assoc(J, r, x0), **TOL)
    # reversed in time, as the adjoint uses it
    rev = minimal.scan_assoc(J.flip(1), r.flip(1), x0).flip(1)
    torch.testing.assert_close(rev, scan_diag_ref(J, r, x0, reverse=True), **TOL)


def test_newton_matches_sequential_loop():
    u, (A,), h0 = cell_inputs(GRU, 2, 50, 8)
    want = sequential_apply(GRU.step, u, (A,), h0)
    torch.testing.assert_close(minimal.sequential(u, A, h0), want, **TOL)
    torch.testing.assert_close(minimal.newton(u, A, h0, ITERS), want, **TOL)
    # 3 iterations are not yet converged in float64 (quadratic convergence from ~1)
    assert (minimal.newton(u, A, h0, 3) - want).abs().max() > 1e-12


def test_newton_is_exact_after_T_minus_1_iterations_even_off_regime():
    # |A| up to 4: far from contracting, yet iteration k makes step k exact
    u, (A,), h0 = cell_inputs(GRU, 2, 9, 5, a_scale=4.0)
    want = minimal.sequential(u, A, h0)
    torch.testing.assert_close(minimal.newton(u, A, h0, 8), want, **TOL)
    err = (minimal.newton(u, A, h0, 7)[:, :8] - want[:, :8]).abs().max()
    assert err < 1e-12


@pytest.mark.parametrize("mode", ["sequential", "parallel", "triton", "fused"])
def test_outputs_and_gradients_match_fast_paths(mode):
    if mode in ("triton", "fused") and not triton_usable(torch.device("cpu")):
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 on CPU")
    B, T, N = (2, 24, 8) if mode in ("triton", "fused") else (2, 60, 16)
    u, (A,), h0 = cell_inputs(GRU, B, T, N)
    g = torch.randn(B, T, N, dtype=torch.float64)
    h, du, dA, dh0 = _minimal_grads(u, A, h0, g)
    ur, Ar, h0r = (x.detach().requires_grad_(True) for x in (u, A, h0))
    hf = parallel_rnn(GRU, ur, (Ar,), h0r, mode=mode, newton=NewtonConfig(max_iters=ITERS))
    fast = (hf.detach(), *torch.autograd.grad(hf, (ur, Ar, h0r), g))
    for name, got, want in zip(("h", "du", "dA", "dh0"), (h, du, dA, dh0), fast):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_gradients_match_autograd_through_the_loop_without_h0():
    u, (A,), _ = cell_inputs(GRU, 2, 40, 6)
    h0 = torch.zeros(2, 6, dtype=torch.float64)
    g = torch.randn(2, 40, 6, dtype=torch.float64)
    for got, want in zip(_minimal_grads(u, A, h0, g), _ref_grads(u, A, h0, g)):
        torch.testing.assert_close(got, want, **TOL)
    h = minimal.para_gru(u, A, iters=ITERS)  # h0=None means zeros
    torch.testing.assert_close(h, minimal.sequential(u, A, h0), **TOL)


def test_gradcheck_finite_differences():
    u, (A,), h0 = cell_inputs(GRU, 1, 5, 3)
    args = tuple(x.requires_grad_(True) for x in (u, A, h0))
    # T - 1 = 4 iterations make the forward exact, so finite differences see the true function
    assert torch.autograd.gradcheck(lambda *a: minimal.para_gru(*a, iters=4), args)


def test_self_contained():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(minimal))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"torch"}, imported
