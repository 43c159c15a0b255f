"""The memory formulas of the planner (``python -m newtonlm.training.plan``): model states per ZeRO
stage, the tensors autograd keeps for the backward pass of each architecture, the logits and loss
buffers, and DeepSpeed's communication buffers. Sizes in bytes; no torch, no weights.

Activations: what every op of a forward saves for its backward, counted per layer from the modules
as they run (newtonlm's ParaGRU/ParaLSTM blocks, transformers' Llama with SDPA attention, and
transformers' Mamba2 on its PyTorch chunked path, the one that runs without the optional
``mamba_ssm`` kernels). The terms were read off ``torch.autograd.graph.saved_tensors_hooks`` once
(unique storages, parameters excluded) and are written below per op; ``tests/test_plan.py`` checks
the formulas against that count at several shapes, fp32 and bf16 autocast, with and without
activation checkpointing. The ParaRNN cell's autograd function keeps only its input drive ``u``
``[B, T, K, N]`` and the solved states ``h`` for the adjoint (``newtonlm/kernels/function.py``): no
Newton iterate, no Jacobian, no time loop is stored.

Under bf16 autocast (``train.precision=bf16``: DeepSpeed's torch_autocast, weights stay fp32) the
matmuls save bf16 copies of their inputs and weights: the weight copies (2 bytes per matmul weight,
the ParaRNN cell's ``B`` included) are kept by autocast's cache for the whole forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

F32, BF16 = 4, 2

# ---- model states ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStates:
    """Per-GPU bytes of the model states, and the host (CPU) bytes per node when offloading."""

    params: float
    grads: float
    optimizer: float  # fp32 master partition + Adam moments (exp_avg, exp_avg_sq)
    gathered: float = 0.0  # ZeRO-3: the layer being computed, gathered in full (params + grads)
    host_per_node: float = 0.0  # optimizer offload: what DeepSpeed keeps in CPU memory per node

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered


def model_states(stage: int, params: int, largest_layer: int, world: int, param_bytes: int = F32,
                 offload: bool = False, gpus_per_node: int = 8, persistent: int = 0) -> ModelStates:
    """Per-GPU model states of Adam training under ZeRO ``stage`` with ``params`` parameters, the
    largest module holding ``largest_layer`` of them, on ``world`` GPUs; ``param_bytes`` is the
    weights' dtype (newtonlm keeps fp32 weights also under bf16 autocast: 4); ``persistent``: the
    parameters ZeRO-3 never partitions (each below ``stage3_param_persistence_threshold`` elements).

    Stages 1-3 are DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` and
    ``estimate_zero3_model_states_mem_needs``), which assume 2-byte weights, with the 2-byte terms
    written for ``param_bytes``: with ``param_bytes=2`` the totals equal DeepSpeed's (a test checks
    it), with 4 they are what DeepSpeed allocates for fp32 weights (stage3.py: the fp32 master
    partition is a clone of the fp32 partition). Per parameter:

    * stage 0 (no ZeRO; a plain AdamW on the fp32 weights): weights p, gradients p, moments 8;
    * stages 1 and 2 (DeepSpeed's zero2 estimator: "2 params16 + (2 grads16 + 4 grads32 +
      4 params32 + 8 optimizer states) / world"): p + (p + 4 + 4 + 8) / world; stage 1 also keeps
      the full gradients until the step (ZeRO-1 partitions optimizer states only): + p (1 - 1/world);
    * stage 3 (zero3 estimator: "4 x largest layer + 18 / world" for p = 2): the weights are
      partitioned too, p + 16 per parameter / world, plus the largest layer gathered in full with
      its gradient: 2 p x largest_layer; where DeepSpeed's estimator stops: the persistent
      parameters stay whole on every GPU (+ p x persistent);
    * offload_optimizer (DeepSpeed's ``cpu_offload=True`` branch): the fp32 master, the fp32
      gradients and the moments move to the host; the GPU keeps the weights (stages 1-2: p; stage 3:
      p / world + the gathered layer) and the host needs DeepSpeed's ``cpu_mem`` figure per node.
    """
    P, W, p = float(params), world, param_bytes
    if stage == 0:
        if offload:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return ModelStates(params=p * P, grads=p * P, optimizer=8 * P)
    if stage in (1, 2):
        full_grads = p * P * (1 - 1 / W) if stage == 1 else 0.0
        if offload:  # DeepSpeed: gpu_mem = 2 * total_params; cpu_mem = P * max(4 W, 16) * 1.5 (per node)
            return ModelStates(params=p * P, grads=full_grads, optimizer=0.0,
                               host_per_node=P * max(4 * W, 16) * 1.5 * min(1.0, gpus_per_node / W))
        return ModelStates(params=p * P, grads=p * P / W + 4 * P / W + full_grads,
                           optimizer=(4 + 8) * P / W)
    if stage == 3:
        gathered = 2 * p * float(largest_layer) + p * float(persistent)
        nodes = max(1, math.ceil(W / gpus_per_node))
        if offload:  # DeepSpeed (params stay on GPU): gpu = largest + 2 P / W; cpu = 16 P / nodes * 1.5
            return ModelStates(params=p * P / W, grads=0.0, optimizer=0.0, gathered=gathered,
                               host_per_node=16 * P / nodes * 1.5)
        return ModelStates(params=p * P / W, grads=4 * P / W, optimizer=(4 + 8) * P / W, gathered=gathered)
    raise ValueError(f"zero_stage={stage!r}; expected 0, 1, 2 or 3")


# ---- activations -------------------------------------------------------------------------------


def _mm_weights(cfg) -> int:
    """Parameters of one layer that enter a matmul (their bf16 autocast copies are cached)."""
    arch = arch_of(cfg)
    d = cfg.hidden_size
    if arch in ("paragru", "paralstm"):
        D, N, f, k = cfg.d_inner, cfg.state_dim, cfg.intermediate_size, cfg.conv_kernel
        K = 3
        return d * (D + N) + D * k + K * D * N // cfg.num_heads + N * d + 3 * d * f
    if arch == "llama":
        qd, kvd = _llama_dims(cfg)
        return d * (2 * qd + 2 * kvd) + 3 * d * cfg.intermediate_size
    Dm, GS, H = _mamba_dims(cfg)
    conv = Dm + 2 * GS
    return d * (2 * Dm + 2 * GS + H) + conv * cfg.conv_kernel + Dm * d


def arch_of(cfg) -> str:
    """The newtonlm architecture name of a transformers config."""
    mt = cfg.model_type
    if mt in ("paragru", "paralstm", "llama", "mamba2"):
        return mt
    raise ValueError(f"model_type={mt!r}; expected paragru, paralstm, llama or mamba2")


def _llama_dims(cfg) -> tuple[int, int]:
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd


def _mamba_dims(cfg) -> tuple[int, int, int]:
    Dm = cfg.expand * cfg.hidden_size
    return Dm, cfg.n_groups * cfg.state_size, cfg.num_heads


def layer_saved(cfg, B: int, T: int, bf16: bool) -> float:
    """Bytes autograd keeps for the backward of one block (without checkpointing), batch ``B`` x
    ``T`` tokens; under ``bf16`` autocast the layer's bf16 weight copies are included."""
    arch, d, n = arch_of(cfg), cfg.hidden_size, B * T
    if arch in ("paragru", "paralstm"):
        D, N, f, k = cfg.d_inner, cfg.state_dim, cfg.intermediate_size, cfg.conv_kernel
        lstm = arch == "paralstm"
        K, rec_rows = 3, (5 if lstm else 3)  # gate rows; clamped recurrent weights A (+ C) rows
        h = (2 if lstm else 1) * N  # the solved states: h, or [c, h] for the LSTM
        pad = B * (T + k - 1) * D  # conv input padded with k-1 steps
        if not bf16:
            # norms: input, normalized, rstd (x2 blocks: mixer, MLP) and the mixer's out_norm;
            # in_proj output [x|z] (z's storage), conv input, conv output, the cell's input copy
            # for the head-wise einsum, u [K,N], h, normed h, SiLU(z), the gated product;
            # SwiGLU: gate, up, SiLU(gate), product
            per_token = 6 * d + 3 + (D + N) + 2 * D + K * N + h + 4 * N + 4 * f
            return F32 * (n * per_token + pad + rec_rows * N)
        # bf16: norms keep fp32 input + normalized, the matmuls a bf16 copy of their input
        # (gate and up one each); u, h, the out_norm and the gated product stay fp32 (the solve's
        # precision); the layer's matmul weights are cached as bf16 copies
        per_token = (F32 * (4 * d + 3) + BF16 * 3 * d  # two norms, in_proj/gate/up input copies
                     + BF16 * ((D + N) + 2 * D)  # in_proj output, conv output, einsum input
                     + F32 * (K * N + h + N + N)  # u, h, normed h, the gated product
                     + BF16 * (N + N)  # SiLU(z), out_proj input
                     + BF16 * 4 * f)
        return n * per_token + BF16 * pad + BF16 * _mm_weights(cfg) + F32 * rec_rows * N
    if arch == "llama":
        qd, kvd = _llama_dims(cfg)
        H, f = cfg.num_attention_heads, cfg.intermediate_size
        if not bf16:
            # two RMSNorms (input, normalized, weighted, rstd), q, k, v after RoPE, the attention
            # output and its log-sum-exp (SDPA flash: no T x T matrix), SwiGLU (4 f)
            return F32 * n * (6 * d + 2 + 2 * qd + 2 * kvd + H + 4 * f)
        # bf16: q, k and v projections each save their own bf16 copy of the normed input; gate, up too
        per_token = (F32 * (4 * d + 2) + BF16 * 5 * d + BF16 * (2 * qd + 2 * kvd) + F32 * H + BF16 * 4 * f)
        return n * per_token + BF16 * _mm_weights(cfg)
    # Mamba2, transformers' torch_forward + chunked scan. T is rounded up to a multiple of
    # chunk_size (exact when it is one, an upper bound otherwise). Per token: the block's RMSNorm,
    # in_proj output, conv input and output (padded by k-1), dt and its softplus, the scan's fp32
    # inputs, the D-skip term, the intra-chunk matrices L, G, M ([H, chunk] per token), C and B
    # copies ([H, S] per token), the chunk states ([D, S] per chunk), the gated RMSNorm, out_proj input
    Dm, GS, H = _mamba_dims(cfg)
    S, cs, k, G = cfg.state_size, cfg.chunk_size, cfg.conv_kernel, cfg.n_groups
    nc = math.ceil(T / cs)
    n = B * nc * cs
    conv = Dm + 2 * GS
    states = B * Dm * S * (2 * nc + 1)  # chunk states (with the initial one) and their slice
    decay_chunk = B * H * (nc + 1) ** 2
    masks = 2 * cs * cs + 2 * (nc + 1) ** 2  # bool masks of the two segment sums (1 byte)
    if not bf16:
        per_token = (3 * d + 1 + (2 * Dm + 2 * GS + H) + 2 * conv + 5 * H + 9 * Dm + G
                     + 3 * H * cs + 5 * H * S)
        return F32 * (n * per_token + B * (k - 1) * conv + states + decay_chunk + 2 * H) + masks
    per_token = (F32 * (2 * d + 1) + BF16 * d + BF16 * 2 * conv + 20 * H + 36 * Dm + 4 * G
                 + 8 * H * cs + 12 * H * S)
    return (n * per_token + BF16 * B * (k - 1) * conv + BF16 * states + (F32 + BF16) * decay_chunk
            + F32 * 2 * H + masks + BF16 * _mm_weights(cfg))


def head_saved(cfg, B: int, T: int, bf16: bool, checkpointing: bool = False) -> float:
    """Bytes kept for the backward outside the blocks: the token ids, the final norm and the LM
    head's input (bf16: its copy and the tied head's bf16 weight copy), the loss (a scalar), and
    Llama's rotary tables (not kept by checkpointed blocks); the log-softmax of the loss is in
    :func:`logits_bytes`."""
    d, n, V = cfg.hidden_size, B * T, cfg.vocab_size
    rope = 0
    if arch_of(cfg) == "llama" and not checkpointing:
        rope = F32 * 2 * T * (_llama_dims(cfg)[0] // cfg.num_attention_heads)
    if not bf16:
        return 8 * n + F32 * n * (3 * d + 1) + rope + F32
    return 8 * n + F32 * n * (2 * d + 1) + BF16 * n * d + BF16 * V * d + rope + F32


def logits_bytes(cfg, B: int, T: int) -> float:
    """The fp32 log-softmax of the loss ``[B T, V]`` that autograd keeps (one copy)."""
    return F32 * B * T * cfg.vocab_size


def logits_peak(cfg, B: int, T: int) -> float:
    """The logits' largest moment, at the start of the backward: the kept log-softmax, its incoming
    gradient and the gradient of the logits, 3 fp32 copies of ``[B T, V]`` (the forward holds 2: the
    logits and their log-softmax; under bf16 2.5: bf16 logits, an fp32 copy, the log-softmax)."""
    return 3 * logits_bytes(cfg, B, T)


def checkpointed_saved(cfg, B: int, T: int) -> float:
    """Bytes kept per block with activation checkpointing: its fp32 input ``[B, T, d]``."""
    return F32 * B * T * cfg.hidden_size


def saved_total(cfg, B: int, T: int, bf16: bool, checkpointing: bool) -> float:
    """Everything autograd keeps at the end of the forward (logits' log-softmax included): what the
    saved-tensor hooks count (``tests/test_plan.py``)."""
    L = cfg.num_hidden_layers
    per = checkpointed_saved(cfg, B, T) if checkpointing else layer_saved(cfg, B, T, bf16)
    return L * per + head_saved(cfg, B, T, bf16, checkpointing) + logits_bytes(cfg, B, T)


@dataclass(frozen=True)
class Activations:
    """Bytes of the activation side of one micro-batch at the two ends of its backward."""

    saved: float  # kept for the backward by all blocks (checkpointing: the block inputs)
    head: float  # ids, final norm, LM-head input (+ bf16 weight copies of the head, rotary tables)
    logits: float  # logits / log-softmax / their gradients at the start of the backward
    last_block: float  # what the backward of the first block holds: its saved tensors (recomputed
    #                    with checkpointing, with its input)
    weight_copies: float  # bf16 autocast copies of the matmul weights (cached for the forward)

    @property
    def start(self) -> float:
        """At the start of the backward: every saved tensor and the logits' gradients."""
        return self.saved + self.head + self.logits


def activations(cfg, B: int, T: int, bf16: bool, checkpointing: bool) -> Activations:
    """The activation memory of a micro-batch of ``B`` sequences of ``T`` tokens.

    The backward frees each block's tensors while the weight gradients build up, so its two ends
    compete: the start (every saved tensor plus the logits' gradients) and the end, the first
    block's backward, when the other blocks' tensors are gone and (ZeRO 0-1) all gradients exist.
    With checkpointing the blocks keep their inputs and one block is recomputed at a time (with its
    own bf16 weight copies: the forward's are freed when it ends). Measured on CPU
    (docs/planning.md): within a block's backward the gradients of its intermediates add little
    (under 3% of the block), so they are not counted."""
    L = cfg.num_hidden_layers
    weights = BF16 * _mm_weights(cfg) if bf16 else 0.0
    block = layer_saved(cfg, B, T, bf16)
    if checkpointing:
        return Activations(saved=L * checkpointed_saved(cfg, B, T), head=head_saved(cfg, B, T, bf16, True),
                           logits=logits_peak(cfg, B, T), last_block=block + checkpointed_saved(cfg, B, T),
                           weight_copies=weights)
    return Activations(saved=L * block, head=head_saved(cfg, B, T, bf16), logits=logits_peak(cfg, B, T),
                       last_block=block, weight_copies=L * weights)


# ---- DeepSpeed buffers -------------------------------------------------------------------------

# DeepSpeed's defaults (deepspeed/runtime/zero/config.py, engine.py); the trainer sets none of them
DS_DEFAULTS = {"reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8),
               "stage3_prefetch_bucket_size": int(5e7), "stage3_param_persistence_threshold": int(1e5),
               "allreduce_bucket_size": int(5e8)}


def comm_buffers(stage: int, params: int, world: int, zero_cfg: dict, touched_only: bool,
                 grad_bytes: int = F32) -> dict[str, float]:
    """DeepSpeed's communication buffers per GPU, in bytes. ``zero_cfg``: the ``zero_optimization``
    section of the DeepSpeed config (DeepSpeed's defaults for keys it lacks). ``touched_only``: count
    only the part a step writes (host memory: pages never written are not resident), not the
    whole allocation (GPU memory: an allocation is reserved in full).

    * stage 0: the engine all-reduces the gradients through flat buffers of at most
      ``allreduce_bucket_size`` elements (a copy of the gradients, freed after the reduce; with one
      process too, measured: docs/planning.md);
    * stages 1-2: the gradient reduce bucket (``reduce_bucket_size`` elements, allocated in full
      every step with contiguous_gradients, DeepSpeed's default; the updated weights are
      all-gathered into the existing flat weights, no bucket);
    * stage 3: the gradient reduce bucket (``reduce_bucket_size`` elements, allocated at start with
      contiguous_gradients, DeepSpeed's default) and the prefetched weights
      (``stage3_prefetch_bucket_size``).
    """
    def get(key):
        return int(zero_cfg.get(key, DS_DEFAULTS[key]))

    P = float(params)

    def size(elements):
        return grad_bytes * (min(elements, P) if touched_only else elements)

    if stage == 0:  # sized by the gradients it holds
        return {"allreduce_bucket": grad_bytes * min(get("allreduce_bucket_size"), P)}
    if stage in (1, 2):
        return {"reduce_bucket": size(get("reduce_bucket_size"))}
    return {"reduce_bucket": size(get("reduce_bucket_size")),
            "prefetch_bucket": size(get("stage3_prefetch_bucket_size")) if world > 1 else 0.0}
