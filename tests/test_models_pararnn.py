"""ParaRNN LMs: the forward against an independent step-by-step implementation written from the
equations, recurrent decoding against the full forward, generate() with its constant-size cache,
padding rules, initialization and Newton telemetry."""

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from newtonlm.models import ParaGRUConfig, ParaRNNConfig, build_model, load_preset, newton_stats

VOCAB = 512
# Decoding and the full forward run different code (one PyTorch step vs the compiled sequential
# loop, both fp32): logits of magnitude ~1 agree to ~1e-5.
DECODE_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch, **over):
    return build_model({**load_preset(f"{arch}_demo"), **over}, VOCAB).eval()


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _drive(cell, x):
    """u [B, T, 3, N] of the cell's block-diagonal input projection, one head at a time."""
    H, Dh, K, Nh = cell.B.shape
    u = torch.empty(*x.shape[:2], K, H * Nh)
    for h in range(H):
        xh = x[..., h * Dh:(h + 1) * Dh]
        for k in range(K):
            u[..., k, h * Nh:(h + 1) * Nh] = xh @ cell.B[h, :, k, :]
    return u + cell.b


def _cell_loop(cell, x):
    """The ParaGRU / ParaLSTM equations (notes section 2), one time step at a time: h [B, T, N]."""
    u = _drive(cell, x)
    a = cell.a_max
    A = cell.A.clamp(-a, a)
    B, T, _, N = u.shape
    h, c, out = torch.zeros(B, N), torch.zeros(B, N), []
    for t in range(T):
        u0, u1, u2 = u[:, t, 0], u[:, t, 1], u[:, t, 2]  # gate rows: GRU (z, r, h), LSTM (f, o, c)
        if cell.cell.name == "gru":
            z = torch.sigmoid(A[0] * h + u0)
            r = torch.sigmoid(A[1] * h + u1)
            cand = torch.tanh(A[2] * (h * r) + u2)
            h = z * cand + (1 - z) * h
        else:
            C = cell.C.clamp(-a, a)
            f = torch.sigmoid(A[0] * h + u0 + C[0] * c)
            cand = torch.tanh(A[2] * h + u2)
            c = f * c + (1 - f) * cand
            o = torch.sigmoid(A[1] * h + u1 + C[1] * c)
            h = o * torch.tanh(c)
        out.append(h)
    return torch.stack(out, 1)


@torch.no_grad()
def _reference_logits(model, ids):
    cfg = model.config
    eps = cfg.rms_norm_eps
    x = model.model.embed_tokens.weight[ids]
    for layer in model.model.layers:
        mix = layer.mixer
        xz = _rms(x, layer.mixer_norm.weight, eps) @ mix.in_proj.weight.T
        xi, z = xz[..., :cfg.d_inner], xz[..., cfg.d_inner:]
        k = cfg.conv_kernel
        xi = F.conv1d(F.pad(xi.transpose(1, 2), (k - 1, 0)), mix.conv.weight[:, None, :], mix.conv.bias,
                      groups=cfg.d_inner).transpose(1, 2)
        h = _cell_loop(mix.cell, F.silu(xi))
        x = x + (_rms(h, mix.out_norm.weight, eps) * F.silu(z)) @ mix.out_proj.weight.T
        m = _rms(x, layer.mlp_norm.weight, eps)
        x = x + (F.silu(m @ layer.mlp.gate_proj.weight.T) * (m @ layer.mlp.up_proj.weight.T)) \
            @ layer.mlp.down_proj.weight.T
    return _rms(x, model.model.norm.weight, eps) @ model.model.embed_tokens.weight.T


@pytest.mark.parametrize("arch", ["paragru", "paralstm"])
def test_forward_matches_step_by_step_equations(arch):
    model = _model(arch)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    ref = _reference_logits(model, ids)
    assert logits.shape == (2, 20, VOCAB)
    assert ref.abs().max() > 0.1  # not a trivially small comparison
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["paragru", "paralstm"])
def test_token_by_token_decoding_equals_full_forward(arch):
    model = _model(arch)
    ids = torch.randint(0, VOCAB, (3, 16))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
        # prefill of 6 tokens, then one token at a time from the cached state
        out = model(ids[:, :6], cache=DynamicCache(config=model.config), use_cache=True)
        mixed = [out.logits]
        for t in range(6, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            mixed.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=DECODE_ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(mixed, 1), full, atol=DECODE_ATOL, rtol=0)


