"""Memory and time planner: ``python -m newtonlm.training.plan [trainer overrides] [planner keys] [--json]``.

Takes the trainer's command line (``model=paragru_7b train=cluster data=slimpajama train.seq_len=4096``
...: the same Hydra composition and checks as ``python -m newtonlm.training.train``) plus planner
keys, and prints per GPU: the model states for the ZeRO stage and offload choice (weights,
gradients, optimizer states; :func:`~newtonlm.training.plan_memory.model_states`, built on
DeepSpeed's own estimators), the activations of the micro-batch at the sequence length with and
without activation checkpointing (:func:`~newtonlm.training.plan_memory.activations`, counted from
the modules), the logits and loss buffers, DeepSpeed's communication buffers, a stated framework
overhead; whether it fits, the largest micro-batch that fits and the longest sequence at that
micro-batch; the step's model FLOPs and a time estimate at a stated MFU.

Planner keys (not trainer settings): ``world=`` GPUs (default 1), ``gpu_memory_gb=`` per GPU
(default 80), ``gpu=`` the GPU's name for the peak FLOP/s table of newtonlm/training/metrics.py
(default "H100 SXM"), ``mfu=`` assumed model-FLOPs utilization (default 0.4), ``gpus_per_node=``
(default 8), ``vocab=`` (default: the data config's tokenizer size rounded up to 64, as the trainer
does), ``overhead_gb=`` (default: :data:`OVERHEAD_GB` of the device), ``headroom=`` fraction of the
GPU left free for the caching allocator (default 0.1), ``device=cpu`` predicts the resident-memory
increase of a CPU run instead (what ``scripts/validate_plan.py`` measures).

What it ignores: the data loader and its workers, checkpoint saving, validation, memory
fragmentation beyond ``headroom``, Newton's working memory inside the ParaRNN solve (the forward's
iterates and Jacobians, freed before the next layer runs; a few [B, T, K, N] tensors of one layer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

from ..data.errors import DataError
from . import plan_memory as pm
from .config import batch_plan, compose_train_config, load_settings, validate
from .errors import UserError

GIB = 2**30
# Memory outside the model's tensors, per process. cuda: CUDA context, cuBLAS workspace and NCCL
# buffers: an assumption (about 1 GiB on recent GPUs), not measured here (no GPU on the machine that
# wrote this). cpu: the resident-memory increase of a CPU training process that is not a tensor of
# the model (allocator pools, gloo buffers, DeepSpeed's bookkeeping), measured by
# scripts/validate_plan.py (docs/planning.md).
OVERHEAD_GB = {"cuda": 1.0, "cpu": 0.04}
PLANNER_KEYS = {"world": int, "gpu_memory_gb": float, "gpu": str, "mfu": float, "gpus_per_node": int,
                "vocab": int, "overhead_gb": float, "headroom": float, "device": str}
DEFAULTS = {"world": 1, "gpu_memory_gb": 80.0, "gpu": "H100 SXM", "mfu": 0.4, "gpus_per_node": 8,
            "vocab": None, "overhead_gb": None, "headroom": 0.1, "device": "cuda"}


@dataclasses.dataclass
class Setup:
    """What a plan is computed from: the model's config, parameter counts, the trainer settings
    that matter for memory, and the planner keys."""

    arch: str
    model_cfg: object  # the transformers config (no weights)
    preset: dict
    params: int
    largest_layer: int
    persistent: int  # parameters ZeRO-3 keeps whole on every GPU
    micro_batch_size: int
    seq_len: int
    grad_accum: int
    zero_stage: int
    offload: bool
    bf16: bool
    checkpointing: bool
    zero_cfg: dict
    keys: dict


def split_args(argv: list[str]) -> tuple[dict, list[str], bool]:
    """(planner keys, trainer overrides, --json) from a command line; errors name the key."""
    keys, overrides, as_json = dict(DEFAULTS), [], False
    for arg in argv:
        if arg == "--json":
            as_json = True
            continue
        name, eq, value = arg.partition("=")
        if eq and name in PLANNER_KEYS:
            try:
                keys[name] = PLANNER_KEYS[name](value)
            except ValueError:
                raise UserError(f"{name}={value!r}; expected {PLANNER_KEYS[name].__name__}") from None
        elif arg.startswith("-"):
            raise UserError(f"{arg}: unknown flag; the planner takes --json, trainer overrides and "
                            f"the keys {', '.join(f'{k}=' for k in PLANNER_KEYS)}")
        else:
            overrides.append(arg)
    check_keys(keys)
    return keys, overrides, as_json


def check_keys(keys: dict) -> None:
    def need(cond, key, expected):
        if not cond:
            raise UserError(f"{key}={keys[key]!r}; expected {expected}")

    need(keys["world"] >= 1, "world", "a number of GPUs >= 1")
    need(keys["gpu_memory_gb"] > 0, "gpu_memory_gb", "the memory of one GPU in GB, > 0")
    need(0 < keys["mfu"] <= 1, "mfu", "a model-FLOPs utilization in (0, 1]")
    need(keys["gpus_per_node"] >= 1, "gpus_per_node", ">= 1")
    need(keys["vocab"] is None or keys["vocab"] > 0, "vocab", "a positive vocabulary size")
    need(keys["overhead_gb"] is None or keys["overhead_gb"] >= 0, "overhead_gb", ">= 0")
    need(0 <= keys["headroom"] < 1, "headroom", "a fraction in [0, 1)")
    need(keys["device"] in ("cuda", "cpu"), "device", "cuda or cpu")


def _vocab(cfg, keys: dict) -> int:
    if keys["vocab"] is not None:
        return keys["vocab"]
    tok = cfg.data.tokenizer
    if tok.get("pretrained"):
        raise DataError(f"data.tokenizer.pretrained={tok.pretrained!r}: the planner does not load "
                        "tokenizers; pass its size as vocab=<number of ids>")
    return -(-int(tok.vocab_size) // 64) * 64  # newtonlm.data.vocab_size_for_model's rounding


def parameter_counts(preset: dict, vocab: int, persistence_threshold: int = int(1e5)) -> tuple[int, int, int]:
    """(unique parameters, parameters of the largest module by its own parameters: DeepSpeed's
    ``model_to_params`` definition of a layer, parameters in tensors below ZeRO-3's
    ``persistence_threshold`` elements), from the model built on the meta device."""
    import torch

    from ..models import build_model

    with torch.device("meta"):
        model = build_model(preset, vocab)
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    persistent = sum(p.numel() for p in unique if p.numel() < persistence_threshold)
    return total, largest, persistent


def setup_from_args(argv: list[str]) -> tuple[Setup, bool]:
    """Compose the trainer's configuration from ``argv`` and derive a :class:`Setup`."""
    from omegaconf import OmegaConf

    from ..models import model_config
    from .optim import deepspeed_config

    keys, overrides, as_json = split_args(argv)
    cfg = compose_train_config(overrides)
    train, wandb = load_settings(cfg)
    validate(train, wandb, keys["world"])
    vocab = _vocab(cfg, keys)
    preset = OmegaConf.to_container(cfg.model, resolve=True)
    try:
        mcfg = model_config(preset, vocab)
    except ValueError as exc:
        raise UserError(f"model ({preset.get('arch')}): {exc}") from exc
    # the trainer's split of the global batch (train.global_batch_size, or micro-batch x accumulation
    # x world) into micro-batches per rank
    batch = batch_plan(train, keys["world"])
    train = dataclasses.replace(train, micro_batch_size=batch.micro_batch, grad_accum=batch.grad_accum)
    grad_accum = batch.grad_accum
    ds = deepspeed_config(train, keys["world"])
    threshold = ds["zero_optimization"].get("stage3_param_persistence_threshold",
                                            pm.DS_DEFAULTS["stage3_param_persistence_threshold"])
    params, largest, persistent = parameter_counts(preset, vocab, threshold)
    return Setup(arch=preset["arch"], model_cfg=mcfg, preset=preset, params=params, largest_layer=largest,
                 persistent=persistent,
                 micro_batch_size=train.micro_batch_size, seq_len=train.seq_len, grad_accum=grad_accum,
                 zero_stage=train.zero_stage, offload=train.offload_optimizer,
                 bf16=train.precision == "bf16", checkpointing=train.activation_checkpointing,
                 zero_cfg=ds["zero_optimization"], keys=keys), as_json


