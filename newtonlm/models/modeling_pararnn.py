"""ParaRNN language models as transformers models: ``ParaGRUForCausalLM`` and ``ParaLSTMForCausalLM``.

    input_ids [B, T] -> embedding [B, T, d]
    -> num_hidden_layers x ParaRNNBlock:  x = x + Mixer(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))
    -> RMSNorm -> LM head (tied to the embedding) -> logits [B, T, V]

Mixer (the ParaRNN paper's block; D = d_inner, N = state_dim):

    [x | z] = in_proj(u)                  u [B, T, d] -> x [B, T, D], z [B, T, N]
    x = SiLU(causal_depthwise_conv(x))    kernel conv_kernel (4)
    h = cell(x)                           ParaGRU / ParaLSTM over the sequence: [B, T, N]
    out = out_proj(RMSNorm(h) * SiLU(z))  [B, T, d]

The recurrence is solved by ``newtonlm.kernels`` (mode and Newton settings from the config); its
per-layer Newton telemetry is returned by :meth:`ParaRNNForCausalLM.newton_stats`.

Generation carries a recurrent cache: transformers' ``DynamicCache`` built from the config, whose
``layer_types`` are all "linear_attention", holds per block the conv window (the last
``conv_kernel - 1`` inputs of the conv, ``[B, D, conv_kernel - 1]``) and the cell state (``[B, N]``
for GRU, ``[B, 2, N]`` = (c, h) for LSTM). Memory is constant in the number of generated tokens, and
decoding token by token gives the logits of the full-sequence forward (up to fp rounding).

Self-contained on purpose: besides torch and transformers it imports only ``newtonlm.kernels`` and
the sibling configuration module, so that export can copy it next to the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from newtonlm.kernels import ParaGRU, ParaLSTM, ParaRNN, halo_exchange, newton_telemetry

from .configuration_pararnn import ParaGRUConfig, ParaLSTMConfig, ParaRNNConfig


class ParaRNNRMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32: x ``[..., C]`` -> ``[..., C]``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)  # one fused op in fp32
        return y.to(x.dtype)


class _CausalConvFunction(torch.autograd.Function):
    """y_t = bias + sum_j w[:, j] * xp_{t+j} over xp = [past; x] ``[B, T+k-1, C]``, with a
    hand-written backward: autograd through k shifted slices zero-fills and accumulates a full
    gradient buffer per tap, which on CPU doubled the convolution's time (measured: docs/models.md)."""

    @staticmethod
    def forward(ctx, xp, weight, bias):
        k, T = weight.shape[1], xp.shape[1] - weight.shape[1] + 1
        y = torch.addcmul(bias, xp[:, 0:T], weight[:, 0])
        for j in range(1, k):
            y.addcmul_(xp[:, j:j + T], weight[:, j])
        ctx.save_for_backward(xp, weight)
        return y

    @staticmethod
    def backward(ctx, g):
        xp, weight = ctx.saved_tensors
        k, T = weight.shape[1], g.shape[1]
        g = g.contiguous()
        dxp = torch.zeros_like(xp)  # d/d xp_{t+j} += g_t w_j
        for j in range(k):
            dxp[:, j:j + T].addcmul_(g, weight[:, j])
        g2 = g.reshape(-1, g.shape[-1])
        dw = torch.stack([(g * xp[:, j:j + T]).reshape(g2.shape).sum(0) for j in range(k)], dim=1)
        return dxp, dw, g2.sum(0)


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal convolution over time: x ``[B, T, C]`` -> y ``[B, T, C]`` with

        y_t = bias + sum_j weight[:, j] * x_{t - (k-1) + j},   j = 0..k-1,

    where inputs before t = 0 come from ``state`` ``[B, C, k-1]`` (the previous call's last k-1
    inputs; zeros when None). Computed as k shifted multiply-adds on the [B, T, C] layout (no
    transposes), the same arithmetic for a full sequence and for token-by-token decoding.
    """

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.kernel)  # nn.Conv1d's default for a depthwise conv (fan_in = k)
        init.uniform_(self.weight, -bound, bound)
        init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        """Returns (y ``[B, T, C]``, new state ``[B, C, k-1]``: the last k-1 inputs)."""
        B, T, C = x.shape
        if state is None:
            xp = F.pad(x, (0, 0, self.kernel - 1, 0))
        else:
            xp = torch.cat((state.transpose(1, 2).to(x.dtype), x), dim=1)  # [B, T + k - 1, C]
        y = _CausalConvFunction.apply(xp, self.weight.to(x.dtype), self.bias.to(x.dtype))
        return y, xp[:, T:].transpose(1, 2)


def sequence_parallel_conv_state(x: torch.Tensor, kernel: int, group) -> torch.Tensor:
    """The conv state of a chunk of a sequence split over the ranks of ``group``: the previous
    rank's last ``kernel - 1`` inputs (zeros on rank 0) as ``[B, C, kernel - 1]``, from this rank's
    chunk ``x [B, L, C]``; differentiable (the gradient goes back to the previous rank's x)."""
    return halo_exchange(x, kernel - 1, group).transpose(1, 2)


class ParaRNNMixer(nn.Module):
    """The ParaRNN mixer: u ``[B, T, d]`` -> ``[B, T, d]`` (see the module docstring)."""

    def __init__(self, config: ParaRNNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        D, N = config.d_inner, config.state_dim
        self.d_inner, self.state_dim = D, N
        self.in_proj = nn.Linear(config.hidden_size, D + N, bias=False)
        self.conv = CausalDepthwiseConv(D, config.conv_kernel)
        layer_cls = ParaGRU if config.cell == "gru" else ParaLSTM
        self.cell = layer_cls(D, N, config.num_heads, mode=config.cell_mode,
                              newton=config.newton_config(), init=config.cell_init, a_max=config.a_max)
        self.out_norm = ParaRNNRMSNorm(N, config.rms_norm_eps)
        self.out_proj = nn.Linear(N, config.hidden_size, bias=False)
        self.sequence_group = None  # set by ParaRNNForCausalLM.set_sequence_parallel

    def forward(self, u: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x, z = self.in_proj(u).split((self.d_inner, self.state_dim), dim=-1)
        conv_state = cell_state = None
        if self.sequence_group is not None:
            if cache is not None:
                raise ValueError("a sequence-parallel ParaRNN model runs without a cache (training "
                                 "and scoring); pass use_cache=False, or set_sequence_parallel(None) "
                                 "to generate")
            conv_state = sequence_parallel_conv_state(x, self.conv.kernel, self.sequence_group)
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx)
            cell_state = cache.get_recurrent_state(self.layer_idx)
        x, new_conv_state = self.conv(x, conv_state)
        x = F.silu(x)
        if cache is None:
            h = self.cell(x)
        elif x.shape[1] == 1:  # decoding: one step of the cell
            h, new_cell_state = self.cell.step(x[:, 0], cell_state)
            h = h[:, None]
        else:  # prefill (or a continuation) from the cached state
            h, new_cell_state = self.cell(x, cell_state, return_state=True)
        if cache is not None:
            cache.update_conv_state(new_conv_state.contiguous(), self.layer_idx)
            cache.update_recurrent_state(new_cell_state.contiguous(), self.layer_idx)
        y = self.out_norm(h) * F.silu(z)  # h is fp32 (the solve's precision) under bf16 too
        return self.out_proj(y.to(u.dtype))


class ParaRNNMLP(nn.Module):
    """SwiGLU MLP: x ``[B, T, d]`` -> ``down(SiLU(gate(x)) * up(x))`` ``[B, T, d]``."""

    def __init__(self, config: ParaRNNConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ParaRNNBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x ``[B, T, d]`` -> x + Mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(.))."""

    def __init__(self, config: ParaRNNConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = ParaRNNRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = ParaRNNMixer(config, layer_idx)
        self.mlp_norm = ParaRNNRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ParaRNNMLP(config)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class ParaRNNPreTrainedModel(PreTrainedModel):
    config_class = ParaRNNConfig
    config: ParaRNNConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ParaRNNBlock"]
    _is_stateful = True  # the recurrent state cannot be rolled back: no assisted decoding

    def _init_weights(self, module):
        """Linear layers and the embedding: N(0, initializer_range^2) (transformers' default); norms:
        ones; conv: nn.Conv1d's default; the ParaRNN cells: their ``cell_init`` scheme
        (``newtonlm.kernels.ParaRNN.reset_parameters``), skipped for a cell loaded from a checkpoint."""
        super()._init_weights(module)
        if isinstance(module, CausalDepthwiseConv):
            module.reset_parameters()
        elif isinstance(module, ParaRNN):
            loaded = any(getattr(p, "_is_hf_initialized", False) for p in module.parameters(recurse=False))
            if not loaded:
                module.reset_parameters()


def _check_right_padded(attention_mask: torch.Tensor | None):
    """A recurrent state cannot skip tokens: padding is allowed only at the end of a row."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] < 2:
        return
    m = attention_mask.bool()
    if (m[:, 1:] & ~m[:, :-1]).any():
        raise ValueError("attention_mask has padding before real tokens (left or inner padding); a "
                         "recurrent model supports right padding only: pad on the right, or generate "
                         "from prompts of equal length")


class ParaRNNModel(ParaRNNPreTrainedModel):
    """Backbone: input_ids ``[B, T]`` -> final hidden states ``[B, T, hidden_size]``."""

    def __init__(self, config: ParaRNNConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ParaRNNBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = ParaRNNRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: Cache | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, hidden_size]")
        _check_right_padded(attention_mask)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        hidden = (x,) if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, cache)
            if output_hidden_states:
                hidden += (x,)
        x = self.norm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache, hidden_states=hidden)


class ParaRNNForCausalLM(ParaRNNPreTrainedModel, GenerationMixin):
    """ParaRNN LM with a tied head: input_ids ``[B, T]`` -> logits ``[B, T, vocab_size]`` (+ loss with
    ``labels``, shifted inside as in every transformers causal LM)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ParaRNNConfig):
        super().__init__(config)
        self.model = ParaRNNModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """``kwargs`` reach the loss (e.g. ``num_items_in_batch`` to normalize over a whole
        accumulated batch); position ids and other attention-model inputs are ignored."""
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         cache=cache, use_cache=use_cache, output_hidden_states=output_hidden_states)
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss_kwargs = {k: v for k, v in kwargs.items() if k in ("num_items_in_batch", "ignore_index")}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      **loss_kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache,
                                      hidden_states=out.hidden_states)

    def set_sequence_parallel(self, group):
        """Split the time axis over the ranks of ``group`` (a torch.distributed process group; None:
        single-process again): each rank then passes its chunk of ``input_ids`` (in rank order,
        ``newtonlm.kernels.split_sequence``) and gets its chunk of the logits; the convolutions
        take their halo from the previous rank and the cells solve across ranks
        (``newtonlm.kernels.seqpar``). Parameter gradients are this rank's partial sums: sum them
        over the group. Runs without a cache (``use_cache=False``)."""
        for layer in self.model.layers:
            layer.mixer.cell.set_sequence_parallel(group)
            layer.mixer.sequence_group = group

    def cells(self) -> list[ParaRNN]:
        """The ParaRNN cell of every block, in order."""
        return [layer.mixer.cell for layer in self.model.layers]

    def newton_stats(self, reset: bool = False) -> dict:
        """Newton telemetry of the solver calls since the last reset, per layer and over layers, as
        flat ``newton/...`` keys (``newtonlm.kernels.newton_telemetry``): which path answered each
        call (Newton, the sequential path by choice, a fallback after Newton was rejected), Newton's
        iterations, extra iterations, last residual and its per-iteration history, and the fallback
        rate. On CPU the "auto" mode applies the cell sequentially: no Newton, no residual."""
        out = newton_telemetry([cell.stats for cell in self.cells()])
        if reset:
            for cell in self.cells():
                cell.stats.reset()
        return out


class ParaGRUForCausalLM(ParaRNNForCausalLM):
    """ParaRNN LM with the ParaGRU cell (model type "paragru")."""

    config_class = ParaGRUConfig


class ParaLSTMForCausalLM(ParaRNNForCausalLM):
    """ParaRNN LM with the ParaLSTM cell (model type "paralstm")."""

    config_class = ParaLSTMConfig


__all__ = ["ParaGRUForCausalLM", "ParaLSTMForCausalLM", "ParaRNNForCausalLM", "ParaRNNModel",
           "ParaRNNPreTrainedModel"]