@pytest.mark.parametrize("arch,state_shape", [("paragru", (2, 256)), ("paralstm", (2, 2, 256))])
def test_generate_carries_a_constant_size_recurrent_cache(arch, state_shape):
    model = _model(arch)
    prompt = torch.randint(0, VOCAB, (2, 7))
    seen = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    finally:
        hook.remove()
    assert seen == [7, 1, 1, 1, 1, 1]  # prefill, then one token per step
    cache = out.cache
    assert len(cache.layers) == model.config.num_hidden_layers
    for layer in cache.layers:  # d_inner = 256, conv_kernel - 1 = 3
        assert tuple(layer.conv_states[0].shape) == (2, 256, 3)
        assert tuple(layer.recurrent_states[0].shape) == state_shape
    with torch.no_grad():
        logits = model(out.sequences, use_cache=False).logits
    assert torch.equal(logits[:, 6:-1].argmax(-1), out.sequences[:, 7:])  # greedy = argmax of forward


def test_right_padding_is_exact_and_left_padding_is_refused():
    model = _model("paragru")
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, use_cache=False).logits
        alone = model(ids[1:, :8], use_cache=False).logits
    torch.testing.assert_close(padded[1, :8], alone[0], atol=1e-5, rtol=0)  # batch-shape rounding
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=mask.flip(1))


def test_cell_init_follows_the_config():
    model = _model("paralstm", hidden_size=256, num_heads=4, a_max=0.2)
    cell = model.model.layers[0].mixer.cell
    N, D = cell.state_dim, cell.input_dim
    assert (N, D, cell.a_max) == (512, 512, 0.2)
    std = 2 / (5 * N) ** 0.5  # 0.0395: A, C ~ N(0, std^2), clamped to |a| <= a_max
    for p in (cell.A, cell.C):
        assert p.abs().max() <= 0.2
        assert abs(p.std().item() - std) < 0.1 * std
    bound = 1 / (D / 4) ** 0.5  # kaiming-uniform per head: U(-1/sqrt(D/H), 1/sqrt(D/H))
    assert cell.B.abs().max() <= bound and cell.B.abs().max() > 0.95 * bound
    assert torch.all(cell.b == 0)
    ref = _model("paragru", cell_init="reference").model.layers[0].mixer.cell
    torch.testing.assert_close(ref.b[0], -torch.linspace(0, 1, ref.state_dim))


def test_newton_telemetry_per_layer():
    model = _model("paragru", cell_mode="parallel", newton_max_iters=3)
    ids = torch.randint(0, VOCAB, (2, 64))
    model(ids, use_cache=False)
    stats = newton_stats(model)
    for i in range(4):  # Newton answered every call, in 3 iterations
        assert stats[f"newton/layer{i}/path"] == "newton" and stats[f"newton/layer{i}/newton"] == 1
        assert stats[f"newton/layer{i}/iterations"] == 3.0
        assert stats[f"newton/layer{i}/extra_iterations"] == 0
        assert stats[f"newton/layer{i}/residual"] < 2e-6
        assert len(stats[f"newton/layer{i}/history"]) == 4
        assert stats[f"newton/layer{i}/fallbacks"] == 0 and stats[f"newton/layer{i}/sequential"] == 0
    assert stats["newton/calls"] == 4 and stats["newton/mean_iterations"] == 3.0
    assert 0 < stats["newton/max_residual"] < 2e-6 and stats["newton/fallback_rate"] == 0.0
    newton_stats(model, reset=True)
    assert newton_stats(model)["newton/calls"] == 0
    assert newton_stats(build_model(load_preset("llama_demo"), VOCAB)) == {}
    # the sequential path (CPU "auto") is no Newton run: no iterations, no residual
    model = _model("paragru", cell_mode="sequential")
    model(ids, use_cache=False)
    stats = newton_stats(model)
    assert stats["newton/layer0/path"] == "sequential" and stats["newton/layer0/sequential"] == 1
    assert stats["newton/layer0/residual"] is None and stats["newton/layer0/iterations"] is None
    assert stats["newton/mean_iterations"] is None and stats["newton/max_residual"] is None


@pytest.mark.parametrize("kwargs,match", [
    ({"hidden_size": 100, "num_heads": 16}, r"expand \* hidden_size = 200 is not divisible by num_heads=16"),
    ({"state_dim": 250, "num_heads": 4}, "state_dim = 250 is not divisible"),
    ({"cell": "rnn"}, "cell='rnn'"),
    ({"hidden_size": -128}, "hidden_size=-128; expected a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0"),
    ({"cell_mode": "fast"}, "cell_mode='fast'"),
    ({"cell_init": "xavier"}, "cell_init='xavier'"),
    ({"a_max": -0.5}, "a_max=-0.5"),
    ({"newton_max_iters": -1}, "max_iters=-1"),
    ({"tie_word_embeddings": False}, "tie"),
])
def test_bad_config_raises_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParaRNNConfig(**kwargs)


