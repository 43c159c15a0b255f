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
    out = newton_forward(cell, u, params, h0, NewtonConfig(max_iters=8), "cpu")
    assert out.converged and out.iterations == 8 and out.extra_iterations == 0
    assert out.residual < 1e-13 and len(out.history) == 9 and out.history[-1] == out.residual
    torch.testing.assert_close(out.h, reference(cell, u, params, h0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_three_iterations_reach_fp32_precision(cell):
    # The notes: residuals 8.7e-1, 2.6e-2, 5.0e-5, 2.4e-7 after 0..3 iterations (GRU, fp32).
    u, params, h0 = cell_inputs(cell, 2, 1000, 32, dtype=torch.float32, a_scale=0.5)
    out = newton_forward(cell, u, params, h0, NewtonConfig(max_iters=3), "cpu")
    residuals = out.history  # after 0..3 iterations
    assert out.converged and out.iterations == 3 and len(residuals) == 4
    assert residuals[3] <= 16 * torch.finfo(torch.float32).eps * out.h.abs().max(), residuals
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
                             newton=NewtonConfig(max_iters=0, max_extra_iters=0), stats=stats)
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
                     newton=NewtonConfig(max_iters=0, max_extra_iters=0, fallback="raise"))


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
    ({"max_extra_iters": 1.5}, "max_extra_iters=1.5; expected an integer >= 0"),
    ({"accept_tol": "small"}, "accept_tol='small'"),
    ({"tol": -1.0}, "tol=-1.0"),
    ({"fallback": "ignore"}, "fallback='ignore'"),
])
def test_bad_newton_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NewtonConfig(**kwargs)


# --- acceptance at the dtype's precision and adaptive iterations ---------------------------------
# Measured on these inputs (B=2, T=256, N=16, fp32): GRU with |A| <= 2 has residuals 1.1, 1.1,
# 3.4e-1, 3.9e-2, 9.1e-4, 3.0e-7 after 0..5 iterations; LSTM with |A|, |C| <= 1.5: 8.7e-1, 3.3e-1,
# 1.3e-1, 9.5e-3, 1.1e-4, 2.4e-7. Both need 5 iterations; 16 eps * max|h| is ~1.9e-6.
FIVE = [(GRU, 2.0), (LSTM, 1.5)]


def test_acceptance_bound_is_the_dtype_precision():
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    cfg = NewtonConfig()
    assert cfg.accept_for(torch.float32, 1.0) == 16 * eps32
    assert cfg.accept_for(torch.float64, 0.5) == 8 * eps64
    assert NewtonConfig(tol=1e-3).accept_for(torch.float32, 1.0) == 1e-3  # the user's tolerance
    assert NewtonConfig(tol=1e-3, accept_tol=1e-9).accept_for(torch.float32, 1.0) == 1e-9


