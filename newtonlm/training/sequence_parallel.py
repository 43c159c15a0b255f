"""Sequence parallelism for every language model: one call splits the time axis over a group.

:func:`set_sequence_parallel` (model, group) puts a model in sequence-parallel mode: each rank of
``group`` then passes its chunk of ``input_ids`` (``newtonlm.kernels.split_sequence``: contiguous,
in rank order, the first ``T % K`` ranks one step longer) and gets its chunk of the logits.
Parameter gradients are each rank's partial sums over its chunk: sum them over the group (the
trainer does, like data-parallel gradients). None as the group switches back to one process.

* ParaGRU / ParaLSTM: ``ParaRNNForCausalLM.set_sequence_parallel`` (the Newton solve and the
  convolution halo across ranks, ``newtonlm.kernels.seqpar``).
* Llama: DeepSpeed-Ulysses (``deepspeed.sequence.layer.DistributedAttention``) around transformers'
  own attention function: after the projections and RoPE (applied at the chunk's *global*
  positions), one all-to-all turns "my chunk, all heads" into "the whole sequence, H/K heads",
  the model's attention (SDPA or eager) runs on that, and a second all-to-all returns "my chunk,
  all heads". Everything else (embeddings, MLP, norms) is per-token and runs on the chunk. Heads
  and key-value heads must be divisible by K. DeepSpeed's all-to-all needs equal chunks: a chunk
  one step short is padded at its end, the padded keys are masked out and the padded rows dropped.
* Mamba2: refused (:class:`SequenceParallelUnsupported`): transformers' Mamba2 mixer takes no
  initial SSM state for a chunk (its chunked scan starts from zero) and no convolution halo.

It lives in training/ because the Llama part uses DeepSpeed (models/ never imports DeepSpeed);
DeepSpeed is imported only when a Llama model is switched on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM, Mamba2ForCausalLM, PreTrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from newtonlm.kernels import split_lengths

from ..models.configuration_pararnn import ParaRNNConfig
from ..models.modeling_pararnn import ParaRNNForCausalLM

ULYSSES = "newtonlm_ulysses"  # the attention implementation name registered with transformers
_STATE = "_newtonlm_sequence_parallel"  # attribute on the Llama model and its attention modules
_INNER = ("sdpa", "eager")  # the attention functions Ulysses wraps here (padding needs a mask)


class SequenceParallelUnsupported(ValueError):
    """The model or its settings cannot be split over the sequence axis (named in the message)."""


# ----------------------------------------------------------------------------- checks


def _arch(config: PreTrainedConfig) -> str:
    return getattr(config, "model_type", type(config).__name__)


def check_sequence_parallel(config: PreTrainedConfig, K: int, seq_len: int) -> list[int]:
    """Start-up check (no process group needed) that a model of ``config`` can run sequences of
    ``seq_len`` tokens split over ``K`` ranks; returns the chunk lengths. Raises
    :class:`SequenceParallelUnsupported` naming the value: an architecture without support
    (Mamba2), heads not divisible by K (Llama), a chunk shorter than one step, or (ParaRNN) shorter
    than the convolution's ``conv_kernel - 1`` halo."""
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise SequenceParallelUnsupported(f"sequence_parallel={K!r}; expected a positive integer")
    arch = _arch(config)
    try:
        lengths = split_lengths(seq_len, K)
    except ValueError as err:
        raise SequenceParallelUnsupported(f"seq_len={seq_len} over sequence_parallel={K}: {err}") from None
    if K == 1:
        return lengths
    if isinstance(config, ParaRNNConfig):
        halo = config.conv_kernel - 1
        if min(lengths) < halo:
            raise SequenceParallelUnsupported(
                f"seq_len={seq_len} over sequence_parallel={K} gives chunks {lengths}; the {arch} "
                f"convolution (conv_kernel={config.conv_kernel}) needs every chunk to have at least "
                f"{halo} steps (seq_len >= {halo * K})")
        return lengths
    if arch == "llama":
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        if heads % K or kv % K:
            raise SequenceParallelUnsupported(
                f"llama with num_attention_heads={heads}, num_key_value_heads={kv} over "
                f"sequence_parallel={K}: Ulysses gives every rank H/K heads; expected both "
                f"divisible by {K}")
        return lengths
    if arch == "mamba2":
        raise SequenceParallelUnsupported(
            "arch 'mamba2' has no sequence parallelism here: transformers' Mamba2 mixer takes no "
            "initial SSM state for a chunk and no convolution halo from the previous rank "
            "(docs/sequence_parallel.md); use sequence_parallel=1")
    raise SequenceParallelUnsupported(f"model type {arch!r} has no sequence parallelism here; "
                                      "expected paragru, paralstm or llama")


