"""Newton solver: convergence, telemetry, early stop and the divergence fallback."""

import warnings

import pytest
import torch
from helpers import cell_inputs, state_ndim, zeros_state

from newtonlm.kernels import GRU, LSTM, NewtonConfig, NewtonDivergence, NewtonStats, parallel_rnn
from newtonlm.kernels import newton as newton_mod
from newtonlm.kernels.cells import GRUCell
from newtonlm.kernels.newton import newton_forward
from newtonlm.kernels.reference import sequential_apply

CELLS = [GRU, LSTM]


def reference(cell, u, params, h0):
    h0 = zeros_state(cell, u) if h0 is None else h0
    return sequential_apply(cell.step, u, params, h0, state_ndim(cell))


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("with_h0", [False, True])
def test_newton_converges_to_sequential_fp64(cell, with_h0):
    u, params, h0 = cell_inputs(cell, 2, 300, 8, with_h0=with_h0)
    h, iters, res, ok = newton_forward(cell, u, params, h0, NewtonConfig(max_iters=8), "cpu")
    assert ok and iters == 8 and res < 1e-13
    torch.testing.assert_close(h, reference(cell, u, params, h0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_three_iterations_reach_fp32_precision(cell):
    # The notes: residuals 8.7e-1, 2.6e-2, 5.0e-5, 2.4e-7 after 0..3 iterations (GRU, fp32).
    u, params, h0 = cell_inputs(cell, 2, 1000, 32, dtype=torch.float32, a_scale=0.5)
    residuals = []
    for k in range(4):
        _, _, res, _ = newton_forward(cell, u, params, h0, NewtonConfig(max_iters=k), "cpu")
        residuals.append(res)
    assert residuals[3] < 1e-5, residuals
    assert residuals[0] > residuals[1] > residuals[2] > residuals[3], residuals
    ref = reference(cell, u.double(), tuple(p.double() for p in params), h0.double())
    h = parallel_rnn(cell, u, params, h0, mode="parallel")
    torch.testing.assert_close(h.double(), ref, rtol=0, atol=1e-5)


def test_tolerance_stops_early_and_stats_record_it():
    u, params, h0 = cell_inputs(GRU, 2, 200, 8)
    stats = NewtonStats()
    parallel_rnn(GRU, u, params, h0, mode="parallel",
                 newton=NewtonConfig(max_iters=20, tol=1e-6), stats=stats)
    assert 1 <= stats.iterations < 20 and stats.residual <= 1e-6
    assert stats.calls == 1 and stats.fallbacks == 0
    d = stats.as_dict()
    assert d["iterations"] == stats.iterations and d["fallbacks"] == 0


def _fresh_warning_state(monkeypatch):
    monkeypatch.setattr(newton_mod, "_warned", False)


def test_unconverged_result_falls_back_to_sequential_and_warns_once(monkeypatch):
    _fresh_warning_state(monkeypatch)
    u, params, h0 = cell_inputs(GRU, 2, 50, 8)
    stats = NewtonStats()
    with pytest.warns(RuntimeWarning, match="falling back to sequential") as record:
        for _ in range(2):  # zero iterations: the initial guess is not a solution
            h = parallel_rnn(GRU, u, params, h0, mode="parallel",
                             newton=NewtonConfig(max_iters=0), stats=stats)
    assert len([w for w in record if "falling back" in str(w.message)]) == 1
    assert stats.fallbacks == 2 and stats.calls == 2
    torch.testing.assert_close(h, reference(GRU, u, params, h0), rtol=1e-12, atol=1e-12)


class _NaNJacobianGRU(GRUCell):
    """A GRU whose Jacobian is corrupted: Newton produces non-finite iterates."""

    name = "nan-jacobian-gru"

    def jacobian(self, h, u, params):
        return super().jacobian(h, u, params) * float("inf")


def test_non_finite_newton_iterates_are_detected(monkeypatch):
    _fresh_warning_state(monkeypatch)
    cell = _NaNJacobianGRU()
    u, params, h0 = cell_inputs(cell, 1, 20, 4)
    stats = NewtonStats()
    with pytest.warns(RuntimeWarning, match="did not converge"):
        h = parallel_rnn(cell, u, params, h0, mode="parallel", stats=stats)
    assert torch.isfinite(h).all() and stats.fallbacks == 1
    torch.testing.assert_close(h, reference(GRU, u, params, h0), rtol=1e-12, atol=1e-12)


def test_fallback_raise():
    u, params, h0 = cell_inputs(GRU, 1, 20, 4)
    with pytest.raises(NewtonDivergence, match="residual"):
        parallel_rnn(GRU, u, params, h0, mode="parallel",
                     newton=NewtonConfig(max_iters=0, fallback="raise"))


def test_divergence_detected_when_residual_grows(monkeypatch):
    _fresh_warning_state(monkeypatch)
    # Newton steps made 3x too long: the residual grows from one iteration to the next.
    u, params, h0 = cell_inputs(GRU, 1, 40, 4)
    real_scan = newton_mod.linear_scan
    monkeypatch.setattr(newton_mod, "linear_scan", lambda *a, **k: 3.0 * real_scan(*a, **k))
    stats = NewtonStats()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        h = parallel_rnn(GRU, u, params, h0, mode="parallel",
                         newton=NewtonConfig(max_iters=10), stats=stats)
    assert stats.fallbacks == 1 and stats.iterations < 10
    torch.testing.assert_close(h, reference(GRU, u, params, h0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_iters": -1}, "max_iters=-1"),
    ({"tol": -1.0}, "tol=-1.0"),
    ({"fallback": "ignore"}, "fallback='ignore'"),
])
def test_bad_newton_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NewtonConfig(**kwargs)
