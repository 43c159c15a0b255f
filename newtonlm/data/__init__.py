"""Streaming data pipeline: text sources -> tokenizer -> packed sequences -> resumable loaders.

The trainer's API::

    from newtonlm.data import (build_dataloaders, get_or_train_tokenizer, load_data_config,
                               vocab_size_for_model)

    cfg = load_data_config(hydra_cfg.data)               # DataConfig (validated; typos are errors)
    tokenizer = get_or_train_tokenizer(cfg, run_dir)     # PreTrainedTokenizerFast, bos/eos/pad set
    vocab_size = vocab_size_for_model(tokenizer)         # len(tokenizer) rounded up to 64: the model's
    train_loader, val_loader = build_dataloaders(
        cfg, tokenizer, seq_len, micro_batch_size, rank, world_size, seed, model_vocab_size=vocab_size)
    for batch in train_loader:                           # endless
        batch["input_ids"], batch["targets"]             # LongTensor [B, T]; targets = the next tokens
        ...
        checkpoint["data"] = all_gather_object(train_loader.state_dict())   # every rank's
    train_loader.load_state_dict(checkpoint["data"][rank])  # same layout: next batch == the uninterrupted one
    note = train_loader.load_states(checkpoint["data"])     # another number of ranks / workers / micro-batch:
                                                            # None or a line saying what was re-mapped
    for batch in val_loader: ...                         # this rank's share of cfg.val_sequences, fixed

``build_loader(cfg, tokenizer, seq_len, batch_size, split=..., num_epochs=...)`` builds one loader
(e.g. ``split="all", num_epochs=1`` for one pass over a held-out corpus).

Command-line tools (Hydra overrides, e.g. ``data=bible data.val_fraction=0.05``):
``python -m newtonlm.data.tokenizer`` (train/save the tokenizer), ``python -m newtonlm.data.prepare``
(pre-tokenized shards), ``python -m newtonlm.data.bench [--json]`` (throughput).

Modules, in the order data flows: ``config`` (DataConfig), ``bundled`` (Shakespeare, KJV Bible),
``readers`` (file formats, hub), ``sources`` (document order, split, sharding), ``tokenizer``,
``packing`` (documents -> sequences), ``shards`` (pre-tokenized storage), ``pipeline`` (mixture,
shuffle buffer), ``loader`` (DataLoader with exact state), ``factory``. See docs/data.md.

Names are imported on first use, so that ``python -m newtonlm.data.<tool>`` runs its module
without the package having imported it already.
"""

from importlib import import_module

from .config import DataConfig, SourceConfig, TokenizerConfig, compose_data_config, load_data_config
from .errors import DataError

_LAZY = {
    "build_dataloaders": "factory", "build_loader": "factory",
    "FixedBatches": "loader", "ResumableLoader": "loader", "ValidationSet": "loader",
    "prepare_shards": "prepare",
    "get_or_train_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "train_bpe_tokenizer": "tokenizer", "vocab_size_for_model": "tokenizer",
}

__all__ = ["DataConfig", "SourceConfig", "TokenizerConfig", "DataError", "compose_data_config",
           "load_data_config", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
