"""The custom-cell API: write only step(); Jacobians come from torch.func."""

import pytest
import torch
from helpers import cell_inputs, zeros_state

from newtonlm.kernels import Cell, NewtonConfig, NewtonStats, ParaRNN, parallel_rnn
from newtonlm.kernels.reference import sequential_apply


class LeakyTanhCell(Cell):
    """h' = (1 - s) h + s tanh(A h + u_0), s = sigmoid(u_1): neither GRU nor LSTM (diagonal)."""

    structure = "diag"
    num_gates = 2
    name = "leaky-tanh"

    def step(self, h, u, params):
        (A,) = params
        s = torch.sigmoid(u[..., 1, :])
        return (1 - s) * h + s * torch.tanh(A[0] * h + u[..., 0, :])


class RotatingCell(Cell):
    """A damped rotation of a 2-vector per channel through tanh: 2x2-block Jacobian.
    [x, y]' = tanh(rho (cos w x - sin w y) + u_0), tanh(rho (sin w x + cos w y) + u_1)."""

    structure = "block2"
    num_gates = 2
    name = "rotating"
    recurrent_params = {"W": 2}  # rows: rho, omega

    def step(self, s, u, params):
        (W,) = params
        x, y = s[..., 0, :], s[..., 1, :]
        rho, w = W[0], W[1]
        nx = torch.tanh(rho * (torch.cos(w) * x - torch.sin(w) * y) + u[..., 0, :])
        ny = torch.tanh(rho * (torch.sin(w) * x + torch.cos(w) * y) + u[..., 1, :])
        return torch.stack((nx, ny), dim=-2)


def test_diag_jacobian_from_one_jvp_matches_hand_derivative():
    cell = LeakyTanhCell()
    u, (A,), h = cell_inputs(cell, 2, 3, 5)
    h = h.unsqueeze(1).expand(2, 3, 5)
    s = torch.sigmoid(u[..., 1, :])
    c = torch.tanh(A[0] * h + u[..., 0, :])
    torch.testing.assert_close(cell.jacobian(h, u, (A,)), (1 - s) + s * (1 - c * c) * A[0])


def test_block2_jacobian_from_two_jvps_matches_dense_jacobian():
    cell = RotatingCell()
    u, params, s = cell_inputs(cell, 1, 1, 3)
    s, u = s[0], u[0, 0]
    J = cell.jacobian(s, u, params)  # [2, 2, N]
    dense = torch.autograd.functional.jacobian(lambda ss: cell.step(ss, u, params), s)  # [2,N,2,N]
    for n in range(3):
        torch.testing.assert_close(J[:, :, n], dense[:, n, :, n])


@pytest.mark.parametrize("cell", [LeakyTanhCell(), RotatingCell()], ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["sequential", "parallel", "triton"])
def test_custom_cell_forward_and_gradients(cell, mode):
    T = 40 if mode != "triton" else 6
    u, params, h0 = cell_inputs(cell, 2, T, 5, a_scale=0.8)
    ref_args = [u.clone().requires_grad_(), h0.clone().requires_grad_(),
                *(p.clone().requires_grad_() for p in params)]
    ndim = 1 if cell.structure == "diag" else 2
    h_ref = sequential_apply(cell.step, ref_args[0], tuple(ref_args[2:]), ref_args[1], ndim)
    g = torch.randn_like(h_ref)
    grads_ref = torch.autograd.grad((h_ref * g).sum(), ref_args)

    args = [a.detach().clone().requires_grad_() for a in ref_args]
    stats = NewtonStats()
    h = parallel_rnn(cell, args[0], tuple(args[2:]), args[1], mode=mode,
                     newton=NewtonConfig(max_iters=10), stats=stats)
    torch.testing.assert_close(h, h_ref.detach(), rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad((h * g).sum(), args), grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert stats.fallbacks == 0


@pytest.mark.slow
def test_custom_cell_in_a_layer_with_gradcheck():
    layer = ParaRNN(RotatingCell(), input_dim=4, state_dim=6, num_heads=2, mode="parallel",
                    newton=NewtonConfig(max_iters=8)).double()
    assert {n for n, _ in layer.named_parameters()} == {"W", "B", "b"}
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,), eps=1e-6, atol=1e-8)
    assert layer.stats.fallbacks == 0 and layer.stats.calls > 0


def test_zero_state_default_equals_explicit_zeros():
    cell = LeakyTanhCell()
    u, params, _ = cell_inputs(cell, 2, 9, 4)
    torch.testing.assert_close(parallel_rnn(cell, u, params),
                               parallel_rnn(cell, u, params, zeros_state(cell, u)))


def test_cell_without_step_cannot_be_built():
    class Incomplete(Cell):
        structure = "diag"

    with pytest.raises(TypeError):
        Incomplete()
    with pytest.raises(ValueError, match="mode='fused' exists for the built-in GRU/LSTM cells only"):
        u, params, _ = cell_inputs(LeakyTanhCell(), 1, 3, 4)
        parallel_rnn(LeakyTanhCell(), u, params, mode="fused")
