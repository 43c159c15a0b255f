"""Size presets: exact parameter counts against hand-derived closed forms, the 10% parity of the four
architectures, Hydra overrides, the sizes command and the FLOPs formula."""

import json
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from newtonlm.models import SIZES, build_model, flops_per_token, load_preset, preset_names
from newtonlm.models.presets import REFERENCE_VOCAB
from newtonlm.models.sizes import main as sizes_main
from newtonlm.models.sizes import preset_counts

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def llama_params(p, V):
    d, L, H, f = p["hidden_size"], p["num_hidden_layers"], p["num_attention_heads"], p["intermediate_size"]
    kv, hd = p["num_key_value_heads"], d // H
    # q, o: d x d; k, v: d x kv*hd; SwiGLU 3 d f; two RMSNorms; final norm; tied embedding
    return V * d + L * (2 * d * d + 2 * d * kv * hd + 3 * d * f + 2 * d) + d


def mamba2_params(p, V):
    d, L, S, G = p["hidden_size"], p["num_hidden_layers"], p["state_size"], p["n_groups"]
    D = p["expand"] * d
    H = D // p["head_dim"]
    conv = D + 2 * G * S  # conv channels: x, B, C
    # in_proj (z, x, B, C, dt), depthwise conv + bias, dt_bias/A_log/D, gated norm, out_proj, norm
    per_layer = d * (2 * D + 2 * G * S + H) + conv * p["conv_kernel"] + conv + 3 * H + D + D * d + d
    return V * d + L * per_layer + d


def pararnn_params(p, V):
    d, L, f, H, k = p["hidden_size"], p["num_hidden_layers"], p["intermediate_size"], p["num_heads"], \
        p["conv_kernel"]
    D = p["expand"] * d
    N = p["state_dim"] or D
    cell = 3 * N + 3 * D * N // H + 3 * N  # A [3, N], B [H, D/H, 3, N/H], b [3, N]
    if p["arch"] == "paralstm":
        cell += 2 * N  # peepholes C [2, N]
    # two norms, in_proj to x and z, conv + bias, cell, out norm, out_proj, SwiGLU
    per_layer = 2 * d + d * (D + N) + D * k + D + cell + N + N * d + 3 * d * f
    return V * d + L * per_layer + d


FORMULA = {"llama": llama_params, "mamba2": mamba2_params, "paragru": pararnn_params,
           "paralstm": pararnn_params}


def test_every_preset_matches_its_closed_form_and_builds_on_meta_quickly():
    start = time.perf_counter()
    for name in preset_names():
        arch, size = name.rsplit("_", 1)
        V = REFERENCE_VOCAB[size]
        counts = preset_counts(name, V)
        p = load_preset(name)
        assert counts["total"] == FORMULA[arch](p, V), name
        assert counts["non_embedding"] == counts["total"] - V * p["hidden_size"], name
    assert time.perf_counter() - start < 30  # 24 presets up to 7B, all on the meta device
    assert preset_counts("llama_7b", 32000)["total"] == 6_607_343_616


@pytest.mark.parametrize("size", SIZES)
def test_architectures_of_one_size_are_within_10_percent(size):
    V = REFERENCE_VOCAB[size]
    counts = [preset_counts(f"{arch}_{size}", V) for arch in ("paragru", "paralstm", "llama", "mamba2")]
    for key in ("total", "non_embedding"):
        values = [c[key] for c in counts]
        assert max(values) <= 1.1 * min(values), (size, key, values)
    nominal = {"125m": 125e6, "400m": 400e6, "1b": 1e9, "3b": 3e9, "7b": 7e9}.get(size)
    if nominal:  # "about" the nominal size
        assert all(0.85 * nominal < c["total"] < 1.15 * nominal for c in counts), (size, counts)
    else:
        assert all(1e6 <= c["total"] <= 5e6 for c in counts), counts


def test_presets_compose_with_hydra_and_every_field_is_overridable():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(overrides=["+model=paralstm_demo", "model.num_hidden_layers=2", "model.a_max=0.9",
                                 "model.state_dim=128"])
        model = build_model(cfg.model, 1000)
        assert model.config.num_hidden_layers == 2 and model.config.a_max == 0.9
        assert model.model.layers[0].mixer.cell.state_dim == 128
        with pytest.raises(ConfigCompositionException, match="hiden_size"):
            compose(overrides=["+model=paralstm_demo", "model.hiden_size=64"])


def test_sizes_command_prints_json(capsys):
    sizes_main(["--json", "--vocab", "1000"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["preset"] for r in rows] == preset_names()
    demo = next(r for r in rows if r["preset"] == "paragru_demo")
    assert demo["total"] == pararnn_params(load_preset("paragru_demo"), 1000)
    assert demo["non_embedding"] == demo["total"] - 1000 * 128


def _linear_params(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("arch", ["llama", "mamba2", "paragru", "paralstm"])
def test_flops_per_token_is_six_times_the_matmul_weights_plus_the_rest(arch):
    """6 FLOPs per matmul weight per token (the tied head included), counted from the model's
    modules, plus attention (Llama), conv + SSM (Mamba2) or conv + cell step (ParaRNN)."""
    V, T = 1000, 2048
    preset = load_preset(f"{arch}_demo")
    with torch.device("meta"):
        model = build_model(preset, V)
    weights = _linear_params(model)  # includes the tied LM head
    c = model.config
    if arch == "llama":
        extra = 3 * c.num_hidden_layers * 4 * T * c.hidden_size
    elif arch == "mamba2":
        D, GS = c.expand * c.hidden_size, c.n_groups * c.state_size
        extra = 3 * c.num_hidden_layers * (2 * c.conv_kernel * (D + 2 * GS) + 6 * D * c.state_size)
    else:
        weights += sum(layer.mixer.cell.B.numel() for layer in model.model.layers)
        per_state = 20 if arch == "paragru" else 24
        extra = 3 * c.num_hidden_layers * (2 * c.conv_kernel * c.d_inner + per_state * c.state_dim)
    assert flops_per_token(preset, V, T) == 6 * weights + extra
