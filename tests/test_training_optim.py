"""The optimizer side of the trainer, in process (newtonlm/training/optim.py): AdamW parameter
groups by parameter name for every architecture, SkippingAdamW against torch's AdamW, every
learning-rate schedule against its formula, and the DeepSpeed config as DeepSpeed itself parses it.
"""

import math

import pytest
import torch

import newtonlm.models as nm
from newtonlm.training.config import TrainConfig
from newtonlm.training.optim import (
    SkippingAdamW,
    build_optimizer,
    build_scheduler,
    deepspeed_config,
    param_groups,
)

# Tiny presets of the four architectures: two blocks each, so that per-layer names repeat.
TINY = {
    "paragru": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, intermediate_size=64),
    "paralstm": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, intermediate_size=64),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=64),
    "mamba2": dict(hidden_size=32, num_hidden_layers=2, head_dim=16, state_size=8, chunk_size=16),
}

# The expected split, written out per block: (decayed, not decayed) suffixes of "<prefix>.layers.<i>.".
# Decayed: the matrices of linear layers, the cell's block-diagonal input projection B and the
# depthwise conv filters (weights of >= 2 dimensions). Not decayed: norms, biases, and the cells'
# per-channel vectors (ParaRNN A, C, b; Mamba2 A_log, D, dt_bias).
_RNN_DECAY = ["mixer.in_proj.weight", "mixer.conv.weight", "mixer.cell.B", "mixer.out_proj.weight",
              "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
_RNN_KEEP = ["mixer_norm.weight", "mixer.conv.bias", "mixer.cell.A", "mixer.cell.b",
             "mixer.out_norm.weight", "mlp_norm.weight"]
PER_BLOCK = {
    "paragru": (_RNN_DECAY, _RNN_KEEP),
    "paralstm": (_RNN_DECAY, _RNN_KEEP + ["mixer.cell.C"]),
    "llama": (["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
               "mlp.down_proj.weight"],
              ["input_layernorm.weight", "post_attention_layernorm.weight"]),
    "mamba2": (["mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.out_proj.weight"],
               ["norm.weight", "mixer.norm.weight", "mixer.conv1d.bias", "mixer.A_log", "mixer.D",
                "mixer.dt_bias"]),
}
# Outside the blocks: the embedding (= the tied LM head, listed once) and the final norm.
TOP = {"paragru": ("model", ["model.embed_tokens.weight", "model.norm.weight"]),
       "paralstm": ("model", ["model.embed_tokens.weight", "model.norm.weight"]),
       "llama": ("model", ["model.embed_tokens.weight", "model.norm.weight"]),
       "mamba2": ("backbone", ["backbone.embeddings.weight", "backbone.norm_f.weight"])}


def tiny_model(arch):
    return nm.build_model({"arch": arch, **TINY[arch]}, vocab_size=50)


def group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}


@pytest.mark.parametrize("arch", nm.ARCHS)
def test_weight_decay_is_chosen_by_parameter_name(arch):
    model = tiny_model(arch)
    groups = param_groups(model, weight_decay=0.05)
    prefix, top = TOP[arch]
    decay, keep = PER_BLOCK[arch]
    blocks = range(TINY[arch]["num_hidden_layers"])
    want_decay = sorted(f"{prefix}.layers.{i}.{s}" for i in blocks for s in decay)
    want_keep = sorted([f"{prefix}.layers.{i}.{s}" for i in blocks for s in keep] + top)
    assert group_names(model, groups) == {"decay": want_decay, "no_decay": want_keep}
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.05), ("no_decay", 0.0)]
    # every trainable parameter exactly once (the tied LM head is the embedding, not a second entry)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())


def test_frozen_parameters_are_left_out():
    model = tiny_model("paragru")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    model.model.norm.weight.requires_grad_(False)
    got = group_names(model, param_groups(model, 0.1))
    assert "model.layers.0.mlp.up_proj.weight" not in got["decay"]
    assert "model.norm.weight" not in got["no_decay"]
    assert len(got["decay"]) + len(got["no_decay"]) == sum(p.requires_grad for p in model.parameters())


