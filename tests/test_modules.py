"""ParaGRU / ParaLSTM layers: parameter layout, input drive, step API, init, validation."""

import math

import pytest
import torch

from newtonlm.kernels import ParaGRU, ParaLSTM


def independent_drive(x, B, b, H):
    """u[..., k, n] = sum_d x[..., head(n) * D/H + d] * B[head(n), d, k, n % (N/H)] + b[k, n]."""
    _, Dh, K, Nh = B.shape
    u = torch.zeros(*x.shape[:-1], K, H * Nh, dtype=x.dtype)
    for h in range(H):
        xh = x[..., h * Dh:(h + 1) * Dh]
        for k in range(K):
            u[..., k, h * Nh:(h + 1) * Nh] = xh @ B[h, :, k, :]
    return u + b


@pytest.mark.parametrize("cls, names", [(ParaGRU, ["A", "B", "b"]), (ParaLSTM, ["A", "B", "C", "b"])])
def test_parameter_layout_matches_reference_implementation(cls, names):
    layer = cls(24, 32, num_heads=4)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert list(shapes) == names  # the reference's registration order
    assert shapes["A"] == (3, 32) and shapes["B"] == (4, 6, 3, 8) and shapes["b"] == (3, 32)
    if cls is ParaLSTM:
        assert shapes["C"] == (2, 32)
    # a state_dict in the reference layout loads one-to-one
    other = cls(24, 32, num_heads=4)
    other.load_state_dict({n: torch.randn(s) for n, s in shapes.items()})


def test_input_drive_is_block_diagonal_multihead_projection():
    layer = ParaGRU(12, 16, num_heads=2).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer.input_drive(x), independent_drive(x, layer.B, layer.b, 2))


@pytest.mark.parametrize("cls", [ParaGRU, ParaLSTM])
def test_forward_equals_step_by_step(cls):
    layer = cls(8, 16, 2, init="lm").double()
    x = torch.randn(2, 30, 8, dtype=torch.float64)
    h, final = layer(x, return_state=True)
    state, outs = None, []
    for t in range(30):
        out, state = layer.step(x[:, t], state)
        outs.append(out)
    torch.testing.assert_close(h, torch.stack(outs, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, state, rtol=1e-12, atol=1e-12)
    # continuing from a state equals running the concatenation
    h2 = layer(x[:, 10:], state=layer(x[:, :10], return_state=True)[1])
    torch.testing.assert_close(h2, h[:, 10:], rtol=1e-12, atol=1e-12)


def test_lm_init_bounds_recurrent_weights_in_forward():
    layer = ParaGRU(16, 32, 2, init="lm", a_max=0.5)
    assert layer.a_max == 0.5 and (layer.b == 0).all()
    assert layer.B.abs().max() <= 1 / math.sqrt(8)
    with torch.no_grad():
        layer.A.fill_(3.0)
    (A,) = layer.recurrent_weights()
    assert A.max().item() == 0.5
    ref = ParaGRU(16, 32, 2, init="lm", a_max=0.5)
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        ref.A.fill_(0.5)
    ref.a_max = None
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(layer(x), ref(x))


@pytest.mark.parametrize("kwargs, match", [
    ({"input_dim": 10, "state_dim": 16, "num_heads": 4}, "input_dim=10 is not divisible by num_heads=4"),
    ({"input_dim": 8, "state_dim": 18, "num_heads": 4}, "state_dim=18 is not divisible by num_heads=4"),
    ({"input_dim": 8, "state_dim": -4}, "state_dim=-4; expected a positive integer"),
    ({"input_dim": 8, "state_dim": 8, "mode": "gpu"}, "mode='gpu'"),
    ({"input_dim": 8, "state_dim": 8, "init": "xavier"}, "init='xavier'"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParaGRU(**kwargs)


def test_bad_input_shapes():
    layer = ParaLSTM(8, 16, 2)
    with pytest.raises(ValueError, match=r"x has shape \(2, 5, 7\); expected \[B, T, input_dim\]"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"x has shape \(5, 8\); expected \[B, T, input_dim\]"):
        layer(torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"state has shape \(2, 16\); expected \(2, 2, 16\)"):
        layer(torch.randn(2, 5, 8), state=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="x has dtype torch.int64"):
        layer(torch.zeros(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x has shape \(2, 5, 8\); expected \[B, input_dim\]"):
        layer.step(torch.randn(2, 5, 8))


@pytest.mark.parametrize("init", ["lm", "reference"])
@pytest.mark.parametrize("a_max", [None, math.inf])
def test_a_max_none_or_inf_is_unbounded_for_every_init(init, a_max):
    """None meant 0.5 under init="lm" before 2026-12-02; now the bound is only what is passed."""
    layer = ParaLSTM(8, 16, 2, init=init, a_max=a_max)
    assert layer.a_max is a_max and not layer.bounded
    with torch.no_grad():
        layer.A.fill_(3.0)
        layer.C.fill_(-2.0)
    A, C = layer.recurrent_weights()
    assert A is layer.A and C is layer.C  # the raw parameters: no clamp at all
    sd = layer.state_dict()
    ParaLSTM(8, 16, 2, init=init, a_max=a_max).load_state_dict(sd)  # unbounded -> unbounded
    with pytest.raises(ValueError, match=r"A \(max \|value\| 3 > a_max=0\.5\)"):
        ParaLSTM(8, 16, 2, init=init, a_max=0.5).load_state_dict(sd)


@pytest.mark.parametrize("a_max", [0.0, -1.0, float("nan"), True, "0.5"])
def test_bad_a_max_is_refused(a_max):
    with pytest.raises(ValueError, match="a_max="):
        ParaGRU(8, 16, 2, a_max=a_max)
