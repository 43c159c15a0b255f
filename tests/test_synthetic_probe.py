"""State-tracking probe: the length curriculum, the probe's summary against hand-made runs, its
config checks, a tiny probe end to end, and the attractor analysis of the ParaRNN cells against
independent float64 computations (bisection for fixed points, the contraction bound)."""

import math

import numpy as np
import pytest
import torch

from newtonlm.eval.sizes import SizeConfig
from newtonlm.eval.synthetic import TaskConfig, TrainSettings, train_model
from newtonlm.eval.synthetic import train as train_module
from newtonlm.eval.synthetic.attractors import classify, grid_starts, limit_states, survey
from newtonlm.eval.synthetic.probe import ProbeConfig, Variant, check, markdown, plot, run_probe, summarize
from newtonlm.eval.synthetic.tasks import batch_rng, generate
from newtonlm.eval.synthetic.train import curriculum_max_len
from newtonlm.kernels.cells import GRU

TINY = SizeConfig(preset="demo", overrides={"all": ["hidden_size=32", "num_hidden_layers=1"],
                                            "paragru": ["intermediate_size=32", "num_heads=2"]})


def test_curriculum_max_len_grows_linearly_then_stays():
    s = TrainSettings(steps=20, min_len=2, max_len=12, curriculum_steps=5)
    # min_len + (max_len - min_len) * (step + 1) // curriculum_steps: 2 + 10 * k // 5
    assert [curriculum_max_len(s, k) for k in range(8)] == [4, 6, 8, 10, 12, 12, 12, 12]
    assert curriculum_max_len(TrainSettings(min_len=3, max_len=9), 0) == 9  # no curriculum


