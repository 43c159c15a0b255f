"""Scaling-law analysis (newtonlm.eval.scaling): the power-law fit against points drawn from a known
law, crossings against a closed form and a direct root-find, and the reader and the whole report on
run directories written by hand in the trainer's format (config.yaml, metrics.jsonl, eval.json)."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.optimize import brentq

from newtonlm.eval import scaling
from newtonlm.eval.scaling import PowerLaw, bootstrap, crossovers, fit_power_law
from newtonlm.eval.sizes import SizeConfig, model_fields
from newtonlm.models import build_model, count_parameters, flops_per_token

TRUE = PowerLaw(E=2.0, A=1.0e5, alpha=0.3)
X = np.geomspace(1e15, 1e19, 8)


def test_fit_recovers_a_known_law():
    exact = fit_power_law(X, TRUE(X))
    assert (exact.E, exact.A, exact.alpha) == pytest.approx((2.0, 1e5, 0.3), rel=1e-6)
    # 3 points: E, A and alpha are determined exactly
    three = fit_power_law(X[[0, 3, 7]], TRUE(X[[0, 3, 7]]))
    assert (three.E, three.A, three.alpha) == pytest.approx((2.0, 1e5, 0.3), rel=1e-5)

    y = TRUE(X) + np.random.default_rng(1).normal(0.0, 0.005, X.size)  # losses 2.2 .. 5.2
    noisy = fit_power_law(X, y)
    assert noisy.E == pytest.approx(2.0, abs=0.03) and noisy.alpha == pytest.approx(0.3, abs=0.01)
    assert math.log(noisy.A) == pytest.approx(math.log(1e5), abs=0.3)
    boot = bootstrap(X, y, 300, seed=0)
    assert len(boot) == 300  # 8 points: every resample has >= 3 distinct x
    for key, truth in (("E", 2.0), ("alpha", 0.3)):
        lo, hi = np.percentile([getattr(b, key) for b in boot], [2.5, 97.5])
        assert lo < truth < hi and hi - lo < 0.1 * truth


def test_fit_rejects_what_it_cannot_fit():
    with pytest.raises(ValueError, match="2 distinct x; a fit of E, A and alpha needs at least 3"):
        fit_power_law([1.0, 1.0, 2.0], [3.0, 3.0, 2.5])
    with pytest.raises(ValueError, match="x > 0"):
        fit_power_law([-1.0, 1.0, 2.0], [3.0, 2.8, 2.5])
    with pytest.raises(ValueError, match="expected 1-d arrays of one length"):
        fit_power_law([1.0, 2.0, 3.0], [3.0, 2.8])


def test_crossovers_against_closed_form_and_root_find():
    # equal exponents: E_f + A_f C^-a = E_g + A_g C^-a  <=>  C = ((A_g - A_f) / (E_f - E_g))^(1/a)
    g = PowerLaw(E=1.8, A=4.0e5, alpha=0.3)
    (root,) = crossovers(TRUE, g, 1e15, 1e25)
    assert root == pytest.approx((3.0e5 / 0.2) ** (1 / 0.3), rel=1e-9)
    # g is worse below the crossing, better above it
    assert g(root / 2) > TRUE(root / 2) and g(root * 2) < TRUE(root * 2)
    # different exponents: against brentq on a bracket found by hand (h - f changes sign there)
    h = PowerLaw(E=1.5, A=1.0e7, alpha=0.4)
    def diff(c):
        return float(h(c) - TRUE(c))
    assert diff(1e16) > 0 > diff(1e22)
    (root,) = crossovers(TRUE, h, 1e14, 1e24)
    assert root == pytest.approx(brentq(diff, 1e16, 1e22, xtol=1e-6, rtol=1e-14), rel=1e-9)
    assert crossovers(TRUE, PowerLaw(2.5, 1e5, 0.3), 1e14, 1e24) == []  # parallel: never cross


# ---- run directories written by hand, in the trainer's format ------------------------------------

VOCAB, T = 512, 32
TINY = {"all": ["hidden_size=32"], "paragru": ["intermediate_size=64", "num_heads=2"],
        "llama": ["intermediate_size=64"], "mamba2": ["head_dim=32", "state_size=16"]}


def fields(arch: str, layers: int) -> dict:
    size = SizeConfig(preset="demo", overrides={**TINY, "all": [*TINY["all"], f"num_hidden_layers={layers}"]})
    return model_fields(size, arch)


def write_run(run_dir, model: dict, steps: int, tokens_per_step: int, val_loss: float | None,
              final: bool, eval_json: dict | None = None, step_time: float = 0.5) -> None:
    """config.yaml and metrics.jsonl as the trainer writes them (log_every=2: a train record every
    second step), validation every 4 steps, and the end-of-run validation if ``final``."""
    run_dir.mkdir(parents=True)
    cfg = {"model": model, "data": {"sources": {"shakespeare": {"kind": "shakespeare"}}},
           "train": {"seq_len": T, "micro_batch_size": 2, "max_tokens": steps * tokens_per_step}}
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    recs = []
    for step in range(2, steps + 1, 2):
        recs.append({"kind": "train", "step": step, "loss": 6.0, "lr": 1e-3, "grad_norm": 1.0,
                     "tokens_seen": step * tokens_per_step, "skipped": False, "skipped_total": 0,
                     "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
                     "data_wait_s": 0.0, "mfu": None})
        if step % 4 == 0 and (step < steps or not final) and val_loss is not None:
            recs.append({"kind": "val", "step": step, "tokens_seen": step * tokens_per_step,
                         "val_loss": val_loss + 0.5, "val_ppl": math.exp(val_loss + 0.5), "val_tokens": 64})
    if final:
        recs.append({"kind": "event", "event": "something", "step": steps})
        recs.append({"kind": "val", "step": steps, "tokens_seen": steps * tokens_per_step, "final": True,
                     "val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_tokens": 64})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tr')
    if eval_json is not None:
        (run_dir / "eval.json").write_text(json.dumps(eval_json))


def meta_count(model: dict) -> dict:
    with torch.device("meta"):
        return count_parameters(build_model(model, VOCAB))


def test_reader_finished_unfinished_and_not_started(tmp_path):
    gru, llama = fields("paragru", 2), fields("llama", 2)
    write_run(tmp_path / "paragru_s", gru, 8, 64, 4.25, final=True,
              eval_json={"short": {"loss": 4.3, "bits_per_byte": 2.1}, "long": {}, "step": 8})
    write_run(tmp_path / "llama_s", llama, 6, 64, 4.5, final=False)
    (tmp_path / "state").mkdir()  # the sweep's own folder: not a run
    plans = {"paragru_s": {"arch": "paragru", "vocab_size": VOCAB, "tokens": 512},
             "llama_s": {"arch": "llama", "vocab_size": VOCAB, "tokens": 1024},
             "mamba2_s": {"arch": "mamba2", "vocab_size": VOCAB, "tokens": 512}}
    (tmp_path / "sweep.json").write_text(json.dumps(
        {"config": {}, "budget_params": "non_embedding", "runs": {k: {"plan": v} for k, v in plans.items()}}))

    runs, budget_params = scaling.read_sweep(tmp_path)
    assert budget_params == "non_embedding"
    by = {r.name: r for r in runs}
    assert sorted(by) == ["llama_s", "mamba2_s", "paragru_s"]

    g = by["paragru_s"]
    assert g.status == "finished" and g.arch == "paragru" and g.step == 8
    assert g.val_loss == 4.25 and g.val_ppl == pytest.approx(math.exp(4.25))
    assert (g.eval_loss, g.bits_per_byte) == (4.3, 2.1)
    assert g.tokens == g.tokens_trained == 512 and g.vocab_size == VOCAB
    assert g.parameters == meta_count(gru)
    assert g.flops == pytest.approx(flops_per_token(gru, VOCAB, T) * 512, rel=1e-12)
    assert g.train_seconds == pytest.approx(8 * 0.5)  # 4 records x 2 steps x 0.5 s

    u = by["llama_s"]  # no final validation: its last one (step 4), marked unfinished
    assert u.status == "unfinished (step 6, 384 of 1,024 tokens)"
    assert u.val_loss == 5.0 and u.tokens == 4 * 64 and u.tokens_trained == 6 * 64
    assert u.flops == pytest.approx(flops_per_token(llama, VOCAB, T) * 256, rel=1e-12)
    assert u.eval_loss is None

    assert by["mamba2_s"].status == "not started" and by["mamba2_s"].val_loss is None

    # a stale eval.json (another step) is not the final checkpoint's evaluation
    (tmp_path / "paragru_s" / "eval.json").write_text(json.dumps(
        {"short": {"loss": 9.0, "bits_per_byte": 9.0}, "long": {}, "step": 4}))
    assert scaling.read_run(tmp_path / "paragru_s", plans["paragru_s"]).eval_loss is None


def test_report_fits_and_crossing_on_a_hand_written_sweep(tmp_path):
    """Two architectures x 4 sizes whose final losses follow known laws of their own FLOPs (as the
    reader computes them): the fitted exponents are the laws', the crossing is the laws' own."""
    laws = {"paragru": PowerLaw(E=2.0, A=6.0e3, alpha=0.4), "llama": PowerLaw(E=2.5, A=5.0e2, alpha=0.3)}
    plans = {}
    for arch, law in laws.items():
        for layers in (1, 2, 4, 8):
            model, tokens = fields(arch, layers), 64 * 16 * layers
            name = f"{arch}_{layers}"
            flops = flops_per_token(model, VOCAB, T) * tokens
            write_run(tmp_path / name, model, 16 * layers, 64, float(law(flops)), final=True)
            plans[name] = {"arch": arch, "vocab_size": VOCAB, "tokens": tokens}
    write_run(tmp_path / "llama_16", fields("llama", 16), 40, 64, 3.0, final=False)  # unfinished
    plans["llama_16"] = {"arch": "llama", "vocab_size": VOCAB, "tokens": 64 * 256}
    (tmp_path / "sweep.json").write_text(json.dumps(
        {"config": {}, "budget_params": "total", "runs": {k: {"plan": v} for k, v in plans.items()}}))

    out = tmp_path / "report"
    scaling.main([str(tmp_path), "--out", str(out), "--bootstrap", "200"])
    result = json.loads((out / "scaling.json").read_text())
    assert result["loss"] == "val"  # no eval.json anywhere
    fits = result["compute"]["fits"]
    for arch, law in laws.items():
        assert fits[arch]["points"] == 4  # the unfinished run is not fitted
        assert fits[arch]["alpha"] == pytest.approx(law.alpha, rel=1e-4)
        assert fits[arch]["E"] == pytest.approx(law.E, rel=1e-4)
        lo, hi = fits[arch]["alpha_ci"]
        assert fits[arch]["resamples"] > 100 and lo - 1e-6 <= law.alpha <= hi + 1e-6  # exact points
    lo, hi = result["compute"]["search"]
    truth = brentq(lambda c: float(laws["paragru"](c) - laws["llama"](c)), lo, hi)
    (cross,) = result["compute"]["crossovers"]
    assert cross["x"] == pytest.approx(truth, rel=1e-3)
    assert cross["below"] == "llama" and cross["above"] == "paragru"  # paragru's loss falls faster
    assert set(result["params"]["fits"]) == {"paragru", "llama"}
    md = (out / "scaling.md").read_text()
    assert "paragru overtakes llama at" in md and "| llama_16 | llama | unfinished (step 40," in md
    for png in ("loss_vs_flops.png", "loss_vs_params.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
