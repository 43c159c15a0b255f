"""Tokenizers: train a byte-level BPE on a configured source, or load a pretrained one; the model's
vocabulary size is derived from the tokenizer, never set independently.

    python -m newtonlm.data.tokenizer [data=<name>] [data.tokenizer.vocab_size=8000 ...] [--out DIR]

trains (or loads from the cache) the tokenizer the data config describes and saves it in
transformers format (``tokenizer.json`` + ``tokenizer_config.json``) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import DataConfig, compose_data_config, load_data_config, split_overrides
from .errors import DataError
from .sources import DocumentSource

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenization, no unknown tokens) with ``vocab_size``
    entries, the specials BOS, EOS, PAD taking ids 0, 1, 2; returned as a
    ``transformers.PreTrainedTokenizerFast``. Training is deterministic for a given text order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def missing_tokenizer_folder(name_or_path: str) -> DataError | None:
    """The error for a tokenizer location that must be a local folder and does not exist, else
    None. A local folder: not a valid hub id (absolute, ``./``, more than one ``/``), or
    ``parent/name`` whose ``parent`` is an existing local folder (``runs/tok``: a missing folder, not
    a hub repository to try for a minute offline). Checked before transformers is asked, which
    answers "Repo id must be in the form ..." for a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name_or_path).expanduser()
    if path.exists():
        return None if path.is_dir() else DataError(
            f"tokenizer {name_or_path!r} is a file; expected a folder with tokenizer.json "
            "(as save_pretrained writes it) or a Hugging Face hub id")
    try:
        validate_repo_id(name_or_path)
        local = "/" in name_or_path and path.parent.is_dir()
    except HFValidationError:
        local = True
    if local:
        where = "" if path.is_absolute() else f" ({path.absolute()})"
        return DataError(f"tokenizer folder {name_or_path!r}{where} does not exist; expected "
                         "a folder with tokenizer.json (as save_pretrained writes it) or a Hugging Face "
                         "hub id such as 'org/name'")
    return None  # may be a hub id such as "gpt2" or "org/name"


def load_tokenizer(name_or_path: str):
    """A pretrained fast tokenizer by local path or hub name. It must define an EOS token (it
    separates documents); a missing PAD token is set to EOS (packing never pads)."""
    from transformers import AutoTokenizer

    if (missing := missing_tokenizer_folder(name_or_path)) is not None:
        raise missing
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # OSError for a missing path, hub errors offline, ...
        hub = "" if Path(name_or_path).expanduser().exists() else " (no such folder; tried as a hub id)"
        raise DataError(f"tokenizer {name_or_path!r}{hub} could not be loaded: "
                        f"{type(exc).__name__}: {exc}") from exc
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise DataError(f"tokenizer {name_or_path!r} is not a fast (Rust) tokenizer")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no EOS token; documents need a separator")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def max_token_id(tokenizer) -> int:
    """The largest id the tokenizer can produce (added tokens included)."""
    return max(max(tokenizer.get_vocab().values()), len(tokenizer) - 1)


def vocab_size_for_model(tokenizer, multiple: int = 64) -> int:
    """The model's embedding size: every id of ``tokenizer``, rounded up to ``multiple``."""
    if multiple < 1:
        raise ValueError(f"multiple={multiple}; expected >= 1")
    n = max_token_id(tokenizer) + 1
    return -(-n // multiple) * multiple


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the token -> id mapping: equal for tokenizers that produce the same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


class TextEncoder:
    """Documents -> token ids, EOS appended, with the fast tokenizer in batches.

    Special-token strings inside documents (a literal ``<|eos|>`` in the text) are encoded as
    ordinary text, so only the pipeline places EOS. Picklable (DataLoader workers).
    """

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer (needs backend_tokenizer)")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; documents need a separator")
        self.backend = Tokenizer.from_str(backend.to_str())
        self.backend.encode_special_tokens = True
        self.eos_id = int(tokenizer.eos_token_id)
        self.max_id = max_token_id(tokenizer)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """One int32 array ``[n_tokens + 1]`` per text (the text's ids, then EOS)."""
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [np.array(e.ids + [self.eos_id], dtype=np.int32) for e in encodings]


def training_texts(cfg: DataConfig) -> Iterator[str]:
    """Documents of the training split of ``cfg.tokenizer.train_sources`` (all sources when
    empty), in order, at most ``train_max_bytes`` of text shared among the sources by weight."""
    names = cfg.tokenizer.train_sources or list(cfg.sources)
    total_weight = sum(cfg.sources[n].weight for n in names)
    for name in names:
        budget = cfg.tokenizer.train_max_bytes * cfg.sources[name].weight / total_weight
        source = DocumentSource(name, cfg.sources[name])
        for _, text in source.documents(split="train", val_fraction=cfg.val_fraction):
            yield text
            budget -= len(text.encode("utf-8"))
            if budget <= 0:
                break


def _cache_key(cfg: DataConfig) -> str:
    names = cfg.tokenizer.train_sources or list(cfg.sources)
    spec = {
        "version": 1,
        "sources": {n: dataclasses.asdict(cfg.sources[n]) for n in names},
        "vocab_size": cfg.tokenizer.vocab_size,
        "train_max_bytes": cfg.tokenizer.train_max_bytes,
        "val_fraction": cfg.val_fraction,
        "specials": [BOS, EOS, PAD],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def get_or_train_tokenizer(cfg: DataConfig | Any, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of ``cfg.tokenizer``: the pretrained one when set; otherwise the BPE trained
    on the configured sources, loaded from ``<cache_dir>/bpe<vocab>-<hash>/`` when cached there,
    trained and saved on first use. ``cache_dir`` (e.g. a run directory) overrides
    ``cfg.tokenizer.cache_dir``. Several processes may call this at once (each rank of a job): a
    tokenizer is written to a private folder and renamed into place, the first rename wins."""
    from transformers import PreTrainedTokenizerFast

    cfg = load_data_config(cfg)
    if cfg.tokenizer.pretrained:
        return load_tokenizer(cfg.tokenizer.pretrained)
    folder = Path(cache_dir or cfg.tokenizer.cache_dir) / f"bpe{cfg.tokenizer.vocab_size}-{_cache_key(cfg)}"
    if not (folder / "tokenizer.json").is_file():
        tokenizer = train_bpe_tokenizer(training_texts(cfg), cfg.tokenizer.vocab_size)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its copy first; identical by determinism
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def main(argv: list[str] | None = None) -> None:
    overrides, options = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also save the tokenizer to this folder")
    parser.add_argument("--cache-dir", help="cache folder (default: data.tokenizer.cache_dir)")
    parser.add_argument("--config-dir", help="Hydra config folder (default: the repository's configs/)")
    args = parser.parse_args(options)
    cfg = compose_data_config(overrides, args.config_dir)
    start = time.perf_counter()
    tokenizer = get_or_train_tokenizer(cfg, args.cache_dir)
    seconds = time.perf_counter() - start
    if args.out:
        tokenizer.save_pretrained(args.out)
    print(json.dumps({
        "path": args.out or tokenizer.name_or_path,
        "tokenizer_size": len(tokenizer),
        "model_vocab_size": vocab_size_for_model(tokenizer),
        "bos_eos_pad_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "seconds": round(seconds, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