def test_build_optimizer_by_zero_stage():
    model = tiny_model("llama")
    cfg = TrainConfig(lr=2e-3, betas=(0.8, 0.9), eps=1e-7, weight_decay=0.2, grad_clip=0.5)
    stage0 = build_optimizer(model, cfg)
    assert type(stage0) is SkippingAdamW and stage0.max_norm == 0.5
    cfg.zero_stage = 1  # DeepSpeed's ZeRO wrapper clips and skips: a plain AdamW inside
    zero = build_optimizer(model, cfg)
    assert type(zero) is torch.optim.AdamW
    for opt in (stage0, zero):
        assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == [
            (2e-3, (0.8, 0.9), 1e-7, 0.2), (2e-3, (0.8, 0.9), 1e-7, 0.0)]


def _two_params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((4, 3), (5,))]


@pytest.mark.parametrize("max_norm", [0.0, 0.3, 100.0])
def test_skipping_adamw_clips_like_clip_grad_norm_then_steps_like_adamw(max_norm):
    ours, ref = _two_params(1), _two_params(1)
    kw = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt, ref_opt = SkippingAdamW(ours, max_norm=max_norm, **kw), torch.optim.AdamW(ref, **kw)
    for step in range(3):
        grads = [(3 - step) * torch.randn_like(p) for p in ours]
        norm = math.sqrt(sum(float((gr.double() ** 2).sum()) for gr in grads))
        scale = max_norm / (norm + 1e-6) if 0 < max_norm < norm else 1.0  # clip to max_norm
        for p, r, gr in zip(ours, ref, grads):
            p.grad, r.grad = gr.clone(), gr * scale
        opt.step()
        ref_opt.step()
        assert opt.overflow is False
        assert opt.last_grad_norm == pytest.approx(norm, rel=1e-6)  # reported before clipping (fp32)
        for p, r in zip(ours, ref):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_skipping_adamw_refuses_a_non_finite_gradient(bad):
    params = _two_params(2)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[3] = bad
    opt = SkippingAdamW(params, max_norm=1.0, lr=0.1)
    assert opt.step() is None
    assert opt.overflow is True and not math.isfinite(opt.last_grad_norm)
    assert opt.state == {}  # no moments were created
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    params[1].grad[3] = 1.0  # the next finite step goes through
    opt.step()
    assert opt.overflow is False and opt.last_grad_norm == pytest.approx(math.sqrt(17))


def _warmup(cfg, total):
    return min(cfg.warmup_steps, total) if cfg.warmup_steps >= 0 else int(cfg.warmup_frac * total)


def expected_lr(cfg, total, k):
    """The learning rate of optimizer step k (0-based) by the schedules' definitions."""
    lr, r, w = cfg.lr, cfg.min_lr_ratio, _warmup(cfg, total)
    if cfg.schedule == "constant":
        return lr * k / w if k < w else lr
    if cfg.schedule == "cosine":
        if k < w:
            return lr * k / w
        progress = (k - w) / max(1, total - w)
        return lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))
    # wsd: warmup from r * lr (transformers' WSD; cosine and constant start at 0), stable at lr,
    # then a cosine decay over the last max(1, int(decay_frac * total)) steps to r * lr
    decay = max(1, int(cfg.decay_frac * total))
    stable = total - w - decay
    if k < w:
        return lr * (r + (1 - r) * k / w)
    if k < w + stable:
        return lr
    if k < total:
        return lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (k - w - stable) / decay)))
    return lr * r