# ---- memory --------------------------------------------------------------------------------------


def memory(s: Setup, micro_batch: int, seq_len: int, checkpointing: bool) -> dict:
    """Per-GPU bytes at the step's largest moment (per process for ``device=cpu``), by part.

    Four moments compete (:func:`~newtonlm.training.plan_memory.activations`): the start of the
    backward (every saved activation and the logits' gradients; the gradients too when they
    persist: ZeRO 2/3 partition buffers, or accumulation over several micro-batches), its end (the
    first block's tensors and all gradients), ZeRO 0's all-reduce (the gradients and their flat
    copy) and the optimizer step (the gradients and the step's scratch); weights, optimizer states
    and the ZeRO buffers are there throughout."""
    keys, W = s.keys, s.keys["world"]
    cpu = keys["device"] == "cpu"
    st = pm.model_states(s.zero_stage, s.params, s.largest_layer, W, offload=s.offload,
                         gpus_per_node=keys["gpus_per_node"], persistent=s.persistent)
    act = pm.activations(s.model_cfg, micro_batch, seq_len, s.bf16, checkpointing)
    buffers = pm.comm_buffers(s.zero_stage, s.params, W, s.zero_cfg, touched_only=cpu)
    step_buffers = buffers.get("allreduce_bucket", 0.0)  # freed after the reduce
    live_buffers = sum(buffers.values()) - step_buffers
    # AdamW's scratch in the step: CUDA's foreach path makes a copy of the moments' size (one list
    # of sqrt(v)); the CPU per-tensor path two copies of the largest tensor it steps (ZeRO: the flat
    # fp32 partition)
    stepped = s.params / W if s.zero_stage > 0 else s.params
    largest_tensor = stepped if s.zero_stage > 0 else s.largest_layer
    scratch = 0.0 if s.offload else (2 * pm.F32 * largest_tensor if cpu else pm.F32 * stepped)
    # ZeRO 3's step flattens the gradient partitions into a fp32 copy for the optimizer (stage3.py
    # _prepare_fp32_grad_for_sub_group); with one process it was not seen (measured on CPU)
    grad_copy = pm.F32 * s.params / W if (s.zero_stage == 3 and W > 1 and not s.offload) else 0.0
    persistent_grads = s.zero_stage >= 2 or s.grad_accum > 1
    static = st.params + st.optimizer + st.gathered + live_buffers
    moments = {"backward start": static + act.start + (st.grads if persistent_grads else 0.0),
               "backward end": static + act.last_block + st.grads,
               "gradient all-reduce": static + st.grads + step_buffers,
               "optimizer step": static + st.grads + grad_copy + scratch}
    peak_at = max(moments, key=moments.get)
    overhead = (keys["overhead_gb"] if keys["overhead_gb"] is not None
                else OVERHEAD_GB["cpu" if cpu else "cuda"]) * GIB
    return {"params": st.params, "grads": st.grads, "optimizer": st.optimizer,
            "gathered_layer": st.gathered, "activations": act.saved + act.head,
            "logits": act.logits, "last_block": act.last_block, "comm_buffers": sum(buffers.values()),
            "step_scratch": scratch + grad_copy, "overhead": overhead, "peak": moments[peak_at] + overhead,
            "peak_at": peak_at, "moments": moments, "host_per_node": st.host_per_node, "buffers": buffers,
            "bf16_weight_copies": act.weight_copies}