# ----------------------------------------------------------------------------- entry point


def set_sequence_parallel(model: torch.nn.Module, group) -> None:
    """Split the time axis of ``model`` over the ranks of ``group`` (a torch.distributed process
    group, every rank of it calling this; None: back to one process). Each rank then passes its
    chunk of ``input_ids`` (``[B, L_k]``) and gets its chunk of the logits; positions are global
    (computed from the ranks' chunk lengths) and the model runs without a cache."""
    if isinstance(model, ParaRNNForCausalLM):
        model.set_sequence_parallel(group)
    elif isinstance(model, LlamaForCausalLM):
        if group is None:
            _llama_off(model)
        else:
            _llama_on(model, group)
    elif isinstance(model, Mamba2ForCausalLM):
        check_sequence_parallel(model.config, 2, 2)  # raises the Mamba2 message
    else:
        raise SequenceParallelUnsupported(f"{type(model).__name__} has no sequence parallelism here; "
                                          "expected a ParaRNN or Llama causal LM")


# ----------------------------------------------------------------------------- Llama (Ulysses)


@dataclass
class _Ulysses:
    """Per-model state: the group, the implementation to restore, this forward's chunk lengths."""

    group: object
    inner: str
    hook: object = None
    lengths: list = field(default_factory=list)
    attention: object = None  # DeepSpeed's DistributedAttention (built once)


def _llama_on(model: LlamaForCausalLM, group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise SequenceParallelUnsupported("sequence parallelism needs an initialized torch.distributed "
                                          "process group; none is initialized")
    if not isinstance(group, dist.ProcessGroup):
        raise SequenceParallelUnsupported(f"group is {type(group).__name__}; expected a "
                                          "torch.distributed ProcessGroup (or None)")
    K = dist.get_world_size(group)
    cfg = model.config
    check_sequence_parallel(cfg, K, K)
    _llama_off(model)
    inner = cfg._attn_implementation
    if inner not in _INNER:
        raise SequenceParallelUnsupported(f"attn_implementation={inner!r} under sequence parallelism; "
                                          f"expected one of {_INNER} (Ulysses wraps them here)")
    import deepspeed.comm as ds_comm
    from deepspeed.sequence.layer import DistributedAttention

    if not ds_comm.is_initialized():  # DeepSpeed's collectives wrap the torch process group
        import deepspeed.ops

        # without its shared-memory CPU all-reduce (compiled at first use, 25-90 s): not used here
        compatible = deepspeed.ops.__compatible_ops__
        before = compatible.get("deepspeed_shm_comm")
        compatible["deepspeed_shm_comm"] = False
        try:
            ds_comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        finally:
            compatible["deepspeed_shm_comm"] = before
    state = _Ulysses(group=group, inner=inner)
    # scatter heads (dim 2 of [B, L, H, D]), gather the sequence (dim 1)
    state.attention = DistributedAttention(_GatheredAttention(state), group, scatter_idx=2, gather_idx=1)
    if ULYSSES not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(ULYSSES, ulysses_attention)
    for layer in model.model.layers:
        setattr(layer.self_attn, _STATE, state)
    state.hook = model.model.register_forward_pre_hook(_chunk_inputs, with_kwargs=True)
    setattr(model, _STATE, state)
    model.set_attn_implementation(ULYSSES)


def _llama_off(model: LlamaForCausalLM) -> None:
    state = getattr(model, _STATE, None)
    if state is None:
        return
    state.hook.remove()
    for layer in model.model.layers:
        if hasattr(layer.self_attn, _STATE):
            delattr(layer.self_attn, _STATE)
    delattr(model, _STATE)
    model.set_attn_implementation(state.inner)


def _state_of(module) -> _Ulysses:
    state = getattr(module, _STATE, None)
    if state is None:
        raise SequenceParallelUnsupported(f"attn_implementation={ULYSSES!r} on a model not switched on "
                                          "with newtonlm.training.sequence_parallel.set_sequence_parallel")
    return state


def _chunk_inputs(module, args, kwargs):
    """Forward pre-hook of ``LlamaModel``: gather every rank's chunk length (one small all-gather
    that also carries each rank's input errors, so a bad input raises on every rank), set the
    chunk's global ``position_ids`` and run without a cache."""
    state = getattr(module, _STATE, None) or _state_of(module.layers[0].self_attn)
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    error = None
    mask = kwargs.get("attention_mask")
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        error = "a cache was passed; a sequence-parallel model runs without one (training and scoring)"
    elif mask is not None and not bool(mask.all()):
        error = "an attention_mask with padding; sequence parallelism expects unpadded chunks"
    elif x is None or x.dim() < 2:
        error = f"input of shape {tuple(getattr(x, 'shape', ()))}; expected [B, L, ...] (this rank's chunk)"
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    K, rank = dist.get_world_size(state.group), dist.get_rank(state.group)
    mine = torch.tensor([int(error is not None), -1 if error else x.shape[0], -1 if error else x.shape[1]],
                        dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(K)]
    dist.all_gather(rows, mine, group=state.group)
    rows = [r.tolist() for r in rows]
    if error is not None:
        raise SequenceParallelUnsupported(f"Llama sequence parallelism (rank {rank} of {K}): {error}")
    failed = [k for k, r in enumerate(rows) if r[0]]
    if failed:
        raise SequenceParallelUnsupported(f"Llama sequence parallelism: rank(s) {failed} of {K} rejected "
                                          "their inputs (their error names the problem)")
    lengths = [r[2] for r in rows]
    if min(lengths) < 1 or len({r[1] for r in rows}) > 1:
        raise SequenceParallelUnsupported(
            f"Llama sequence parallelism: chunk lengths {lengths}, batch sizes {[r[1] for r in rows]} "
            f"over {K} ranks; expected every chunk at least one step long and one batch size")
    state.lengths = lengths
    kwargs = dict(kwargs, attention_mask=None, use_cache=False)
    if kwargs.get("position_ids") is None:
        start = sum(lengths[:rank])
        kwargs["position_ids"] = torch.arange(start, start + lengths[rank], device=device)[None]
    return args, kwargs


class _GatheredAttention:
    """The model's own attention on the whole sequence and H/K heads: ``[B, K Lmax, h, D]`` in
    (DeepSpeed's layout) -> ``[B, K Lmax, h, D]`` out. Equal chunks: causal, no mask; otherwise a
    mask over the padded layout (padded keys never attended, real tokens causal by global position)."""

    def __init__(self, state: _Ulysses):
        self.state = state

    def __call__(self, q, k, v, module, scaling, dropout):
        lengths = self.state.lengths
        inner = ALL_ATTENTION_FUNCTIONS[self.state.inner] if self.state.inner != "eager" else None
        if inner is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as inner
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, h, S, D], transformers' layout
        mask = None
        if len(set(lengths)) > 1 or self.state.inner == "eager":
            mask = _padded_causal_mask(lengths, q.dtype, q.device)
        out, _ = inner(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=mask is None)
        return out  # [B, S, h, D]


