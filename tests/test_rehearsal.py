"""The rehearsal of a multi-node job (launch/rehearse.py) at a reduced width: 2 processes with ZeRO-3,
activation checkpointing and bf16 autocast, an elastic resume on 1 process, the export consolidated
from the ZeRO-3 shards, and its perplexity, through the real commands."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _rehearse_module():
    spec = importlib.util.spec_from_file_location("rehearse", ROOT / "launch" / "rehearse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", [
    pytest.param("paragru", marks=pytest.mark.slow),
    *(pytest.param(a, marks=[pytest.mark.slow, pytest.mark.matrix]) for a in ("paralstm", "mamba2", "llama")),
])
def test_rehearsal_at_reduced_width(arch, tmp_path, capsys):
    rehearse = _rehearse_module()
    report = tmp_path / "report.json"
    code = rehearse.main(["--size", "demo", "--archs", arch, "--steps", "2", "--more-steps", "1",
                          "--seq-len", "32", "--global-batch", "2", "--ppl-tokens", "2000",
                          "--out", str(tmp_path / "runs"), "--json", str(report), "--timeout", "600",
                          "--", "model.num_hidden_layers=2"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    (r,) = json.loads(report.read_text())["results"]
    assert "resumed on 1 rank from a 2-rank checkpoint" in r["resume_line"]
    assert len(r["losses_2proc"]) == 2 and len(r["losses_1proc"]) == 1
    assert all(math.isfinite(x) for x in r["losses_2proc"] + r["losses_1proc"])
    # the export scores held-out text as the trained model does: its loss is the log of its perplexity,
    # and a 3-step model is near the uniform distribution over the vocabulary (ln 8000 ~ 9), not NaN
    assert r["export_ppl"] == pytest.approx(math.exp(r["export_loss"]), rel=1e-6)
    assert 5.0 < r["export_loss"] < 10.0
    assert r["checkpoint_bytes"] > 0 and r["export_bytes"] > 0 and r["plan_peak_mb_2proc"] > 0
    assert f"{arch}_demo" in out.out  # the table


def test_rehearsal_refuses_bad_arguments(tmp_path, capsys):
    rehearse = _rehearse_module()
    for args, message in [(["--archs", "gpt"], "--archs gpt: expected some of"),
                          (["--global-batch", "3"], "--global-batch=3: expected an even number"),
                          (["--steps", "0"], "--steps=0: expected >= 1")]:
        with pytest.raises(SystemExit) as exc:
            rehearse.main([*args, "--out", str(tmp_path / "r")])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything is written