def test_cell_must_match_the_model_type():
    with pytest.raises(ValueError, match="a ParaGRUConfig has cell='gru'"):
        ParaGRUConfig(cell="lstm")


def test_beam_search_reorders_the_recurrent_cache():
    """The best beam's score is the log-probability the full forward gives its tokens."""
    model = _model("paragru")
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = model.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False, length_penalty=0.0,
                         output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(out.sequences, use_cache=False).logits, -1)
    seq_logp = logp[:, 4:-1].gather(-1, out.sequences[:, 5:, None])[..., 0].sum(-1)
    torch.testing.assert_close(out.sequences_scores, seq_logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["paragru", "paralstm"])
def test_bf16_weights_and_autocast_train(arch):
    """The cell solves in fp32 either way; the loss stays within bf16 rounding of the fp32 loss."""
    model = _model(arch).train()
    ids = torch.randint(0, VOCAB, (2, 16))
    ref = model(ids, labels=ids).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - ref) < 0.02
    model.to(torch.bfloat16)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_activation_checkpointing_gives_the_same_gradients():
    model = _model("paralstm").train()
    ids = torch.randint(0, VOCAB, (2, 16))
    model(ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("preset", [f"{arch}_{size}" for arch in ("paragru", "paralstm")
                                    for size in ("demo", "125m", "400m", "1b", "3b", "7b")])
def test_every_preset_bounds_its_cells_at_the_config_a_max(preset):
    """The bound is explicit (0.5 in every preset, as trained) and reaches every layer; built on the
    meta device (structure only)."""
    with torch.device("meta"):
        model = build_model(load_preset(preset), VOCAB)
    cells = [layer.mixer.cell for layer in model.model.layers]
    assert load_preset(preset)["a_max"] == 0.5 == model.config.a_max
    assert len(cells) == model.config.num_hidden_layers
    assert all(cell.a_max == 0.5 and cell.bounded for cell in cells)


def test_a_max_default_none_and_inf():
    assert ParaGRUConfig().a_max == 0.5
    assert ParaGRUConfig(a_max=None).a_max == float("inf")  # the config class: None is no bound, saved as inf
    model = _model("paragru", a_max=float("inf"), num_hidden_layers=2)
    assert model.config.a_max == float("inf")
    assert all(not layer.mixer.cell.bounded for layer in model.model.layers)
    # a preset / run config saying null is read as its pre-2026-12-02 meaning, 0.5 (see
    # test_a_run_config_with_a_max_null_keeps_its_trained_bound)
    assert _model("paragru", a_max=None, num_hidden_layers=1).config.a_max == 0.5


def test_saved_configs_keep_their_bound(tmp_path, caplog):
    """inf round-trips through config.json; a null a_max with cell_init "lm" comes from newtonlm
    before 2026-12-02, whose layers clamped at 0.5: loaded as 0.5 (the trained behaviour), logged."""
    import json
    import logging

    fields = dict(hidden_size=32, intermediate_size=64, num_heads=2, num_hidden_layers=1)
    ParaGRUConfig(a_max=None, **fields).save_pretrained(tmp_path)
    assert ParaGRUConfig.from_pretrained(tmp_path).a_max == float("inf")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["a_max"] is not None
    for cell_init, want in (("lm", 0.5), ("reference", float("inf"))):
        saved.update(a_max=None, cell_init=cell_init)
        (tmp_path / "config.json").write_text(json.dumps(saved))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="newtonlm.models.configuration_pararnn"):
            assert ParaGRUConfig.from_pretrained(tmp_path).a_max == want
        assert ("a_max=null with cell_init='lm'" in caplog.text) == (cell_init == "lm")


def test_a_run_config_with_a_max_null_keeps_its_trained_bound(caplog):
    """config.yaml files written before 2026-12-02 say a_max: null with cell_init: lm, and their layers
    clamped at 0.5: resuming and exporting such a run must build the same model; unbounded is .inf."""
    import math

    from newtonlm.models import model_config

    preset = {"arch": "paragru", "hidden_size": 16, "num_hidden_layers": 1, "num_heads": 2, "cell_init": "lm"}
    with caplog.at_level("WARNING"):
        assert model_config({**preset, "a_max": None}, 64).a_max == 0.5
    assert "write model.a_max=.inf" in caplog.text
    assert math.isinf(model_config({**preset, "a_max": math.inf}, 64).a_max)
    assert model_config({**preset, "a_max": 0.9}, 64).a_max == 0.9
    # the reference init never had the implicit bound: null stays unbounded there
    assert math.isinf(model_config({**preset, "cell_init": "reference", "a_max": None}, 64).a_max)
