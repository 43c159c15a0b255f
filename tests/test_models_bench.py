"""The throughput benchmark command runs end to end (tiny settings; the figures are in docs)."""

import json
import os

import pytest
import torch

from newtonlm.models import ARCHS, count_parameters
from newtonlm.models.bench import SIZE_10M, bench_preset, main
from newtonlm.models.factory import build_model


@pytest.fixture(autouse=True)
def _restore_threads():
    """``--threads`` sets the process's torch threads; give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_prints_json_rows_with_ratios_to_llama(capsys):
    main(["--json", "--sizes", "demo", "--seq", "16", "--tokens", "32", "--reps", "1", "--threads", "1"])
    out = json.loads(capsys.readouterr().out)
    assert out["machine"]["threads"] == 1 and out["machine"]["cpu_count"] == os.cpu_count()
    rows = out["rows"]
    assert [r["arch"] for r in rows] == list(ARCHS)
    assert all(r["T"] == 16 and r["batch"] == 2 and r["tokens_per_s"] > 0 for r in rows)
    assert next(r for r in rows if r["arch"] == "llama")["ratio_vs_llama"] == 1.0


def test_the_10m_size_is_about_10m_parameters_for_all_four():
    with torch.device("meta"):
        counts = [count_parameters(build_model(bench_preset(a, "10m"), 8192))["total"] for a in SIZE_10M]
    assert all(9.5e6 < c < 11e6 for c in counts), counts
    assert max(counts) <= 1.05 * min(counts), counts