def _padded_causal_mask(lengths: list[int], dtype, device) -> torch.Tensor:
    """Additive mask ``[1, 1, S, S]`` (0 allowed, dtype min masked) over ``K`` blocks of
    ``max(lengths)`` rows, block j holding chunk j and padding after it. A padded query gets the
    positions after its chunk's end (it sees at least the first token, never a NaN row)."""
    Lmax = max(lengths)
    starts = torch.tensor([sum(lengths[:j]) for j in range(len(lengths))], device=device)
    i = torch.arange(Lmax, device=device)
    pos = (starts[:, None] + i[None]).reshape(-1)
    valid = (i[None] < torch.tensor(lengths, device=device)[:, None]).reshape(-1)
    allowed = valid[None, :] & (pos[None, :] <= pos[:, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def ulysses_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """The attention function registered as ``"newtonlm_ulysses"``: ``query [B, H, L_k, D]``,
    ``key``/``value`` ``[B, KV, L_k, D]`` of this rank's chunk (RoPE applied at global positions)
    -> (``[B, L_k, H, D]``, None). The chunk's ``attention_mask`` is ignored (the model's pre-hook
    has refused padding); the whole sequence's causal mask is built from the chunk lengths."""
    state = _state_of(module)
    L, Lmax = query.shape[2], max(state.lengths)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, L, H, D]: DeepSpeed's layout
    if L < Lmax:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, Lmax - L)) for t in (q, k, v))
    out = state.attention(q, k, v, 0, None, module, scaling, dropout)  # batch_dim_idx 0
    return out[:, :L], None


__all__ = ["ULYSSES", "SequenceParallelUnsupported", "check_sequence_parallel", "set_sequence_parallel",
           "ulysses_attention"]
