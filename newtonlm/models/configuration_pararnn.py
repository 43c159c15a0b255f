"""Configuration of the ParaRNN language models (``ParaGRUConfig``, ``ParaLSTMConfig``).

One config class, :class:`ParaRNNConfig`, describes both; the two registered model types
("paragru", "paralstm") are thin subclasses that fix ``cell``. Every field is validated at
construction (also when a saved ``config.json`` is loaded), with an error naming the value and
what was expected.

This module and ``modeling_pararnn.py`` import nothing from newtonlm except the kernels package, so
that they can be copied next to exported weights (``trust_remote_code``).
"""

from __future__ import annotations

import logging
import math

from transformers import PreTrainedConfig

from newtonlm.kernels import MODES, NewtonConfig

log = logging.getLogger(__name__)

CELLS = ("gru", "lstm")
CELL_INITS = ("reference", "lm")


def _check_int(name: str, value, minimum: int = 1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}={value!r}; expected {want}")


def _check_positive_number(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        want = "None or a positive number" if allow_none else "a positive number"
        raise ValueError(f"{name}={value!r}; expected {want}")


class ParaRNNConfig(PreTrainedConfig):
    """ParaRNN language model: embedding, ``num_hidden_layers`` pre-norm residual blocks (mixer, then
    SwiGLU MLP), final RMSNorm, LM head tied to the embedding.

    Mixer (the ParaRNN paper's block): ``Linear(hidden_size -> d_inner + state_dim)`` split into x
    ``[B, T, d_inner]`` and gate z ``[B, T, state_dim]``; depthwise causal conv1d (``conv_kernel``)
    and SiLU on x; the ParaRNN cell over the sequence (x -> h ``[B, T, state_dim]``);
    ``RMSNorm(h) * SiLU(z)``; ``Linear(state_dim -> hidden_size)``. With the default
    ``state_dim = d_inner`` the in-projection is the paper's ``2 x d_inner``.

    Fields:
        vocab_size: tokenizer vocabulary (shared by embedding and tied head).
        hidden_size: model width d.
        num_hidden_layers: number of blocks (each = mixer + MLP).
        expand: ``d_inner = expand * hidden_size``, the width of the cell's input x.
        state_dim: cell state size N (``None``: ``d_inner``).
        num_heads: heads H of the cell's block-diagonal input projection (``B [H, d_inner/H, 3,
            N/H]``); ``d_inner`` and ``state_dim`` must be divisible by it.
        conv_kernel: width of the depthwise causal convolution (4 in the paper).
        intermediate_size: width of the SwiGLU MLP (gate and up projections).
        rms_norm_eps: epsilon of every RMSNorm.
        cell: "gru" (ParaGRU, diagonal Jacobian) or "lstm" (ParaLSTM: CIFG + peepholes, 2x2 blocks).
        cell_mode: solver of the recurrence, one of ``newtonlm.kernels.MODES`` ("auto" picks the
            fastest path of the device: a compiled sequential loop + adjoint backward on CPU, the
            fused Newton kernels on CUDA).
        newton_max_iters, newton_max_extra_iters, newton_tol, newton_fallback: ``NewtonConfig`` of
            the Newton modes (max_iters 3 as the reference; up to max_extra_iters more while the
            residual keeps at least halving; tol None = no early stop; a result is accepted at the
            dtype's precision; one still not converged falls back to sequential application,
            counted in the telemetry).
        cell_init: "lm" (as in the reproductions' LM training: A, C ~ N(0, (2/sqrt(5N))^2), B
            kaiming-uniform, biases 0) or "reference" (the ParaRNN code: B xavier-uniform, first bias
            row -linspace(0, 1, N)).
        a_max: bound on |A| and |C| (clamped at init and in every forward; 0.5, the default and
            every preset's value, in LM training keeps the recurrence contracting, which keeps
            Newton at ~3 iterations). None or ``inf``: unbounded, for either ``cell_init``; stored
            as ``inf`` (``{"__float__": "Infinity"}`` in a saved config.json, transformers'
            encoding), so that a saved ``null`` is
            recognizable as written by newtonlm before 2026-12-02, when ``a_max=None`` with
            ``cell_init="lm"`` meant 0.5 in the layers: :meth:`from_dict` (``from_pretrained``)
            loads such a config with ``a_max=0.5``, the value its weights were trained with,
            and logs a warning.
        initializer_range: std of the normal init of embeddings and linear layers.
        max_position_embeddings: the context length evaluation tools assume (the recurrence itself
            has no limit); lm-evaluation-harness reads it.
        tie_word_embeddings: always True in this project (the LM head is the embedding).
    """

    model_type = "pararnn"

    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 4
    expand: int = 2
    state_dim: int | None = None
    num_heads: int = 8
    conv_kernel: int = 4
    intermediate_size: int = 512
    rms_norm_eps: float = 1e-5
    cell: str = "gru"
    cell_mode: str = "auto"
    newton_max_iters: int = 3
    newton_max_extra_iters: int = 3
    newton_tol: float | None = None
    newton_fallback: str = "sequential"
    cell_init: str = "lm"
    a_max: float | None = 0.5
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "expand", "num_heads",
                     "conv_kernel", "intermediate_size", "max_position_embeddings"):
            _check_int(name, getattr(self, name))
        if self.state_dim is None:
            self.state_dim = self.d_inner
        _check_int("state_dim", self.state_dim)
        for name, width in (("d_inner = expand * hidden_size", self.d_inner),
                            ("state_dim", self.state_dim)):
            if width % self.num_heads:
                raise ValueError(f"{name} = {width} is not divisible by num_heads={self.num_heads}")
        if self.cell not in CELLS:
            raise ValueError(f"cell={self.cell!r}; expected one of {CELLS}")
        if self.cell_mode not in MODES:
            raise ValueError(f"cell_mode={self.cell_mode!r}; expected one of {MODES}")
        if self.cell_init not in CELL_INITS:
            raise ValueError(f"cell_init={self.cell_init!r}; expected one of {CELL_INITS}")
        self.newton_config()  # validates newton_max_iters / newton_tol / newton_fallback
        _check_positive_number("a_max", self.a_max, allow_none=True)
        if self.a_max is None:
            self.a_max = math.inf  # unbounded; never saved as null (see from_dict)
        _check_positive_number("rms_norm_eps", self.rms_norm_eps)
        if isinstance(self.initializer_range, bool) or not isinstance(self.initializer_range, (int, float)) \
                or self.initializer_range < 0:
            raise ValueError(f"initializer_range={self.initializer_range!r}; expected a number >= 0")
        if self.tie_word_embeddings is not True:
            raise ValueError(f"tie_word_embeddings={self.tie_word_embeddings!r}; the ParaRNN LMs always "
                             "tie the LM head to the embedding (expected True)")
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """A saved config (``from_pretrained``). ``a_max: null`` with ``cell_init: "lm"`` is only
        written by newtonlm before 2026-12-02, whose layers then clamped at 0.5: loaded as 0.5,
        the trained behaviour, with a warning (newer versions save an unbounded ``a_max`` as
        ``{"__float__": "Infinity"}``)."""
        if config_dict.get("a_max", 0.5) is None and config_dict.get("cell_init", "lm") == "lm":
            log.warning("config a_max=null with cell_init='lm' was saved by newtonlm before "
                        "2026-12-02, whose layers clamped A and C to [-0.5, 0.5] then: loaded with "
                        "a_max=0.5, the trained behaviour (for an unbounded cell write "
                        "\"a_max\": {\"__float__\": \"Infinity\"} in config.json)")
            config_dict = {**config_dict, "a_max": 0.5}
        return super().from_dict(config_dict, **kwargs)

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_size

    @property
    def layer_types(self) -> list[str]:
        """Every block keeps a fixed-size recurrent state (conv window + cell state), which
        transformers' ``DynamicCache`` stores in its linear-attention layers."""
        return ["linear_attention"] * self.num_hidden_layers

    def newton_config(self) -> NewtonConfig:
        return NewtonConfig(max_iters=self.newton_max_iters, max_extra_iters=self.newton_max_extra_iters,
                            tol=self.newton_tol,
                            fallback=self.newton_fallback)


class ParaGRUConfig(ParaRNNConfig):
    """:class:`ParaRNNConfig` with the ParaGRU cell (model type "paragru")."""

    model_type = "paragru"
    cell: str = "gru"

    def __post_init__(self, **kwargs):
        if self.cell != "gru":
            raise ValueError(f"cell={self.cell!r}; a ParaGRUConfig has cell='gru' "
                             "(use ParaLSTMConfig for 'lstm')")
        super().__post_init__(**kwargs)


class ParaLSTMConfig(ParaRNNConfig):
    """:class:`ParaRNNConfig` with the ParaLSTM cell (model type "paralstm")."""

    model_type = "paralstm"
    cell: str = "lstm"

    def __post_init__(self, **kwargs):
        if self.cell != "lstm":
            raise ValueError(f"cell={self.cell!r}; a ParaLSTMConfig has cell='lstm' "
                             "(use ParaGRUConfig for 'gru')")
        super().__post_init__(**kwargs)


__all__ = ["CELLS", "CELL_INITS", "ParaGRUConfig", "ParaLSTMConfig", "ParaRNNConfig"]