def fits(s: Setup, micro_batch: int, seq_len: int, checkpointing: bool) -> bool:
    budget = s.keys["gpu_memory_gb"] * 1e9 * (1 - s.keys["headroom"])
    return memory(s, micro_batch, seq_len, checkpointing)["peak"] <= budget


def largest_fitting(fit, start: int, limit: int, step: int = 1) -> int:
    """The largest multiple of ``step`` in [step, limit] for which ``fit`` holds, 0 if none; ``fit``
    must be monotone (true up to a bound, false beyond): memory grows with the micro-batch and the
    sequence length. Exponential search from ``start``, then bisection."""
    if not fit(step):
        return 0
    lo, hi = step, max(step, start - start % step)
    while hi <= limit and fit(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + step)
    while hi - lo > step:  # fit(lo) holds, fit(hi) does not (or hi is past the limit)
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fit(mid) else (lo, mid)
    return min(lo, limit)


# ---- FLOPs and time ------------------------------------------------------------------------------


def step_cost(s: Setup, checkpointing: bool) -> dict:
    """The optimizer step's model FLOPs (newtonlm.models.flops_per_token: forward + backward) over
    all GPUs, and its time at the assumed MFU of the GPU's dense peak for the precision's matmul
    mode (newtonlm/training/metrics.py; the trainer leaves TF32 off, so fp32 runs at the fp32
    peak). Activation checkpointing repeats the forward: 4/3 of the model FLOPs are executed,
    while MFU counts the model FLOPs."""
    from ..models import flops_per_token
    from .metrics import gpu_peak_flops, matmul_mode

    keys = s.keys
    tokens = s.micro_batch_size * s.seq_len * s.grad_accum * keys["world"]
    fpt = flops_per_token(s.preset, s.model_cfg.vocab_size, s.seq_len)
    mode = matmul_mode("bf16" if s.bf16 else "fp32", allow_tf32=False)
    peak = gpu_peak_flops(keys["gpu"], mode)
    if peak is None:
        raise UserError(f"gpu={keys['gpu']!r}: not in the peak FLOP/s table of "
                        "newtonlm/training/metrics.py (GPU_PEAKS); name a listed GPU (e.g. H100 SXM, A100)")
    flops = fpt * tokens
    executed = flops * (4 / 3 if checkpointing else 1.0)
    seconds = executed / (keys["mfu"] * peak * keys["world"])
    return {"tokens_per_step": tokens, "flops_per_token": fpt, "step_flops": flops,
            "peak_flops_per_gpu": peak, "matmul_mode": mode, "mfu": keys["mfu"], "step_time_s": seconds,
            "tokens_per_s": tokens / seconds}


