"""Synthetic suite: generators against a direct computation of each answer, determinism, the
trainer and evaluator on tiny models, and the command end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from newtonlm.eval.sizes import SizeConfig
from newtonlm.eval.synthetic import TASKS, TaskConfig, TrainSettings, evaluate, train_model
from newtonlm.eval.synthetic.tasks import IGNORE, batch_rng, generate, vocab_size
from newtonlm.eval.synthetic.train import lr_schedule

REPO = Path(__file__).resolve().parents[1]
CFG = TaskConfig(modulus=5, num_keys=12, num_values=6, num_tokens=3, alphabet=5, distractors=4)
TINY = SizeConfig(preset="demo", overrides={
    "all": ["hidden_size=32", "num_hidden_layers=1"],
    "paragru": ["intermediate_size=64", "num_heads=2"], "paralstm": ["intermediate_size=64", "num_heads=2"],
    "llama": ["intermediate_size=64"], "mamba2": ["head_dim=16", "state_size=8", "chunk_size=16"]})


def answers(task, x):
    """The expected targets of one sequence, computed token by token."""
    out = []
    if task in ("parity", "modcount"):
        m, total = (2 if task == "parity" else CFG.modulus), 0
        for tok in x:
            total = (total + tok) % m
            out.append(total)
        return out
    if task == "recall":
        memory, out = {}, []
        n = min(CFG.num_keys, len(x) // 3)
        for i, tok in enumerate(x):
            if i < 2 * n:
                if i % 2:
                    memory[x[i - 1]] = tok
                out.append(IGNORE)
            else:
                out.append(memory[tok])
        return out
    data = [t for t in x[:len(x) - CFG.num_tokens] if t < CFG.alphabet]
    return [IGNORE] * (len(x) - CFG.num_tokens) + data


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [8, 37, 96])
def test_generators_match_a_direct_computation(task, length):
    x, y = generate(task, CFG, 16, length, batch_rng(3, task, 0, 7))
    assert x.shape == y.shape == (16, length) and x.dtype == y.dtype == np.int64
    V = vocab_size(task, CFG)
    assert x.min() >= 0 and x.max() < V and ((y == IGNORE) | ((y >= 0) & (y < V))).all()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert row_y == answers(task, row_x)
    if task == "recall":  # keys of a sequence are distinct, values come from the value alphabet
        n = min(CFG.num_keys, length // 3)
        assert all(len(set(r[0:2 * n:2])) == n for r in x.tolist())
        assert (x[:, 1:2 * n:2] >= CFG.num_keys).all()
    if task == "selective_copy":  # exactly num_tokens data tokens before the markers
        body = x[:, :length - CFG.num_tokens]
        assert ((body < CFG.alphabet).sum(1) == CFG.num_tokens).all()
        assert (x[:, length - CFG.num_tokens:] == CFG.alphabet + CFG.distractors).all()


def test_generators_are_deterministic_per_batch():
    a = generate("recall", CFG, 4, 30, batch_rng(0, "recall", 0, 5))
    b = generate("recall", CFG, 4, 30, batch_rng(0, "recall", 0, 5))
    c = generate("recall", CFG, 4, 30, batch_rng(0, "recall", 0, 6))
    assert all(np.array_equal(u, v) for u, v in zip(a, b)) and not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="length=5"):
        generate("selective_copy", CFG, 2, 5, batch_rng(0, "selective_copy", 0, 0))
    with pytest.raises(ValueError, match="task='sorting'"):
        generate("sorting", CFG, 2, 5, batch_rng(0, "parity", 0, 0))


class _Oracle(torch.nn.Module):
    """Returns logits that put all mass on a fixed answer table (the evaluator's check)."""

    def __init__(self, answers, vocab):
        super().__init__()
        self.answers, self.vocab = answers, vocab

    def forward(self, input_ids, use_cache=False):
        logits = torch.nn.functional.one_hot(self.answers.clamp(min=0), self.vocab).float()
        return type("Out", (), {"logits": logits})


def test_evaluate_counts_accuracy_as_defined():
    x, y = generate("parity", CFG, 10, 12, batch_rng(0, "parity", 1, 12))
    wrong = torch.from_numpy(y).clone()
    wrong[:3, -1] = 1 - wrong[:3, -1]  # 3 sequences wrong at the last position only
    r = evaluate(_Oracle(wrong, 2), "parity", CFG, 12, samples=10, batch_size=10)
    assert r["acc"] == pytest.approx(1 - 3 / 120) and r["seq_acc"] == pytest.approx(0.7)
    assert r["last_acc"] == pytest.approx(0.7)


def _old_schedule(step, warmup, steps):
    """The suite's former hand-written schedule (a LambdaLR factor): warmup (step + 1) / warmup,
    then 0.1 + 0.9 x half a cosine over the remaining steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup, steps", [(50, 1000), (2, 25), (0, 7), (5, 5), (50, 3)])
def test_lr_schedule_is_the_former_cosine_to_a_tenth(warmup, steps):
    """Step by step, the rate the optimizer applies equals the former formula after the warmup; in
    the warmup transformers' ramp is the former one a step later (lr * k / warmup, 0 at step 0)."""
    lr = 3e-3
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = lr_schedule(opt, TrainSettings(steps=steps, warmup_steps=warmup, lr=lr))
    applied = []
    for _ in range(steps):
        applied.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [lr * (k / warmup if k < warmup else _old_schedule(k, warmup, steps)) for k in range(steps)]
    assert applied == pytest.approx(expected, rel=1e-12, abs=0)
    ramp = min(warmup, steps)
    assert [lr * _old_schedule(k - 1, warmup, steps) for k in range(1, ramp)] == pytest.approx(
        applied[1:ramp], rel=1e-12)
    with pytest.raises(ValueError, match="warmup_steps=-1; expected an integer >= 0"):
        lr_schedule(opt, TrainSettings(steps=7, warmup_steps=-1))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["paragru", "paralstm", "llama", "mamba2"])
def test_train_model_runs_and_learns_something(arch):
    settings = TrainSettings(steps=25, batch_size=16, min_len=8, max_len=12, lr=1e-2, warmup_steps=2)
    model, info = train_model("modcount", CFG, arch, TINY, settings, seed=0)
    r = evaluate(model, "modcount", CFG, 24, samples=32)
    assert info["final_loss"] < np.log(CFG.modulus)  # below chance: the first positions are learnable
    assert 0.0 <= r["acc"] <= 1.0 and r["length"] == 24


@pytest.mark.slow
def test_command_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "newtonlm.eval.synthetic", "tasks=[parity,selective_copy]",
           "archs=[paragru,mamba2]", "train.steps=3", "train.batch_size=4", "train.min_len=8",
           "train.max_len=12", "eval_lengths=[8,24]", "eval_samples=8",
           "model.overrides.all=['hidden_size=32','num_hidden_layers=1']",
           f"out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    pairs = [(r["task"], r["arch"]) for r in rows]
    assert pairs == [("parity", "paragru"), ("parity", "mamba2"), ("selective_copy", "paragru"),
                     ("selective_copy", "mamba2")]
    assert all([e["length"] for e in r["eval"]] == [8, 24] for r in rows)
    md = (out / "results.md").read_text()
    assert "24 (beyond)" in md and "newtonlm.eval.synthetic" in md
    assert (out / "accuracy_vs_length.png").stat().st_size > 1000
