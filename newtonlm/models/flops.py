"""Training FLOPs per token of each architecture, for model-FLOPs utilization (MFU).

Convention (Kaplan et al.; PaLM appendix B): a multiply-add is 2 FLOPs; training = forward +
backward = 3 x forward; the embedding lookup, norms, activations and biases are not counted;
attention is counted without the causal saving. Per token, forward, with d = hidden_size,
L = num_hidden_layers, V = vocab, T = sequence length:

* every architecture: LM head ``2 V d``;
* Llama, per layer: projections ``2 (2 d^2 + 2 d n_kv h_d + 3 d f)`` + attention scores and values
  ``2 * 2 T d`` (n_kv key/value heads of size h_d, SwiGLU width f);
* Mamba2, per layer: projections ``2 (d (2 D + 2 G S + H) + D d)``, conv ``2 k (D + 2 G S)``, and
  the SSM in its recurrent form ``2 * 3 D S`` (state decay, input outer product, readout; D = expand
  * d, G groups, S = state_size, H heads); the chunked algorithm does more, which MFU does not count;
* ParaRNN, per block: projections ``2 (d (D + N) + N d + 3 d f)``, the cell's block-diagonal input
  projection ``2 * 3 D N / H``, conv ``2 k D``, and the cell's elementwise step ``c N`` with
  c = 20 (GRU) / 24 (LSTM) arithmetic operations per state element (a count of the step's
  operations; whatever the solver does on top - Newton iterations - is not model FLOPs).
"""

from __future__ import annotations

from transformers import LlamaConfig, Mamba2Config

from .configuration_pararnn import ParaRNNConfig
from .factory import model_config

CELL_OPS_PER_STATE = {"gru": 20, "lstm": 24}


def _llama_forward(c: LlamaConfig, seq_len: int) -> float:
    d, f = c.hidden_size, c.intermediate_size
    hd = c.head_dim or d // c.num_attention_heads
    proj = d * c.num_attention_heads * hd * 2 + 2 * d * c.num_key_value_heads * hd + 3 * d * f
    return c.num_hidden_layers * (2 * proj + 4 * seq_len * c.num_attention_heads * hd)


def _mamba2_forward(c: Mamba2Config) -> float:
    d, D = c.hidden_size, c.expand * c.hidden_size
    gs = c.n_groups * c.state_size
    proj = d * (2 * D + 2 * gs + c.num_heads) + D * d
    return c.num_hidden_layers * (2 * proj + 2 * c.conv_kernel * (D + 2 * gs) + 6 * D * c.state_size)


def _pararnn_forward(c: ParaRNNConfig) -> float:
    d, D, N, f = c.hidden_size, c.d_inner, c.state_dim, c.intermediate_size
    proj = d * (D + N) + N * d + 3 * d * f + 3 * D * N // c.num_heads
    return c.num_hidden_layers * (2 * proj + 2 * c.conv_kernel * D + CELL_OPS_PER_STATE[c.cell] * N)


def flops_per_token(model_cfg, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of the preset ``model_cfg`` at ``seq_len``."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r}; expected a positive integer")
    c = model_config(model_cfg, vocab_size)
    if isinstance(c, ParaRNNConfig):
        body = _pararnn_forward(c)
    elif isinstance(c, LlamaConfig):
        body = _llama_forward(c, seq_len)
    elif isinstance(c, Mamba2Config):
        body = _mamba2_forward(c)
    else:  # pragma: no cover - model_config returns one of the three
        raise AssertionError(type(c))
    return 3.0 * (body + 2 * vocab_size * c.hidden_size)
