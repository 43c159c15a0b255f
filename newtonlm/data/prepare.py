"""Pre-tokenize a data config's sources into memory-mapped token shards.

    python -m newtonlm.data.prepare [data=<name>] data.shards_dir=DIR [overrides] [--tokenizer PATH]

For every source and split (train, val: the same deterministic document split as streaming), the
documents are tokenized in order with EOS appended and written to
``<shards_dir>/<source>/<split>/`` (see ``shards``). The tokenizer is ``--tokenizer`` or the one
the config describes (``get_or_train_tokenizer``). A split is written to a temporary folder and
renamed into place; an older version of it is replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from itertools import islice
from pathlib import Path

from .config import DataConfig, compose_data_config, load_data_config, split_overrides
from .errors import DataError
from .shards import INDEX, ShardWriter, token_dtype
from .sources import DocumentSource
from .tokenizer import TextEncoder, get_or_train_tokenizer, load_tokenizer, tokenizer_fingerprint


def prepare_split(cfg: DataConfig, name: str, split: str, tokenizer, out: Path,
                  shard_tokens: int = 1 << 28) -> dict:
    """Write source ``name``'s ``split`` to ``out`` (a new folder); returns its index."""
    encoder = TextEncoder(tokenizer)
    source = DocumentSource(name, cfg.sources[name])
    writer = ShardWriter(out, token_dtype(encoder.max_id), shard_tokens)
    docs = source.documents(split=split, val_fraction=cfg.val_fraction)
    text_bytes = 0
    while chunk := [text for _, text in islice(docs, cfg.tokenize_batch_docs)]:
        text_bytes += sum(len(t.encode("utf-8")) for t in chunk)
        for ids in encoder.encode(chunk):
            writer.write(ids)
    return writer.close({
        "source_name": name, "split": split, "source": dataclasses.asdict(cfg.sources[name]),
        "val_fraction": cfg.val_fraction, "text_bytes": text_bytes, "eos_id": encoder.eos_id,
        "tokenizer_max_id": encoder.max_id, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    })


def prepare_shards(cfg: DataConfig, tokenizer, shards_dir: str | os.PathLike | None = None,
                   shard_tokens: int = 1 << 28) -> list[dict]:
    """Prepare every source's train and val splits under ``shards_dir`` (default
    ``cfg.shards_dir``); returns their indexes."""
    cfg = load_data_config(cfg)
    root = Path(shards_dir or cfg.shards_dir or "")
    if not str(root):
        raise DataError("no output folder: set data.shards_dir")
    indexes = []
    for name in cfg.sources:
        for split in ("train", "val") if cfg.val_fraction > 0 else ("train",):
            final = root / name / split
            tmp = final.with_name(f"{split}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            index = prepare_split(cfg, name, split, tokenizer, tmp, shard_tokens)
            if final.exists():
                if not (final / INDEX).is_file():
                    raise DataError(f"{final} exists and is not a shard folder; not replacing it")
                shutil.rmtree(final)
            os.rename(tmp, final)
            indexes.append(index)
    return indexes


def main(argv: list[str] | None = None) -> None:
    overrides, options = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="tokenizer folder or hub name (default: the config's)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file")
    parser.add_argument("--config-dir", help="Hydra config folder (default: the repository's configs/)")
    args = parser.parse_args(options)
    cfg = compose_data_config(overrides, args.config_dir)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else get_or_train_tokenizer(cfg)
    start = time.perf_counter()
    indexes = prepare_shards(cfg, tokenizer, shard_tokens=args.shard_tokens)
    seconds = time.perf_counter() - start
    keys = ("source_name", "split", "num_documents", "num_tokens", "text_bytes", "dtype")
    summary = [{k: ix[k] for k in keys} for ix in indexes]
    print(json.dumps({"shards_dir": cfg.shards_dir, "seconds": round(seconds, 2), "splits": summary},
                     indent=1))


if __name__ == "__main__":
    main()