# ---- the plan ------------------------------------------------------------------------------------

SEQ_LIMIT = 1 << 22  # longest sequence searched (4M tokens)
BATCH_LIMIT = 1 << 16


def make_plan(s: Setup) -> dict:
    """Everything the command prints, as plain data (``--json``)."""
    keys = s.keys
    out = {"model": {"arch": s.arch, "params": s.params, "largest_layer": s.largest_layer,
                     "vocab": s.model_cfg.vocab_size, "layers": s.model_cfg.num_hidden_layers,
                     "hidden_size": s.model_cfg.hidden_size},
           "train": {"micro_batch_size": s.micro_batch_size, "seq_len": s.seq_len,
                     "grad_accum": s.grad_accum, "zero_stage": s.zero_stage,
                     "offload_optimizer": s.offload, "precision": "bf16" if s.bf16 else "fp32",
                     "activation_checkpointing": s.checkpointing},
           "planner": dict(keys), "budget_bytes": keys["gpu_memory_gb"] * 1e9 * (1 - keys["headroom"]),
           "deepspeed_estimate": deepspeed_estimate(s), "memory": {}}
    for ckpt in (False, True):
        def fit_batch(b, ckpt=ckpt):
            return fits(s, b, s.seq_len, ckpt)

        def fit_len(t, ckpt=ckpt):
            return fits(s, s.micro_batch_size, t, ckpt)

        m = memory(s, s.micro_batch_size, s.seq_len, ckpt)
        m["fits"] = m["peak"] <= out["budget_bytes"]
        m["largest_micro_batch"] = largest_fitting(fit_batch, max(1, s.micro_batch_size), BATCH_LIMIT)
        m["largest_seq_len"] = largest_fitting(fit_len, s.seq_len, SEQ_LIMIT, step=64)
        m["cost"] = step_cost(s, ckpt)
        out["memory"]["checkpointing" if ckpt else "no_checkpointing"] = m
    out["stages"] = stage_table(s)
    return out


