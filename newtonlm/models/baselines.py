"""The baselines, from transformers (not hand-written): configs for its Llama and Mamba2 models.

* Transformer = ``LlamaForCausalLM``: RoPE, SwiGLU MLP, RMSNorm, SDPA attention.
* Mamba2 = ``Mamba2ForCausalLM``: its fused kernels when they are installed on a GPU, its PyTorch
  (chunked SSD) path otherwise. The demo preset sets ``chunk_size`` 64 for CPU, where the
  chunk x chunk tensors are memory-bound, instead of the GPU default of 256 (docs/models.md).

Both get the same vocabulary as the ParaRNN LMs (an argument, from the tokenizer), tied embeddings,
and special-token ids left unset (the tokenizer sets them).

Sequence parallelism (``newtonlm.training.sequence_parallel``): Llama through DeepSpeed-Ulysses
around its own attention function (heads and key-value heads divisible by K); Mamba2 has none
(its mixer takes no initial state for a chunk).
"""

from __future__ import annotations

from transformers import LlamaConfig, Mamba2Config

_NO_SPECIAL_TOKENS = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


def llama_config(fields: dict, vocab_size: int) -> LlamaConfig:
    """``LlamaConfig`` from preset fields (``LlamaConfig`` names), tied, SDPA attention."""
    return LlamaConfig(**{**_NO_SPECIAL_TOKENS, **fields}, vocab_size=vocab_size, tie_word_embeddings=True,
                       attn_implementation="sdpa")


def mamba2_config(fields: dict, vocab_size: int) -> Mamba2Config:
    """``Mamba2Config`` from preset fields (``Mamba2Config`` names, plus ``max_position_embeddings``
    for evaluation tools), tied. ``num_heads`` defaults to ``expand * hidden_size / head_dim``."""
    fields = dict(fields)
    hidden, expand = fields.get("hidden_size", 768), fields.get("expand", 2)
    head_dim = fields.get("head_dim", 64)
    if "num_heads" not in fields:
        if (expand * hidden) % head_dim:
            raise ValueError(f"expand * hidden_size = {expand * hidden} is not divisible by "
                             f"head_dim={head_dim}; expected a multiple (Mamba2 heads of head_dim)")
        fields["num_heads"] = expand * hidden // head_dim
    return Mamba2Config(**{**_NO_SPECIAL_TOKENS, **fields}, vocab_size=vocab_size, tie_word_embeddings=True)
