"""The language models: ParaGRU and ParaLSTM LMs, and the Llama and Mamba2 baselines.

All four are transformers ``PreTrainedModel`` + ``GenerationMixin`` classes (``save_pretrained``,
``from_pretrained``, ``generate()`` work alike); importing this package registers the model types
"paragru" and "paralstm" with ``AutoConfig`` and ``AutoModelForCausalLM``.

* :func:`build_model` (preset, vocab_size) -> model; :func:`model_config` -> its config only;
* :func:`newton_stats` (model) -> per-layer Newton telemetry (empty for baselines);
* :func:`flops_per_token` (preset, vocab_size, seq_len) -> training FLOPs per token (for MFU);
* :func:`count_parameters` (model) -> total and non-embedding parameter counts;
* presets: ``configs/model/<arch>_<size>.yaml`` (:func:`load_preset`), table: ``python -m
  newtonlm.models.sizes``; throughput: ``python -m newtonlm.models.bench``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_pararnn import ParaGRUConfig, ParaLSTMConfig, ParaRNNConfig
from .factory import ARCHS, build_model, count_parameters, model_config, newton_stats
from .flops import flops_per_token
from .modeling_pararnn import ParaGRUForCausalLM, ParaLSTMForCausalLM, ParaRNNForCausalLM
from .presets import SIZES, load_preset, preset_names

for _config_cls, _model_cls in ((ParaGRUConfig, ParaGRUForCausalLM), (ParaLSTMConfig, ParaLSTMForCausalLM)):
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)

__all__ = [
    "ARCHS", "SIZES", "ParaGRUConfig", "ParaGRUForCausalLM", "ParaLSTMConfig", "ParaLSTMForCausalLM",
    "ParaRNNConfig", "ParaRNNForCausalLM", "build_model", "count_parameters", "flops_per_token",
    "load_preset", "model_config", "newton_stats", "preset_names",
]