def test_training_draws_lengths_inside_the_curriculum(monkeypatch):
    drawn = []

    def recording(task, cfg, batch, length, rng):
        drawn.append(length)
        return generate(task, cfg, batch, length, rng)

    monkeypatch.setattr(train_module, "generate", recording)
    s = TrainSettings(steps=8, batch_size=2, min_len=2, max_len=30, curriculum_steps=4, warmup_steps=1)
    train_model("parity", TaskConfig(), "paragru", TINY, s, seed=0)
    bounds = [2 + 28 * (k + 1) // 4 for k in range(4)] + [30] * 4
    assert all(2 <= n <= b for n, b in zip(drawn, bounds)) and len(drawn) == 8
    # the same draws as batch_rng gives for each step with those bounds
    assert drawn == [int(batch_rng(0, "parity", 0, k).integers(2, b + 1)) for k, b in enumerate(bounds)]
    with pytest.raises(ValueError, match="curriculum_steps=9"):
        train_model("parity", TaskConfig(), "paragru", TINY, TrainSettings(steps=8, curriculum_steps=9))


@pytest.mark.parametrize("modulus", [2, 3, 7])
def test_modcount_labels_are_the_running_sum(modulus):
    x, y = generate("modcount", TaskConfig(modulus=modulus), 8, 50, batch_rng(1, "modcount", 0, 0))
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        total, want = 0, []
        for tok in row_x:
            total = (total + tok) % modulus
            want.append(total)
        assert row_y == want and max(row_x) < modulus


def _row(variant, seed, seqs, loss=0.1):
    return {"task": "parity", "variant": variant, "arch": "paragru", "seed": seed, "parameters": 100,
            "final_loss": loss, "seconds": 1.0, "nonfinite_steps": int(loss != loss),
            "eval": [{"length": L, "acc": 0.5 + s / 2, "seq_acc": s} for L, s in zip((32, 64, 128), seqs)]}


def test_summarize_means_ranges_and_solved_seeds():
    rows = [_row("a", 0, [1.0, 1.0, 1.0], 0.0), _row("a", 1, [1.0, 0.5, 0.995], 0.3),
            _row("a", 2, [0.9, 0.1, 0.2], 0.6), _row("b", 0, [0.25, 0.0, 0.0]),
            _row("b", 1, [0.0, 0.0, 0.0], float("nan"))]
    a, b = summarize(rows)
    assert (a["variant"], a["seeds"], b["seeds"]) == ("a", 3, 2)
    assert (a["nonfinite"], b["nonfinite"]) == (0, 1)
    assert a["final_loss"] == pytest.approx(0.3)
    assert [e["seq_acc"] for e in a["eval"]] == pytest.approx([2.9 / 3, 1.6 / 3, 2.195 / 3])
    assert [(e["seq_min"], e["seq_max"]) for e in a["eval"]] == [(0.9, 1.0), (0.1, 1.0), (0.2, 1.0)]
    assert a["eval"][0]["acc"] == pytest.approx(0.5 + 2.9 / 6)
    assert a["solved"] == 2 and b["solved"] == 0  # 0.995 >= 0.99 at the longest length counts


def test_check_names_the_bad_field():
    good = Variant(name="g", arch="paragru", overrides=["num_hidden_layers=1"])
    with pytest.raises(ValueError, match="arch='rwkv'"):
        check(ProbeConfig(variants=[Variant(name="x", arch="rwkv")]))
    with pytest.raises(ValueError, match="repeat"):
        check(ProbeConfig(variants=[good, good]))
    with pytest.raises(ValueError, match="tasks=\\['sorting'\\]"):
        check(ProbeConfig(tasks=["sorting"], variants=[good]))
    with pytest.raises(ValueError, match="variant 'bad'.*a_max"):
        check(ProbeConfig(variants=[Variant(name="bad", arch="paragru", overrides=["a_max=-1"])]))
    with pytest.raises(ValueError, match="variants is empty"):
        check(ProbeConfig())


def test_tiny_probe_end_to_end(tmp_path):
    cfg = ProbeConfig(tasks=["parity"], seeds=[0, 1], model=TINY, eval_lengths=[4, 16], eval_samples=8,
                      variants=[Variant(name="g", arch="paragru", overrides=["a_max=.inf"])],
                      train=TrainSettings(steps=3, batch_size=2, min_len=2, max_len=8, curriculum_steps=2))
    rows = run_probe(cfg, tmp_path)
    assert [(r["variant"], r["seed"]) for r in rows] == [("g", 0), ("g", 1)]
    assert all(r["nonfinite_steps"] == 0 for r in rows)
    assert all([e["length"] for e in r["eval"]] == [4, 16] for r in rows)
    assert (tmp_path / "results.json").exists()
    md = markdown(rows, cfg, "python -m newtonlm.eval.synthetic.probe", "test machine", 1.0)
    assert "| g | `a_max=.inf` |" in md and "16 (2x)" in md and "/2 |" in md
    plot(rows, 8, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def _gru_params(a_h, a_r=0.0, a_z=0.0):
    return (torch.tensor([[a_z], [a_r], [a_h]], dtype=torch.float64),)


def _tanh_fixed_point(gain):
    """The positive root of h = tanh(gain h) (gain > 1) by bisection."""
    lo, hi = 1e-6, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.tanh(gain * mid) > mid else (lo, mid)
    return lo


def test_gru_with_a_above_one_is_bistable_or_flips():
    u_hold = torch.tensor([[0.0], [30.0], [0.0]], dtype=torch.float64)   # r = 1, z = 1/2, c = tanh(3 h)
    h_star = _tanh_fixed_point(3.0)
    tail = limit_states("gru", _gru_params(3.0), u_hold, grid_starts("gru", 1), 200)
    finals = sorted(set(round(v, 9) for v in tail[-1, :, 0].tolist()))
    assert finals == pytest.approx([-h_star, h_star], abs=1e-8)  # two attractors, starts split by sign
    assert classify(tail)["attractors"].item() == 2
    u_flip = torch.tensor([[30.0], [30.0], [0.0]], dtype=torch.float64)  # z = 1: h' = tanh(-3 h)
    tail = limit_states("gru", _gru_params(-3.0), u_flip, grid_starts("gru", 1)[:4], 200)
    r = classify(tail)
    assert r["period2"].item() and r["attractors"].item() == 1
    assert tail[-1, :, 0].abs().tolist() == pytest.approx([h_star] * 4, abs=1e-8)
    assert (tail[-1, :, 0] * tail[-2, :, 0] < 0).all()  # the sign flips every step


def test_gru_with_a_below_one_contracts_to_one_state():
    """|f(h) - h*| <= (1 - z(h) (1 - a)) |h - h*| (module docstring), h* found by bisection on
    tanh(A_h r(h) h + u_h) - h, for random channels with |A| <= a = 0.9."""
    gen = np.random.default_rng(0)
    a = 0.9
    for _ in range(200):
        A = gen.uniform(-a, a, 3)
        u = gen.uniform(-4, 4, 3)

        def phi(h, A=A, u=u):
            return math.tanh(A[2] * h / (1 + math.exp(-(A[1] * h + u[1]))) + u[2])

        lo, hi = -1.0, 1.0  # phi(h) - h changes sign once on [-1, 1]
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if phi(mid) > mid else (lo, mid)
        h_star = lo
        h = torch.tensor(gen.uniform(-1, 1, 64), dtype=torch.float64)
        params = (torch.tensor(A, dtype=torch.float64)[:, None].expand(3, 64),)
        uu = torch.tensor(u, dtype=torch.float64)[:, None].expand(3, 64)
        out = GRU.step(h, uu, params)
        z = torch.sigmoid(params[0][0] * h + uu[0])
        assert ((out - h_star).abs() <= (1 - z * (1 - a)) * (h - h_star).abs() + 1e-12).all()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_survey_finds_no_second_state_below_one_and_some_above(cell):
    low = survey(cell, 0.9, n=128, steps=600, seed=1)
    assert low["multistable"] == 0.0 and low["period2"] == 0.0 and low["unsettled"] == 0.0
    high = survey(cell, 8.0, n=128, steps=600, seed=1)
    assert high["multistable"] > 0.1
    with pytest.raises(ValueError, match="cell='rnn'"):
        survey("rnn", 0.9)


def test_probe_stops_starting_runs_after_max_minutes():
    cfg = ProbeConfig(tasks=["parity"], seeds=[0], model=TINY, max_minutes=1e-9,
                      variants=[Variant(name="g", arch="paragru")])
    assert run_probe(cfg) == []
    cfg.max_minutes = -1.0
    with pytest.raises(ValueError, match="max_minutes=-1.0"):
        run_probe(cfg)