def stage_table(s: Setup) -> list[dict]:
    """For each ZeRO stage (the configured offload choice; stage 0 never offloads), without and with
    activation checkpointing: the peak at the configured micro-batch, the largest micro-batch at the
    configured sequence length and the longest sequence (a multiple of 64) at the configured
    micro-batch; 0 when nothing fits."""
    rows = []
    for stage in (0, 1, 2, 3):
        other = dataclasses.replace(s, zero_stage=stage, offload=s.offload and stage > 0,
                                    zero_cfg={**s.zero_cfg, "stage": stage})
        row = {"zero_stage": stage}
        for ckpt, key in ((False, "no_checkpointing"), (True, "checkpointing")):
            row[key] = {
                "peak": memory(other, s.micro_batch_size, s.seq_len, ckpt)["peak"],
                "largest_micro_batch": largest_fitting(
                    lambda b, o=other, c=ckpt: fits(o, b, s.seq_len, c), max(1, s.micro_batch_size),
                    BATCH_LIMIT),
                "largest_seq_len": largest_fitting(
                    lambda t, o=other, c=ckpt: fits(o, s.micro_batch_size, t, c), s.seq_len, SEQ_LIMIT,
                    step=64)}
        rows.append(row)
    return rows


def deepspeed_estimate(s: Setup) -> dict | None:
    """DeepSpeed's own model-states estimate for this ZeRO stage (2-byte weights assumed by
    DeepSpeed; newtonlm's weights are fp32, see plan_memory.model_states), per GPU and per node's
    CPU memory; None for stage 0 (DeepSpeed has no estimator for it)."""
    if s.zero_stage == 0:
        return None
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    W, per_node = s.keys["world"], min(s.keys["gpus_per_node"], s.keys["world"])
    nodes = math.ceil(W / per_node)
    if s.zero_stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            s.params, s.largest_layer, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=s.offload,
            cpu_offload_params=False, zero_init=False)
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(s.params, num_gpus_per_node=per_node,
                                                         num_nodes=nodes, cpu_offload=s.offload)
    return {"gpu_bytes": gpu, "cpu_bytes_per_node": cpu,
            "function": "estimate_zero3_model_states_mem_needs" if s.zero_stage == 3
            else "estimate_zero2_model_states_mem_needs"}


def _gb(x: float) -> str:
    return f"{x / 1e9:8.2f}"


