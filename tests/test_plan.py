"""The memory planner (newtonlm.training.plan): model states against DeepSpeed's own estimators, the
activation formulas against the tensors autograd really keeps (counted with saved-tensor hooks),
the largest micro-batch at its boundary, --json, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from newtonlm.models import build_model, load_preset, model_config
from newtonlm.training import plan, plan_memory


def saved_tensor_bytes(preset: dict, vocab: int, B: int, T: int, bf16: bool, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd keeps after a forward and the loss (parameters
    excluded): the independent count the activation formulas must equal."""
    torch.manual_seed(0)
    model = build_model(preset, vocab)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, vocab, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits
        F.cross_entropy(logits.float().reshape(-1, vocab), ids.reshape(-1), reduction="sum")
    return sum(kept.values())


# small shapes with every size different, so that a term on the wrong dimension shows
SHAPES = {
    "paragru": [dict(hidden_size=48, expand=2, num_heads=3, intermediate_size=80, num_hidden_layers=2,
                     state_dim=48),
                dict(hidden_size=32, expand=3, num_heads=4, intermediate_size=56, num_hidden_layers=1)],
    "paralstm": [dict(hidden_size=32, expand=3, num_heads=2, intermediate_size=64, num_hidden_layers=3),
                 dict(hidden_size=48, expand=2, num_heads=3, intermediate_size=40, num_hidden_layers=1,
                      state_dim=72)],
    "llama": [dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, intermediate_size=80,
                   num_hidden_layers=2),
              dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                   num_hidden_layers=1)],
    "mamba2": [dict(hidden_size=32, expand=2, head_dim=8, state_size=4, n_groups=2, chunk_size=8,
                    num_hidden_layers=2),
               dict(hidden_size=48, expand=1, head_dim=16, state_size=6, n_groups=1, chunk_size=4,
                    num_hidden_layers=1)],
}
BATCH_TIME = [(3, 16), (2, 24)]


# the trainer enables checkpointing with gradient_checkpointing_enable (deprecated in transformers 5)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", list(SHAPES))
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "ckpt"])
def test_activation_formula_equals_saved_tensors(arch, bf16, checkpointing):
    for shape, (B, T) in zip(SHAPES[arch], BATCH_TIME):
        preset = {**load_preset(f"{arch}_demo"), **shape}
        vocab = 320
        counted = saved_tensor_bytes(preset, vocab, B, T, bf16, checkpointing)
        predicted = plan_memory.saved_total(model_config(preset, vocab), B, T, bf16, checkpointing)
        assert predicted == counted, (arch, shape, B, T)


def test_cell_keeps_only_its_input_and_states():
    """What the formulas assume of the ParaRNN layer (newtonlm/kernels/function.py): its autograd
    function keeps the input drive u [B, T, K, N] and the solved states h, nothing of the solve."""
    from newtonlm.kernels import GRU, LSTM, parallel_rnn

    for cell, states in ((GRU, (2, 40, 24)), (LSTM, (2, 40, 2, 24))):
        u = torch.randn(2, 40, 3, 24, requires_grad=True)
        params = [torch.nn.Parameter(0.3 * torch.randn(rows, 24)) for rows in cell.recurrent_params.values()]
        leaves = {p.untyped_storage().data_ptr() for p in params}
        kept: dict[int, int] = {}

        def pack(t, leaves=leaves, kept=kept):
            if t.untyped_storage().data_ptr() not in leaves:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = parallel_rnn(cell, u, tuple(params), mode="parallel")
        assert tuple(h.shape) == states
        assert sum(kept.values()) == u.nbytes + h.nbytes


@pytest.fixture(scope="module")
def counts_125m():
    return plan.parameter_counts(load_preset("paragru_125m"), 32000)