@pytest.mark.parametrize("cell, a_scale", FIVE, ids=lambda v: getattr(v, "name", v))
def test_case_needing_five_iterations_converges_in_parallel_mode(cell, a_scale, monkeypatch):
    _fresh_warning_state(monkeypatch)
    u, params, h0 = cell_inputs(cell, 2, 256, 16, dtype=torch.float32, a_scale=a_scale)
    stats = NewtonStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        h = parallel_rnn(cell, u, params, h0, mode="parallel", stats=stats)
    assert (stats.path, stats.iterations, stats.extra_iterations, stats.fallbacks) == ("newton", 5, 2, 0)
    hist = stats.history
    assert len(hist) == 6 and hist[3] > 1e-4 and hist[5] < 1e-6, hist
    assert all(hist[k] <= 0.5 * hist[k - 1] for k in (4, 5)), hist  # the rule that allowed them
    ref = reference(cell, u.double(), tuple(p.double() for p in params), h0.double())
    torch.testing.assert_close(h.double(), ref, rtol=0, atol=2e-6)
    # the 3-iteration result is off by more than fp32 precision: without extra iterations it is
    # rejected (and recomputed sequentially), not returned
    with pytest.warns(RuntimeWarning, match="falling back"):
        parallel_rnn(cell, u, params, h0, mode="parallel", stats=stats,
                     newton=NewtonConfig(max_extra_iters=0))
    assert stats.path == "fallback" and stats.iterations == 3 and stats.residual > 1e-4


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_divergent_case_still_falls_back_and_raises(cell, monkeypatch):
    # |A| (and |C|) <= 2.5: the residual grows at the first iteration (GRU 1.1 -> 3.0, LSTM 1.0 -> 1.7)
    _fresh_warning_state(monkeypatch)
    u, params, h0 = cell_inputs(cell, 2, 256, 16, dtype=torch.float32, a_scale=2.5)
    stats = NewtonStats()
    with pytest.warns(RuntimeWarning, match="falling back"):
        h = parallel_rnn(cell, u, params, h0, mode="parallel", stats=stats)
    assert stats.path == "fallback" and stats.fallbacks == 1 and stats.iterations == 1
    assert stats.fallback_rate == 1.0 and stats.residual == stats.history[-1] > stats.history[0]
    ref = reference(cell, u.double(), tuple(p.double() for p in params), h0.double())
    torch.testing.assert_close(h.double(), ref, rtol=0, atol=1e-5)
    with pytest.raises(NewtonDivergence, match="did not converge.*history"):
        parallel_rnn(cell, u, params, h0, mode="parallel", newton=NewtonConfig(fallback="raise"))


def test_slow_convergence_gets_no_extra_iterations(monkeypatch):
    # Newton steps cut to 30 %: the residual shrinks by only ~0.7x per iteration, which is not the
    # fast shrinking (<= 0.5x) that earns extra iterations
    _fresh_warning_state(monkeypatch)
    u, params, h0 = cell_inputs(GRU, 1, 40, 4)
    real_scan = newton_mod.linear_scan
    monkeypatch.setattr(newton_mod, "linear_scan", lambda *a, **k: 0.3 * real_scan(*a, **k))
    stats = NewtonStats()
    with pytest.warns(RuntimeWarning, match="falling back"):
        parallel_rnn(GRU, u, params, h0, mode="parallel", stats=stats)
    hist = stats.history
    assert stats.path == "fallback" and stats.iterations == 3 and stats.extra_iterations == 0
    assert 0.5 < hist[3] / hist[2] < 1, hist


def test_extra_iterations_stop_at_the_cap():
    # GRU fp64 |A| <= 2: 1.8e-7 after 5 iterations, 5.1e-15 after 6 (above 16 eps): one more needed
    u, params, h0 = cell_inputs(GRU, 2, 256, 16, a_scale=2.0)
    out = newton_forward(GRU, u, params, h0, NewtonConfig(max_extra_iters=3), "cpu")
    assert not out.converged and out.iterations == 6 and out.extra_iterations == 3
    out = newton_forward(GRU, u, params, h0, NewtonConfig(max_extra_iters=4), "cpu")
    assert out.converged and out.iterations == 7 and out.residual <= out.accept_tol


@pytest.mark.parametrize("mode", ["triton", "fused"])
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_extra_iterations_in_the_triton_paths(mode, cell, monkeypatch):
    # the fused kernel runs max_iters iterations; its result is checked on the host and Newton
    # continues from it with Triton scans (history: None for the kernel's own iterations)
    _fresh_warning_state(monkeypatch)
    # residuals after 0..4 iterations, GRU: 6.3e-1, 2.7e-1, 2.3e-2, 5.2e-4, 2.4e-7; LSTM: 7.1e-1,
    # 1.5e-1, 5.4e-3, 1.3e-5, 1.6e-7 (PyTorch Newton on CPU)
    T = 48 if cell is GRU else 32
    u, params, h0 = cell_inputs(cell, 1, T, 8, dtype=torch.float32, a_scale=1.5)
    stats = NewtonStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = parallel_rnn(cell, u, params, h0, mode=mode, stats=stats)
    assert (stats.path, stats.mode, stats.fallbacks) == ("newton", mode, 0)
    assert (stats.iterations, stats.extra_iterations) == (4, 1)
    if mode == "fused":
        assert stats.history[:3] == [None] * 3 and stats.history[3] > stats.residual
    ref = reference(cell, u.double(), tuple(p.double() for p in params), h0.double())
    torch.testing.assert_close(h.double(), ref, rtol=0, atol=2e-6)