def format_plan(p: dict) -> str:
    """The plan as a table (GB = 1e9 bytes)."""
    m, t, k = p["model"], p["train"], p["planner"]
    where = "per process (CPU run: resident-memory increase)" if k["device"] == "cpu" else "per GPU"
    lines = [f"{m['arch']}: {m['params']:,} parameters ({m['layers']} layers, d={m['hidden_size']}, vocab "
             f"{m['vocab']}), largest module {m['largest_layer']:,}",
             f"micro-batch {t['micro_batch_size']} x seq_len {t['seq_len']}, grad_accum {t['grad_accum']}, "
             f"world {k['world']}, ZeRO {t['zero_stage']}"
             f"{' + optimizer offload' if t['offload_optimizer'] else ''}"
             f", {t['precision']}{' autocast (fp32 weights)' if t['precision'] == 'bf16' else ''}; "
             f"budget {k['gpu_memory_gb']} GB x (1 - headroom {k['headroom']})",
             "", f"memory {where}, GB          no checkpointing   checkpointing"]
    a, b = p["memory"]["no_checkpointing"], p["memory"]["checkpointing"]
    rows = [("weights", "params"), ("gradients", "grads"), ("optimizer states", "optimizer"),
            ("ZeRO-3 gathered layer", "gathered_layer"), ("activations (saved)", "activations"),
            ("logits + loss", "logits"), ("first block in backward", "last_block"),
            ("communication buffers", "comm_buffers"),
            ("optimizer step scratch", "step_scratch"), ("framework overhead", "overhead"),
            ("peak", "peak")]
    for label, key in rows:
        lines.append(f"  {label:26s} {_gb(a[key])}          {_gb(b[key])}")
    lines.append(f"  {'peak is at':26s} {a['peak_at']:>14s}    {b['peak_at']:>14s}")
    lines.append(f"  {'fits':26s} {str(a['fits']):>8s}          {str(b['fits']):>8s}")
    lines.append(f"  {'largest micro-batch':26s} {a['largest_micro_batch']:8d}          "
                 f"{b['largest_micro_batch']:8d}   (at seq_len {t['seq_len']})")
    lines.append(f"  {'largest seq_len':26s} {a['largest_seq_len']:8d}          "
                 f"{b['largest_seq_len']:8d}   (at micro-batch {t['micro_batch_size']})")
    if a["host_per_node"]:
        lines.append(f"  host memory per node (offloaded optimizer): {a['host_per_node'] / 1e9:.1f} GB")
    ds = p["deepspeed_estimate"]
    if ds:
        ours = a["params"] + a["grads"] + a["optimizer"] + a["gathered_layer"]
        lines.append(f"DeepSpeed's {ds['function']} (2-byte weights): {ds['gpu_bytes'] / 1e9:.2f} GB per GPU "
                     f"for model states (newtonlm keeps fp32 weights: {ours / 1e9:.2f} GB above)")
    lines += ["", f"per ZeRO stage{' (optimizer offload)' if t['offload_optimizer'] else ''}: peak GB at "
              f"micro-batch {t['micro_batch_size']} / largest micro-batch / largest seq_len",
              f"  {'stage':6s} {'no checkpointing':>30s}   {'checkpointing':>30s}"]
    for row in p["stages"]:
        cells = [f"{r['peak'] / 1e9:8.2f} {r['largest_micro_batch']:8d} {r['largest_seq_len']:10d}"
                 for r in (row["no_checkpointing"], row["checkpointing"])]
        lines.append(f"  {row['zero_stage']:<6d} {cells[0]:>30s}   {cells[1]:>30s}")
    c = a["cost"]
    lines += ["", f"step: {c['tokens_per_step']:,} tokens, {c['step_flops']:.3g} model FLOPs "
              f"({c['flops_per_token']:.3g} per token); at MFU {c['mfu']} of {k['gpu']} "
              f"({c['peak_flops_per_gpu'] / 1e12:.0f} TFLOP/s dense {c['matmul_mode']}) x {k['world']}: "
              f"{c['step_time_s']:.3g} s per step, {c['tokens_per_s']:,.0f} tokens/s; with checkpointing "
              f"{b['cost']['step_time_s']:.3g} s (the forward runs twice)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from ..quiet import quiet_expected_notices
    from .train import reported_errors

    quiet_expected_notices()  # DeepSpeed's accelerator guess on a machine without CUDA
    with reported_errors():
        s, as_json = setup_from_args(sys.argv[1:] if argv is None else argv)
        plan = make_plan(s)
        print(json.dumps(plan, indent=1) if as_json else format_plan(plan))


if __name__ == "__main__":
    main()
