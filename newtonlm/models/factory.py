"""One entry point for the trainer, the evaluation and the export: a model from a preset.

A preset (``configs/model/<arch>_<size>.yaml``, any mapping or Hydra DictConfig) is ``arch`` plus
the fields of that architecture's transformers config class under their own names; the vocabulary
size is not in it (it comes from the tokenizer: an argument here). Unknown fields are an error, not
silently stored, so that a typo in a preset or override fails at construction.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
)

from .baselines import llama_config, mamba2_config
from .configuration_pararnn import ParaGRUConfig, ParaLSTMConfig
from .modeling_pararnn import ParaGRUForCausalLM, ParaLSTMForCausalLM

log = logging.getLogger(__name__)

ARCHS = ("paragru", "paralstm", "llama", "mamba2")

_CONFIG_CLASSES = {"paragru": ParaGRUConfig, "paralstm": ParaLSTMConfig, "llama": LlamaConfig,
                   "mamba2": Mamba2Config}
_MODEL_CLASSES = {"paragru": ParaGRUForCausalLM, "paralstm": ParaLSTMForCausalLM,
                  "llama": LlamaForCausalLM, "mamba2": Mamba2ForCausalLM}
# Set by build_model for every architecture, never by a preset.
_FIXED = {"vocab_size", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id"}
# Integer sizes of the baselines (the ParaRNN config validates its own).
_BASELINE_SIZES = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "head_dim", "max_position_embeddings", "state_size", "expand",
                   "num_heads", "n_groups", "conv_kernel", "chunk_size"}


def _plain(cfg) -> dict:
    """A Mapping or OmegaConf DictConfig -> a plain dict (interpolations resolved)."""
    if isinstance(cfg, Mapping):
        try:
            from omegaconf import DictConfig, OmegaConf
        except ImportError:  # pragma: no cover - omegaconf is a project dependency
            return dict(cfg)
        return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    raise ValueError(f"model config is {type(cfg).__name__}; expected a mapping with an 'arch' key")


def allowed_fields(arch: str) -> set[str]:
    """Preset fields accepted for ``arch``: its config class's own fields (plus
    ``max_position_embeddings`` for Mamba2, which evaluation tools read)."""
    cls = _CONFIG_CLASSES[arch]
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    names = {f.name for f in dataclasses.fields(cls)} - base - _FIXED
    return names | ({"max_position_embeddings"} if arch == "mamba2" else set())


def split_preset(model_cfg) -> tuple[str, dict]:
    """Validate a preset's ``arch`` and field names; returns (arch, fields without 'arch')."""
    fields = _plain(model_cfg)
    arch = fields.pop("arch", None)
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}; expected one of {ARCHS}")
    allowed = allowed_fields(arch)
    for key, value in fields.items():
        if key in _FIXED:
            raise ValueError(f"model field {key!r} is set by build_model for every architecture (vocab "
                             "from the tokenizer, tied embeddings); remove it from the preset")
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"unknown field {key!r} for arch {arch!r}{hint} (expected one of "
                             f"{sorted(allowed)})")
        if arch in ("llama", "mamba2") and key in _BASELINE_SIZES:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{key}={value!r} for arch {arch!r}; expected a positive integer")
    return arch, fields


def model_config(model_cfg, vocab_size: int) -> PreTrainedConfig:
    """The transformers config of a preset (no weights): ``ParaGRUConfig``, ``ParaLSTMConfig``,
    ``LlamaConfig`` or ``Mamba2Config``, all with ``vocab_size`` and tied embeddings."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size!r}; expected a positive integer (the tokenizer's size)")
    arch, fields = split_preset(model_cfg)
    if arch in ("paragru", "paralstm") and "a_max" in fields and fields["a_max"] is None \
            and fields.get("cell_init", "lm") == "lm":
        # a run directory's config.yaml written before 2026-12-02, when null with cell_init=lm meant
        # the layers' 0.5 (as ParaRNNConfig.from_dict reads old config.json files): the same value
        # here, so that resuming and exporting old runs keep the trained behaviour
        log.warning("model.a_max=null with cell_init=lm is read as 0.5 (what it meant before "
                    "2026-12-02); write model.a_max=.inf for an unbounded cell")
        fields = {**fields, "a_max": 0.5}
    try:
        if arch == "llama":
            return llama_config(fields, vocab_size)
        if arch == "mamba2":
            return mamba2_config(fields, vocab_size)
        return _CONFIG_CLASSES[arch](**fields, vocab_size=vocab_size)
    except StrictDataclassError as err:  # transformers' own validation: report it as a ValueError
        raise ValueError(f"invalid {arch} config: {err}") from err


def build_model(model_cfg, vocab_size: int) -> PreTrainedModel:
    """A randomly initialized causal LM (``PreTrainedModel`` + ``GenerationMixin``) from a preset.

    Construct under ``torch.device("meta")`` to get the structure without memory."""
    config = model_config(model_cfg, vocab_size)
    arch = _plain(model_cfg)["arch"]
    return _MODEL_CLASSES[arch](config)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """``{"total", "non_embedding"}``: unique parameters (the tied head counted once); non-embedding
    excludes the token embedding (= the tied head). Works on the meta device."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - emb}


def newton_stats(model: torch.nn.Module, reset: bool = False) -> dict:
    """Newton telemetry of every ParaRNN layer of ``model`` (in module order) since the last reset,
    as flat ``newton/...`` keys for metrics.jsonl (``newtonlm.kernels.newton_telemetry``): per layer
    how many calls Newton answered (``newton/layer{i}/newton``, with mean ``iterations``, the
    ``extra_iterations`` beyond ``max_iters``, the last ``residual`` and its per-iteration
    ``history``), how many the sequential path answered by choice (``sequential``: no Newton, no
    residual) and how many fell back after Newton was rejected (``fallbacks``, ``fallback_rate``),
    and the same counts over all layers (``newton/fallback_rate``: rejected / Newton runs).
    An empty dict for models without ParaRNN layers (the baselines). ``reset`` clears the counters
    after reading."""
    from newtonlm.kernels import ParaRNN, newton_telemetry

    layers = [m for m in model.modules() if isinstance(m, ParaRNN)]
    if not layers:
        return {}
    out = newton_telemetry([layer.stats for layer in layers])
    if reset:
        for layer in layers:
            layer.stats.reset()
    return out