# --- telemetry ------------------------------------------------------------------------------------
def test_sequential_path_records_no_residual():
    u, params, h0 = cell_inputs(LSTM, 2, 30, 8)
    stats = NewtonStats()
    parallel_rnn(LSTM, u, params, h0, mode="sequential", stats=stats)
    d = stats.as_dict()
    assert (d["path"], d["calls"], d["sequential"], d["newton"], d["fallbacks"]) == ("sequential", 1, 1, 0, 0)
    assert d["residual"] is None and d["max_residual"] is None and d["history"] == []
    assert d["iterations"] == 0 and d["mean_iterations"] is None and d["fallback_rate"] == 0.0


def test_history_holds_the_residual_after_every_iteration():
    u, params, h0 = cell_inputs(GRU, 2, 100, 8)
    stats = NewtonStats()
    parallel_rnn(GRU, u, params, h0, mode="parallel", newton=NewtonConfig(max_iters=4), stats=stats)
    # independently: the residual max|f(h_{t-1}, u_t) - h_t| of the k-iteration result
    for k, res in enumerate(stats.history):
        h = newton_forward(GRU, u, params, h0, NewtonConfig(max_iters=k, accept_tol=1.0), "cpu").h
        prev = torch.cat([h0[:, None], h[:, :-1]], 1)
        assert res == (GRU.step(prev, u, params) - h).abs().max().item()
    assert len(stats.history) == 5 and stats.residual == stats.history[-1]


def test_telemetry_summary_tells_the_paths_apart(monkeypatch):
    _fresh_warning_state(monkeypatch)
    u, params, h0 = cell_inputs(GRU, 2, 256, 16, dtype=torch.float32, a_scale=2.5)
    newton_ok, sequential, fell_back = NewtonStats(), NewtonStats(), NewtonStats()
    ok_u, ok_p, ok_h0 = cell_inputs(GRU, 2, 64, 8, dtype=torch.float32)  # 3 iterations suffice
    for _ in range(2):
        parallel_rnn(GRU, ok_u, ok_p, ok_h0, mode="parallel", stats=newton_ok)
        parallel_rnn(GRU, ok_u, ok_p, ok_h0, mode="sequential", stats=sequential)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel_rnn(GRU, u, params, h0, mode="parallel", stats=fell_back)
        parallel_rnn(GRU, ok_u, ok_p, ok_h0, mode="parallel", stats=fell_back)
    out = newton_mod.newton_telemetry([newton_ok, sequential, fell_back])
    assert out["newton/layer0/path"] == "newton" and out["newton/layer0/iterations"] == 3.0
    assert out["newton/layer0/newton"] == 2 and out["newton/layer0/fallbacks"] == 0
    assert len(out["newton/layer0/history"]) == 4 and out["newton/layer0/residual"] < 2e-6
    assert out["newton/layer1/path"] == "sequential" and out["newton/layer1/sequential"] == 2
    assert out["newton/layer1/residual"] is None and out["newton/layer1/iterations"] is None
    assert out["newton/layer1/history"] == [] and out["newton/layer1/fallback_rate"] == 0.0
    assert out["newton/layer2/fallbacks"] == 1 and out["newton/layer2/newton"] == 1
    assert out["newton/layer2/fallback_rate"] == 0.5 and out["newton/layer2/path"] == "newton"
    assert out["newton/calls"] == 6 and out["newton/sequential"] == 2 and out["newton/fallbacks"] == 1
    assert out["newton/fallback_rate"] == 1 / 4  # rejected / Newton runs
    assert out["newton/max_residual"] > 1e-2  # the rejected run's
    assert newton_mod.newton_telemetry([sequential])["newton/max_residual"] is None
