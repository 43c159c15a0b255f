"""The scaling comparison end to end on the smoke scale (tiny models, 2 steps), then re-run without
retraining."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_end_to_end_and_resume(tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "out"
    train = [*_smoke_train(), f"data.tokenizer.cache_dir={tmp_path}"]
    args = ["scale=smoke", "name=t", "archs=[paragru,llama]", f"runs_dir={runs}", f"out_dir={out}",
            "trainer=[" + ",".join(f"'{o}'" for o in train) + "]"]  # quoted: the elements contain '='

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "newtonlm.eval.compare", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [(r["arch"], r["size"]) for r in rows] == [("paragru", "xs"), ("llama", "xs"), ("paragru", "s"),
                                                      ("llama", "s")]
    for r in rows:
        assert r["tokens"] == 2 * 2 * 32 and r["steps"] == 2  # the same budget for every run
        assert math.isfinite(r["eval"]["ppl"]) and math.isfinite(r["eval"]["bits_per_byte"])
        assert r["eval"]["eval_len"] == 32 and r["long"]["eval_len"] == 64
        assert r["long"]["beyond_context"]["tokens"] > 0 and r["val_curve"]
        assert (Path(r["run_dir"]) / "eval.json").is_file()
        saved = json.loads((Path(r["run_dir"]) / "eval.json").read_text())
        assert saved["short"]["ppl"] == r["eval"]["ppl"]
    by = {(r["arch"], r["size"]): r["parameters"]["non_embedding"] for r in rows}
    assert by["paragru", "s"] > by["paragru", "xs"] and by["llama", "s"] > by["llama", "xs"]
    md = (out / "results.md").read_text()
    assert "python -m newtonlm.eval.compare scale=smoke" in md and md.count("\n| paragru |") == 2
    for png in ("val_loss_vs_tokens.png", "ppl_vs_params.png", "ppl_vs_position.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # the same command again: finished runs are evaluated, not retrained
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from newtonlm.eval import compare

    def no_training(*a, **k):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(compare, "train_run", no_training)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with initialize_config_dir(config_dir=str(REPO / "configs" / "eval"), version_base="1.3"):
        cfg = compose("compare", overrides=args)
    again = compare.compare(OmegaConf.to_object(cfg), "again")
    assert [r["eval"]["ppl"] for r in again] == pytest.approx([r["eval"]["ppl"] for r in rows], rel=1e-6)


def _smoke_train() -> list[str]:
    from omegaconf import OmegaConf

    return list(OmegaConf.load(REPO / "configs" / "eval" / "scale" / "smoke.yaml")["trainer"])
