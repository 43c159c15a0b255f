"""Typed data configuration: dataclasses usable as Hydra structured configs.

``DataConfig`` is registered in Hydra's ConfigStore as ``data/schema`` when this module is
imported, and every YAML file in ``configs/data/`` starts from it (``defaults: [schema, _self_]``),
so a misspelled key or a value of the wrong type is an error when Hydra composes the config.
``load_data_config`` turns the composed node (or a plain dict) into a checked DataConfig;
``compose_data_config`` composes one of those YAML files with overrides (the command-line tools).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..paths import CONFIG_DIR
from .errors import DataError

SOURCE_KINDS = ("shakespeare", "bible", "files", "hub")
FORMATS = ("stream", "shards")


@dataclass
class SourceConfig:
    """One corpus of a mixture.

    ``kind`` picks the reader:
      * ``shakespeare`` / ``bible``: the bundled corpora (no other field is read);
      * ``files``: ``paths``, each a file, a directory (searched recursively) or a glob, of
        ``.txt`` (a file is a document), ``.jsonl`` (a line is a document), ``.json`` (a list of
        records) or ``.parquet`` (a row is a document); records take their text from
        ``text_field``;
      * ``hub``: a dataset read with ``datasets.load_dataset(hub_name, hub_config,
        split=hub_split, data_files=hub_data_files or None, streaming=True)``.
    ``weight``: share of the mixture's sequences (tokens) drawn from this source.
    ``txt_max_doc_bytes``: a ``.txt`` file larger than this is cut at line ends into documents of
    at most this size, so that one huge file still spreads over all ranks and workers.
    """

    kind: str = "files"
    weight: float = 1.0
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    hub_data_files: list[str] = field(default_factory=list)
    txt_max_doc_bytes: int = 1_000_000


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from.

    ``pretrained``: a path or hub name of a pretrained fast tokenizer; when null, a byte-level BPE
    of ``vocab_size`` entries (specials bos/eos/pad included) is trained on the training split of
    ``train_sources`` (names in ``sources``; empty: all sources), reading at most
    ``train_max_bytes`` of text split over the sources by weight, and cached under ``cache_dir``.
    """

    pretrained: str | None = None
    vocab_size: int = 8000
    train_sources: list[str] = field(default_factory=list)
    train_max_bytes: int = 100_000_000
    cache_dir: str = ".cache/newtonlm/tokenizers"


@dataclass
class DataConfig:
    """The data pipeline.

    ``sources``: name -> SourceConfig (the name labels errors and the shard folder).
    ``val_fraction``: share of each source's documents held out for validation, chosen by a hash of
    the document's identity (file key and index), independent of the seed; 0 disables validation.
    ``val_sequences``: sequences in one validation pass, in total over the ranks: the first ones of
    the validation split, the same set every time and on any number of ranks (each rank scores its
    share in micro-batches).
    ``shuffle``: shuffle the training stream (file order per epoch and a buffer of
    ``shuffle_buffer`` sequences for streaming; a global permutation per epoch for shards).
    ``num_workers``: DataLoader worker processes per rank for training (0: in the main process).
    ``tokenize_batch_docs``: documents tokenized per call of the fast tokenizer.
    ``format``: ``stream`` (tokenize on the fly) or ``shards`` (read pre-tokenized shards written
    by ``python -m newtonlm.data.prepare`` into ``shards_dir``).
    """

    sources: dict[str, SourceConfig] = field(default_factory=dict)
    val_fraction: float = 0.02
    val_sequences: int = 128
    shuffle: bool = True
    shuffle_buffer: int = 256
    num_workers: int = 1
    tokenize_batch_docs: int = 32
    format: str = "stream"
    shards_dir: str | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


