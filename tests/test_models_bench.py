"""The cost benchmark (``python -m newtonlm.models.bench``): the rows' arithmetic, the cache size of
each architecture against a count from its config, the "does not fit" paths, the command end to end
at tiny settings (the figures are in docs/models.md)."""

import json
import os

import pytest
import torch

from newtonlm.models import ARCHS, bench, count_parameters
from newtonlm.models.bench import (
    SIZE_10M,
    add_ratios,
    bench_preset,
    cache_nbytes,
    estimate_fit,
    generation_row,
    main,
    prefill,
    training_row,
)
from newtonlm.models.factory import build_model

# hidden 16: small enough that every architecture prefills and steps in milliseconds
TINY = {
    "paragru": {"hidden_size": 16, "num_heads": 2, "intermediate_size": 32},
    "paralstm": {"hidden_size": 16, "num_heads": 2, "intermediate_size": 32},
    "llama": {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32},
    "mamba2": {"hidden_size": 16, "num_hidden_layers": 2, "head_dim": 8, "state_size": 4},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (tiny models gain nothing from two); the process's own count restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(bench.SIZES, "tiny", ("demo", TINY))
    return "tiny"


def test_bench_prints_json_rows_with_ratios_to_llama(capsys):
    main(["--json", "--sizes", "demo", "--seq", "16", "--tokens", "32", "--reps", "1", "--threads", "1"])
    out = json.loads(capsys.readouterr().out)
    assert out["machine"]["threads"] == 1 and out["machine"]["cpu_count"] == os.cpu_count()
    assert out["kind"] == "training" and out["device"] == "cpu" and out["tokens"] == 32
    rows = out["rows"]
    assert [r["arch"] for r in rows] == list(ARCHS)
    assert all(r["fits"] and r["T"] == 16 and r["batch"] == 2 and r["tokens_per_s"] > 0 for r in rows)
    assert all(r["tokens_per_s"] == pytest.approx(32 / r["step_s"]) for r in rows)
    assert next(r for r in rows if r["arch"] == "llama")["ratio_vs_llama"] == 1.0


def test_the_10m_size_is_about_10m_parameters_for_all_four():
    with torch.device("meta"):
        counts = [count_parameters(build_model(bench_preset(a, "10m"), 8192))["total"] for a in SIZE_10M]
    assert all(9.5e6 < c < 11e6 for c in counts), counts
    assert max(counts) <= 1.05 * min(counts), counts


def test_the_125m_size_is_the_125m_preset():
    assert bench_preset("llama", "125m")["hidden_size"] == 768
    assert bench_preset("mamba2", "125m")["num_hidden_layers"] == 26


def test_training_rows_arithmetic_and_ratios():
    rows = [training_row("demo", 512, 4, "paragru", 10, [0.5, 0.25, 1.0], 3 * 2**20),
            training_row("demo", 512, 4, "llama", 10, [0.4, 0.8, 0.5], 2**19),
            training_row("demo", 512, 4, "mamba2", 10, None, None, "too big")]
    add_ratios(rows)
    gru, llama, mamba = rows
    assert (gru["tokens_per_s"], gru["tokens_per_s_median"], gru["step_s"]) == (2048 / 0.25, 2048 / 0.5, 0.25)
    assert gru["peak_mem_mb"] == 3.0 and llama["peak_mem_mb"] == 0.5
    assert gru["ratio_vs_llama"] == pytest.approx(0.4 / 0.25) and llama["ratio_vs_llama"] == 1.0
    assert not mamba["fits"] and mamba["reason"] == "too big"
    assert mamba["tokens_per_s"] is None and mamba["ratio_vs_llama"] is None
    table = bench.format_table(rows)
    assert "mamba2    0.00M does not fit: too big" in table and "8192    1.60x" in table
    add_ratios(rows[::2])  # no llama row: no ratios
    assert gru["ratio_vs_llama"] is None


def test_generation_rows_arithmetic():
    r = generation_row("demo", 2048, "paragru", 10, 4.0, [0.02, 0.01, 0.04], 3 * 2**19, 2**20, 2**21)
    assert r["prefill_tokens_per_s"] == 512 and r["ms_per_token"] == 10 and r["ms_per_token_median"] == 20
    assert r["tokens_per_s"] == 100 and (r["cache_mb"], r["peak_mem_mb"], r["held_mem_mb"]) == (1.5, 1, 2)
    llama = generation_row("demo", 2048, "llama", 10, 4.0, [0.05], 2**20, 0, 0)
    add_ratios([r, llama])
    assert r["ratio_vs_llama"] == pytest.approx(5.0)


def _expected_cache_bytes(arch: str, preset: dict, L: int) -> int:
    """The cache's bytes for batch 1 and fp32, counted from the config."""
    d, n = preset["hidden_size"], preset["num_hidden_layers"]
    if arch == "llama":  # keys and values [1, kv_heads, L, head_dim] per layer
        head_dim = d // preset["num_attention_heads"]
        return 2 * n * preset["num_key_value_heads"] * head_dim * L * 4
    D = preset["expand"] * d
    if arch == "mamba2":  # conv window [1, D + 2GS, k], SSM state [1, H, head_dim, S]
        S = preset["state_size"]
        return n * ((D + 2 * preset["n_groups"] * S) * preset["conv_kernel"] + D * S) * 4
    N = D  # state_dim null = d_inner; conv window [1, D, k - 1]; state [1, N] (GRU), [1, 2, N] (LSTM)
    return n * (D * (preset["conv_kernel"] - 1) + (2 if arch == "paralstm" else 1) * N) * 4


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_bytes_match_the_config_and_chunked_prefill_matches_the_forward(arch, tiny):
    preset = bench_preset(arch, tiny)
    torch.manual_seed(0)
    model = build_model(preset, 64).eval()
    sizes = {}
    for L in (8, 32):
        ids = torch.randint(0, 64, (1, L))
        cache, nxt = prefill(model, ids, chunk=5)  # chunks of 5: the last one shorter
        sizes[L] = cache_nbytes(cache)
        assert sizes[L] == _expected_cache_bytes(arch, preset, L)
        with torch.no_grad():
            assert nxt.item() == model(input_ids=ids, use_cache=False).logits[0, -1].argmax().item()
    if arch != "llama":
        assert sizes[8] == sizes[32]  # a recurrent state: independent of the context


def test_estimate_from_the_largest_measured_point():
    measured = {"T": 8, "batch": 4, "peak_mem_mb": 1.0, "fits": True}
    assert estimate_fit(None, 1, 10**6, 1) is None  # nothing measured: the step is tried
    assert estimate_fit(measured, 1, 32, 2**20) is None  # same tokens per step: 1 MB fits 1 MB
    reason = estimate_fit(measured, 1, 128, 2 * 2**20)
    assert reason == "estimated 4 MB (T=8 batch 4 measured 1 MB, x4 tokens) > budget 2 MB"
    failed = {"T": 32, "batch": 1, "fits": False}
    assert estimate_fit(failed, 1, 64, 2**30).startswith("T=32 (batch 1) did not fit")
    assert estimate_fit(failed, 1, 16, 2**30) is None  # fewer tokens: tried


def test_running_out_of_memory_is_a_clean_error_within_the_limit():
    cpu = torch.device("cpu")
    value, reason = bench._guarded(cpu, 16 * 2**20, torch.ones, 2**25)  # 128 MB > 16 MB + 64 MB headroom
    assert value is None and reason.startswith("out of memory within the budget of 16 MB (")
    assert bench._guarded(cpu, 16 * 2**20, torch.ones, 2**20)[0].numel() == 2**20  # 4 MB fits
    assert torch.ones(2**25).numel() == 2**25  # the limit is lifted afterwards


def test_points_that_do_not_fit_are_reported_and_the_run_goes_on(tiny, monkeypatch):
    """Memory step: 1 MB per token (8 tokens at T=8 -> 8 MB; 32 MB at T=32 > 16 MB budget); Mamba2
    runs out of memory in its first step: reported, not raised, and not tried at the longer T."""
    def fake_memory(model, ids):
        if "Mamba2" in type(model).__name__:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return ids.numel() * 2**20

    monkeypatch.setattr(bench, "_step_memory", fake_memory)
    rows = bench.run(sizes=(tiny,), seq_lens=(32, 8), tokens=8, reps=1, warmup=0, budget=16 * 2**20)
    by = {(r["T"], r["arch"]): r for r in rows}
    assert [r["T"] for r in rows] == [8] * 4 + [32] * 4  # ascending T
    assert by[8, "paragru"]["fits"] and by[8, "paragru"]["peak_mem_mb"] == 8
    assert by[8, "mamba2"]["reason"] == ("out of memory within the budget of 16 MB "
                                         "(CUDA out of memory. Tried to allocate 1 GiB)")
    for a in ("paragru", "paralstm", "llama"):
        assert by[32, a]["reason"] == "estimated 32 MB (T=8 batch 1 measured 8 MB, x4 tokens) > budget 16 MB"
        assert by[32, a]["ratio_vs_llama"] is None
    assert by[32, "mamba2"]["reason"].startswith("T=8 (batch 1) did not fit")
    assert "does not fit: estimated 32 MB" in bench.format_table(rows)


def test_generation_command_end_to_end(tiny, capsys, tmp_path):
    main(["--json", "--generation", "--sizes", tiny, "--contexts", "32,8", "--new-tokens", "2",
          "--prefill-chunk", "16", "--threads", "1"])
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "generation" and out["new_tokens"] == 2 and out["prefill_chunk"] == 16
    rows = out["rows"]
    assert [(r["context"], r["arch"]) for r in rows] == [(L, a) for L in (8, 32) for a in ARCHS]
    for r in rows:
        expected = _expected_cache_bytes(r["arch"], bench_preset(r["arch"], tiny), r["context"])
        assert r["fits"] and r["cache_mb"] * 2**20 == expected
        assert r["tokens_per_s"] == pytest.approx(1e3 / r["ms_per_token"]) and r["prefill_s"] > 0
    from newtonlm.eval.plots import context_cost

    training = {"kind": "training", "device": "cpu", "rows": [
        training_row("demo", 512, 4, a, 10, [0.5], 2**20) for a in ARCHS] + [
        training_row("demo", 2048, 1, a, 10, None, None, "too big") for a in ARCHS]}
    paths = context_cost([out, training], tmp_path / "figs")
    assert [p.name for p in paths] == ["training_tokens_per_s.png", "training_memory.png",
                                       "generation_ms_per_token.png", "generation_cache.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_bad_arguments_are_named(capsys):
    for argv, message in ((["--contexts", "512,x", "--generation"], "--contexts='512,x'; expected"),
                          (["--sizes", "huge"], "--sizes: 'huge' is not one of"),
                          (["--mem-budget-gb", "0"], "--mem-budget-gb=0.0; expected a positive"),
                          (["--new-tokens", "0"], "--new-tokens=0; expected a positive integer")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