def scheduled_lrs(cfg, total):
    """lr of steps 0..total as the trainer sees them: the scheduler steps once per optimizer step."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total + 1):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[0] == lrs[1]  # both groups follow the schedule
        out.append(lrs[0])
        opt.step()
        sched.step()
    return out


SCHEDULE_CASES = [
    dict(schedule="cosine", warmup_frac=0.1),                    # 10 warmup steps of 100
    dict(schedule="cosine", warmup_steps=0),
    dict(schedule="cosine", warmup_steps=7, warmup_frac=0.5),    # warmup_steps >= 0 wins
    dict(schedule="cosine", warmup_steps=500),                   # capped at the run's length
    dict(schedule="cosine", warmup_frac=0.0, min_lr_ratio=0.0),
    dict(schedule="wsd", warmup_frac=0.1, decay_frac=0.2),
    dict(schedule="wsd", warmup_steps=5, decay_frac=0.001),      # decay of at least one step
    dict(schedule="wsd", warmup_steps=0, decay_frac=1.0, min_lr_ratio=0.3),
    dict(schedule="constant", warmup_frac=0.25),
    dict(schedule="constant", warmup_steps=0),
]


@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_schedule_matches_its_formula_at_every_step(case):
    cfg = TrainConfig(lr=3e-3, **{"min_lr_ratio": 0.1, **case})
    total = 100
    got = scheduled_lrs(cfg, total)
    want = [expected_lr(cfg, total, k) for k in range(total + 1)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_cosine_schedule_landmarks():
    """A few values worked out by hand: lr 1e-3, 100 steps, 10 of warmup, down to 0.1 * lr."""
    lrs = scheduled_lrs(TrainConfig(lr=1e-3, schedule="cosine", warmup_frac=0.1, min_lr_ratio=0.1), 100)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(5e-4)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way down the cosine
    assert lrs[100] == pytest.approx(1e-4)


def test_wsd_schedule_landmarks():
    """lr 1e-3, 100 steps: 10 warmup (from 1e-4), 70 stable, 20 decay to 1e-4."""
    lrs = scheduled_lrs(TrainConfig(lr=1e-3, schedule="wsd", warmup_frac=0.1, decay_frac=0.2,
                                    min_lr_ratio=0.1), 100)
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[10:80] == pytest.approx([1e-3] * 70)
    assert lrs[90] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lrs[99] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 19 / 20))))
    assert lrs[100] == pytest.approx(1e-4)


DS_CASES = [
    dict(zero_stage=0, grad_clip=1.0),
    dict(zero_stage=0, grad_clip=0.0, precision="bf16"),
    dict(zero_stage=1, grad_clip=0.5, micro_batch_size=3, grad_accum=4),
    dict(zero_stage=2, grad_clip=1.0, offload_optimizer=True, precision="bf16"),
    dict(zero_stage=3, grad_clip=2.0, micro_batch_size=1, grad_accum=2),
]


@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("case", DS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_deepspeed_config_as_deepspeed_parses_it(case, world, monkeypatch):
    from deepspeed import comm
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = TrainConfig(**case)
    ds = deepspeed_config(cfg, world)
    mbs, accum = cfg.micro_batch_size, cfg.grad_accum
    expected = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": accum,
        "train_batch_size": mbs * accum * world,
        # stage 0: SkippingAdamW clips (reporting the norm before clipping); ZeRO: DeepSpeed clips
        "gradient_clipping": cfg.grad_clip if cfg.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.zero_stage,
                              **({"offload_optimizer": {"device": "cpu"}} if cfg.offload_optimizer else {})},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}} if cfg.precision == "bf16" else {}),
    }
    assert ds == expected

    # DeepSpeed's own parser (and its batch-size consistency check) with this world size
    monkeypatch.setattr(comm, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(comm, "get_world_size", lambda *a, **k: world)
    parsed = DeepSpeedConfig(ds)
    assert parsed.world_size == world
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu,
            parsed.gradient_accumulation_steps) == (mbs * accum * world, mbs, accum)
    assert parsed.zero_optimization_stage == cfg.zero_stage
    assert parsed.gradient_clipping == expected["gradient_clipping"]
    offload = parsed.zero_config.offload_optimizer
    assert (offload is not None and offload.device == "cpu") == cfg.offload_optimizer
    assert parsed.torch_autocast_enabled == (cfg.precision == "bf16")
    if cfg.precision == "bf16":
        assert parsed.torch_autocast_dtype == torch.bfloat16
    assert not parsed.bfloat16_config.enabled and not parsed.float16_config.enabled  # fp32 weights


def test_deepspeed_config_ignores_the_settings_deepspeed_does_not_see():
    """Schedule, lr, checkpointing, logging: the trainer's business, not DeepSpeed's."""
    base = deepspeed_config(TrainConfig(), 2)
    other = TrainConfig(lr=1.0, schedule="wsd", warmup_steps=3, weight_decay=0.0, save_every=7,
                        keep_last=9, eval_every=5, log_every=4, seed=3, max_steps=11, seq_len=64,
                        activation_checkpointing=True, compile=True, progress=False)
    assert deepspeed_config(other, 2) == base
