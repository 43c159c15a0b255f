"""The factory the trainer calls: a data config -> train and validation loaders, after start-up
checks (paths exist, corpora are non-empty, shards fit the tokenizer and the model's vocabulary)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import DataConfig, load_data_config
from .errors import DataError
from .loader import ResumableLoader, ValidationSet
from .pipeline import PipelineSpec
from .shards import ShardSet
from .sources import SPLITS, DocumentSource
from .tokenizer import TextEncoder, max_token_id, tokenizer_fingerprint, vocab_size_for_model


def open_shards(cfg: DataConfig, name: str, split: str, tokenizer, model_vocab_size: int) -> ShardSet:
    """The prepared shards of source ``name``'s ``split``, checked against the configuration they
    must come from, the tokenizer, and the model's vocabulary size."""
    shards = ShardSet(Path(cfg.shards_dir) / name / split)
    index, where = shards.index, shards.folder / "index.json"
    fingerprint = tokenizer_fingerprint(tokenizer)
    if index.get("tokenizer_fingerprint") != fingerprint:
        raise DataError(f"{where}: prepared with another tokenizer (fingerprint "
                        f"{index.get('tokenizer_fingerprint')}, this one {fingerprint}); "
                        f"re-run prepare with this tokenizer")
    expected = {"source": dataclasses.asdict(cfg.sources[name]), "val_fraction": cfg.val_fraction}
    for key, value in expected.items():
        if index.get(key) != value:
            raise DataError(f"{where}: prepared with {key}={index.get(key)!r} but the config has {value!r}; "
                            f"re-run prepare")
    if index["max_token_id"] >= model_vocab_size:
        raise DataError(f"{where}: token id {index['max_token_id']} >= the model's vocabulary size "
                        f"{model_vocab_size}")
    return shards


def build_loader(cfg: DataConfig | Any, tokenizer, seq_len: int, batch_size: int, *, split: str = "train",
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int | None = None,
                 shuffle: bool | None = None, num_epochs: int | None = None,
                 model_vocab_size: int | None = None) -> ResumableLoader:
    """One loader of ``split`` (train / val; all: every document, streaming only) for this rank.
    ``num_workers`` / ``shuffle`` default to the config's; ``num_epochs`` None: endless.
    ``model_vocab_size`` defaults to ``vocab_size_for_model(tokenizer)``; any token id at or above
    it stops here, at start-up."""
    cfg = load_data_config(cfg)
    if split not in SPLITS:
        raise DataError(f"split={split!r}; expected one of {SPLITS}")
    if split == "val" and cfg.val_fraction == 0:
        raise DataError("split=val with data.val_fraction=0: there is no validation data")
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len={seq_len}, batch_size={batch_size}; expected >= 1")
    vocab = vocab_size_for_model(tokenizer) if model_vocab_size is None else model_vocab_size
    if max_token_id(tokenizer) >= vocab:
        raise DataError(f"the tokenizer produces ids up to {max_token_id(tokenizer)}, at or above the "
                        f"model's vocabulary size {vocab}; derive it with vocab_size_for_model(tokenizer)")
    names = list(cfg.sources)
    if cfg.format == "shards":
        if split == "all":
            raise DataError("split=all is not available for data.format=shards (prepare writes train, val)")
        sources: list = [open_shards(cfg, n, split, tokenizer, vocab) for n in names]
        encoder = None
    else:
        sources = [DocumentSource(n, cfg.sources[n]) for n in names]
        for source in sources:
            source.check_not_empty()
        encoder = TextEncoder(tokenizer)
    spec = PipelineSpec(sources=sources, weights=[cfg.sources[n].weight for n in names], seq_len=seq_len,
                        split=split, encoder=encoder, val_fraction=cfg.val_fraction,
                        shuffle=cfg.shuffle if shuffle is None else shuffle,
                        shuffle_buffer=cfg.shuffle_buffer, seed=seed, num_epochs=num_epochs,
                        batch_docs=cfg.tokenize_batch_docs)
    return ResumableLoader(spec, batch_size, rank=rank, world_size=world_size,
                           num_workers=cfg.num_workers if num_workers is None else num_workers)


def build_dataloaders(cfg: DataConfig | Any, tokenizer, seq_len: int, micro_batch_size: int, rank: int = 0,
                      world_size: int = 1, seed: int = 0,
                      model_vocab_size: int | None = None) -> tuple[ResumableLoader, ValidationSet | None]:
    """(train_loader, val_loader) for this rank.

    train_loader: endless, shuffled per ``cfg`` and ``seed``, resumable (``state_dict`` /
    ``load_state_dict``); val_loader: this rank's share of the run's validation set, the first
    ``cfg.val_sequences`` sequences of the validation split (unshuffled, independent of ``seed``
    and of the number of ranks: see ``ValidationSet``), the same batches on every iteration, or
    None when ``val_fraction`` or ``val_sequences`` is 0. Batches: ``{"input_ids": LongTensor [B, T],
    "targets": LongTensor [B, T]}`` with B = micro_batch_size, T = seq_len; targets are the next
    tokens (already shifted, see ``ResumableLoader``).
    """
    cfg = load_data_config(cfg)
    common = dict(rank=rank, world_size=world_size, model_vocab_size=model_vocab_size)
    train = build_loader(cfg, tokenizer, seq_len, micro_batch_size, split="train", seed=seed, **common)
    if cfg.val_fraction == 0 or cfg.val_sequences == 0:
        return train, None
    # one stream (rank 0 of 1) on every rank: the set does not depend on the world size
    val = build_loader(cfg, tokenizer, seq_len, min(micro_batch_size, cfg.val_sequences), split="val",
                       seed=0, num_workers=0, shuffle=False, model_vocab_size=model_vocab_size)
    return train, ValidationSet(val, cfg.val_sequences, rank=rank, world_size=world_size,
                                batch_size=micro_batch_size)