@pytest.mark.parametrize("world", [1, 8, 16])
@pytest.mark.parametrize("offload", [False, True])
def test_model_states_equal_deepspeed_estimators(counts_125m, world, offload):
    """With DeepSpeed's 2-byte weights the per-GPU model states are DeepSpeed's own estimates."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest, _ = counts_125m
    _, gpu2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world, cpu_offload=offload)
    _, gpu3, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=world,
                                                       cpu_offload=offload, cpu_offload_params=False,
                                                       zero_init=False)
    ours2 = plan_memory.model_states(2, total, largest, world, param_bytes=2, offload=offload)
    ours3 = plan_memory.model_states(3, total, largest, world, param_bytes=2, offload=offload)
    assert int(ours2.total) == pytest.approx(gpu2, abs=1)
    assert int(ours3.total) == pytest.approx(gpu3, abs=1)


def test_model_states_fp32_weights(counts_125m):
    """newtonlm's fp32 weights: 16 bytes per parameter at stage 0 (weights, gradients, two moments);
    at ZeRO 3 on 8 GPUs 20/8 per parameter and the gathered largest module (weights + gradient)."""
    total, largest, persistent = counts_125m
    assert plan_memory.model_states(0, total, largest, 4).total == 16 * total
    s3 = plan_memory.model_states(3, total, largest, 8, persistent=persistent)
    assert s3.total == pytest.approx(20 * total / 8 + 8 * largest + 4 * persistent)
    assert 0 < persistent < total / 100  # norms, conv, cell vectors: the matrices are partitioned
    assert largest == 32000 * 768  # the tied embedding is the largest module
    with pytest.raises(ValueError, match="zero_stage"):
        plan_memory.model_states(4, total, largest, 1)


def test_largest_fitting_boundary():
    assert plan.largest_fitting(lambda b: b <= 37, 8, 1000) == 37
    assert plan.largest_fitting(lambda b: b <= 37, 64, 1000) == 37
    assert plan.largest_fitting(lambda b: b <= 5000, 8, 1000) == 1000
    assert plan.largest_fitting(lambda t: t <= 1000, 256, 10**6, step=64) == 960
    assert plan.largest_fitting(lambda b: False, 8, 1000) == 0


@pytest.fixture(scope="module")
def demo_setup():
    s, as_json = plan.setup_from_args(["model=paragru_demo", "train.micro_batch_size=4", "gpu_memory_gb=2",
                                       "headroom=0", "overhead_gb=0.5"])
    assert not as_json
    return s


def test_largest_micro_batch_is_the_largest_that_fits(demo_setup):
    s = demo_setup
    out = plan.make_plan(s)["memory"]
    for ckpt, key in ((False, "no_checkpointing"), (True, "checkpointing")):
        b = out[key]["largest_micro_batch"]
        assert b > 1
        assert plan.fits(s, b, s.seq_len, ckpt) and not plan.fits(s, b + 1, s.seq_len, ckpt)
        peaks = [plan.memory(s, mb, s.seq_len, ckpt)["peak"] for mb in range(1, b + 2)]
        assert all(x < y for x, y in zip(peaks, peaks[1:]))  # monotone in the micro-batch
        t = out[key]["largest_seq_len"]
        mbs = s.micro_batch_size
        assert plan.fits(s, mbs, t, ckpt) and not plan.fits(s, mbs, t + 64, ckpt)
    assert out["checkpointing"]["largest_micro_batch"] > out["no_checkpointing"]["largest_micro_batch"]


def test_peak_is_the_largest_moment(demo_setup):
    """The peak is weights + optimizer states + overhead + the largest of: the saved activations
    and the logits' gradients (start of the backward), the first block and all gradients (its end),
    the gradients and their flat all-reduce copy, the gradients and the step's scratch; at ZeRO 0
    with one micro-batch per step no gradient is kept between steps."""
    for ckpt in (False, True):
        m = plan.memory(demo_setup, 4, 256, ckpt)
        static = m["params"] + m["optimizer"] + m["overhead"]
        assert m["peak"] == pytest.approx(static + max(m["activations"] + m["logits"],
                                                       m["last_block"] + m["grads"],
                                                       2 * m["grads"],  # the all-reduce's flat copy
                                                       m["grads"] + m["step_scratch"]))
        assert m["logits"] == 3 * 4 * 4 * 256 * 8000  # three fp32 [B T, V] copies, vocab 8000 (demo data)
    cfg = demo_setup.model_cfg
    assert m["last_block"] == plan_memory.layer_saved(cfg, 4, 256, False) + 4 * 4 * 256 * cfg.hidden_size


def test_step_cost(demo_setup):
    from newtonlm.models import flops_per_token

    c = plan.step_cost(demo_setup, checkpointing=True)
    fpt = flops_per_token(load_preset("paragru_demo"), 8000, 256)
    assert c["flops_per_token"] == fpt and c["step_flops"] == fpt * 4 * 256
    assert c["matmul_mode"] == "fp32" and c["peak_flops_per_gpu"] == 67e12  # H100 SXM fp32
    assert c["step_time_s"] == pytest.approx(c["step_flops"] * 4 / 3 / (0.4 * 67e12))


def test_global_batch_is_split_as_the_trainer_does():
    """train.global_batch_size: per rank 96 / 8 = 12 sequences, in micro-batches of the largest
    divisor of 12 up to train.micro_batch_size (8): 6, twice (newtonlm.training.config.batch_plan)."""
    s, _ = plan.setup_from_args(["model=paragru_demo", "train.global_batch_size=96", "world=8"])
    assert (s.micro_batch_size, s.grad_accum) == (6, 2)
    assert plan.step_cost(s, False)["tokens_per_step"] == 96 * s.seq_len
    m = plan.memory(s, s.micro_batch_size, s.seq_len, False)
    assert m["peak_at"] == "backward start"  # gradients persist over the 2 micro-steps: counted there
    assert m["moments"]["backward start"] == pytest.approx(
        m["params"] + m["optimizer"] + m["grads"] + m["comm_buffers"] - m["buffers"]["allreduce_bucket"]
        + m["activations"] + m["logits"])


def test_json_output(capsys):
    plan.main(["model=llama_demo", "train=cluster", "world=2", "gpu_memory_gb=24", "mfu=0.5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["planner"]["world"] == 2 and out["train"]["zero_stage"] == 2
    assert out["deepspeed_estimate"]["function"] == "estimate_zero2_model_states_mem_needs"
    m = out["memory"]["no_checkpointing"]
    assert m["cost"]["mfu"] == 0.5 and m["fits"] is True and m["largest_micro_batch"] >= 8


def test_table_output(capsys):
    plan.main(["model=paragru_demo"])
    text = capsys.readouterr().out
    assert "largest micro-batch" in text and "model FLOPs" in text and "peak" in text


@pytest.mark.parametrize("args, message", [
    (["world=0"], "world=0; expected a number of GPUs >= 1"),
    (["gpu_memory_gb=-80"], "gpu_memory_gb=-80.0; expected"),
    (["world=two"], "world='two'; expected int"),
    (["mfu=1.5"], "mfu=1.5; expected"),
    (["model=paragru_7bb"], "did you mean model=paragru_7b?"),
    (["gpu=TPU"], "gpu='TPU': not in the peak FLOP/s table"),
    (["--yaml"], "--yaml: unknown flag"),
    (["train.zero_stag=3"], "did you mean train.zero_stage?"),
    (["data.tokenizer.pretrained=gpt2"], "pass its size as vocab="),
])
def test_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        plan.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