def register_configs() -> None:
    """Register the schema as ``data/schema`` (the YAML files' first default)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="data", name="schema", node=DataConfig)


register_configs()


def validate_data_config(cfg: DataConfig) -> DataConfig:
    """Check every value a user sets; returns ``cfg`` or raises DataError naming the field."""
    if not cfg.sources:
        raise DataError("data.sources is empty: configure at least one source (e.g. data=shakespeare)")
    for name, src in cfg.sources.items():
        where = f"data.sources.{name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise DataError(f"{where}: source names must be [A-Za-z0-9_.-] (a folder name), got {name!r}")
        if src.kind not in SOURCE_KINDS:
            raise DataError(f"{where}.kind={src.kind!r}; expected one of {SOURCE_KINDS}")
        if not src.weight > 0:
            raise DataError(f"{where}.weight={src.weight}; expected a positive number")
        if src.kind == "files" and not src.paths:
            raise DataError(f"{where}.paths is empty; kind=files needs files, directories or globs")
        if src.kind == "hub" and not src.hub_name:
            raise DataError(f"{where}.hub_name is not set; kind=hub needs a dataset name")
        if src.txt_max_doc_bytes < 1:
            raise DataError(f"{where}.txt_max_doc_bytes={src.txt_max_doc_bytes}; expected >= 1")
    if not 0 <= cfg.val_fraction < 1:
        raise DataError(f"data.val_fraction={cfg.val_fraction}; expected 0 <= val_fraction < 1")
    for key in ("val_sequences", "shuffle_buffer", "num_workers"):
        if getattr(cfg, key) < 0:
            raise DataError(f"data.{key}={getattr(cfg, key)}; expected >= 0")
    if cfg.tokenize_batch_docs < 1:
        raise DataError(f"data.tokenize_batch_docs={cfg.tokenize_batch_docs}; expected >= 1")
    if cfg.format not in FORMATS:
        raise DataError(f"data.format={cfg.format!r}; expected one of {FORMATS}")
    if cfg.format == "shards" and not cfg.shards_dir:
        raise DataError("data.format=shards needs data.shards_dir (where prepare wrote the shards)")
    tok = cfg.tokenizer
    if tok.pretrained is None and tok.vocab_size < 260:
        raise DataError(f"data.tokenizer.vocab_size={tok.vocab_size}; a byte-level BPE needs >= 260")
    for name in tok.train_sources:
        if name not in cfg.sources:
            raise DataError(f"data.tokenizer.train_sources names {name!r}; sources are {list(cfg.sources)}")
    return cfg


def load_data_config(cfg: Any) -> DataConfig:
    """A validated DataConfig from a DataConfig, an OmegaConf node or a plain mapping."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(cfg, DataConfig):
        try:
            merged = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
            cfg = OmegaConf.to_object(merged)
        except OmegaConfBaseException as exc:
            raise DataError(f"invalid data config: {exc}") from exc
    # Keys forced in with Hydra's "+key=value" survive the merge as stray attributes.
    parts = [("data", cfg), ("data.tokenizer", cfg.tokenizer)]
    parts += [(f"data.sources.{name}", src) for name, src in cfg.sources.items()]
    for where, part in parts:
        unknown = set(vars(part)) - {f.name for f in dataclasses.fields(part)}
        if unknown:
            raise DataError(f"{where} has no field(s) {sorted(unknown)}; "
                            f"fields: {[f.name for f in dataclasses.fields(part)]}")
    return validate_data_config(cfg)


def compose_data_config(overrides: list[str] = (), config_dir: str | Path | None = None) -> DataConfig:
    """Compose ``configs/data/<name>.yaml`` with Hydra overrides, e.g.
    ``["data=bible", "data.val_fraction=0.05"]`` (``data=shakespeare`` when no ``data=`` is given).
    """
    from hydra import compose, initialize_config_dir

    overrides = list(overrides)
    group = [o for o in overrides if o.startswith("data=")]
    rest = [o for o in overrides if not o.startswith("data=")]
    selected = "+" + (group[-1] if group else "data=shakespeare")
    config_dir = Path(config_dir or CONFIG_DIR).resolve()
    if not (config_dir / "data").is_dir():
        raise DataError(f"config directory {config_dir} has no data/ group; pass --config-dir")
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose(overrides=[selected, *rest])
    return load_data_config(cfg.data)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split a command line into Hydra overrides (``key=value``) and the tool's own ``--options``."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    options = [a for a in argv if a not in overrides]
    return overrides, options
