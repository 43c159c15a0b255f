"""Data throughput benchmark: ``python -m newtonlm.data.bench [--json] [data=<name> overrides]``.

On the configured corpus (default: the bundled Shakespeare) and its tokenizer, measures

* ``tokenize``: the fast tokenizer alone over the training split (batches of documents);
* ``stream w=K``: the streaming train loader (read, clean, tokenize, pack, shuffle buffer, batch)
  with K DataLoader workers, from ``iter()`` (worker start and buffer fill included);
* ``prepare``: writing the pre-tokenized shards;
* ``shards w=K``: the train loader reading those shards (global shuffle; ``--no-stream``: only
  these, ``tokenize`` and ``prepare``);

each as MB/s of text and tokens/s (``loader tokens`` counts the input positions of the batches,
B x T per batch; MB/s converts with the corpus's bytes per token), and the margin over a model
that trains at ``--model-tokens-per-s`` (the demo model's measured rate: docs/data.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import tokenizers

from ..machine import machine_info, machine_line
from .config import compose_data_config, split_overrides
from .factory import build_loader
from .prepare import prepare_shards
from .sources import DocumentSource
from .tokenizer import TextEncoder, get_or_train_tokenizer


def _loader_rate(loader, min_tokens: int) -> tuple[float, int]:
    """(tokens per second, tokens) over the first batches reaching ``min_tokens`` input tokens."""
    start, tokens = time.perf_counter(), 0
    for batch in loader:
        tokens += batch["input_ids"].numel()
        if tokens >= min_tokens:
            break
    return tokens / (time.perf_counter() - start), tokens


def _row(stage: str, tokens: int, seconds: float) -> dict:
    return {"stage": stage, "tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens}


def run(cfg, seq_len: int, batch_size: int, min_tokens: int, workers: list[int], workdir: str,
        stream: bool = True) -> dict:
    """Every measurement of the module docstring (``stream=False``: no ``stream w=K`` rows);
    tokenizer and shards go to ``workdir``."""
    rows = []
    start = time.perf_counter()
    tokenizer = get_or_train_tokenizer(cfg, os.path.join(workdir, "tokenizer"))
    tokenizer_seconds = time.perf_counter() - start

    encoder = TextEncoder(tokenizer)
    texts = [t for name, src in cfg.sources.items()
             for _, t in DocumentSource(name, src).documents(split="train", val_fraction=cfg.val_fraction)]
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    start = time.perf_counter()
    n_tokens = sum(len(ids) for i in range(0, len(texts), cfg.tokenize_batch_docs)
                   for ids in encoder.encode(texts[i:i + cfg.tokenize_batch_docs]))
    seconds = time.perf_counter() - start
    bytes_per_token = text_bytes / n_tokens
    rows.append(_row("tokenize", n_tokens, seconds))

    for w in workers if stream else []:
        loader = build_loader(cfg, tokenizer, seq_len, batch_size, num_workers=w, seed=0)
        rate, tokens = _loader_rate(loader, min_tokens)
        rows.append(_row(f"stream w={w}", tokens, tokens / rate))

    shards_cfg = dataclasses.replace(cfg, format="shards", shards_dir=os.path.join(workdir, "shards"))
    start = time.perf_counter()
    indexes = prepare_shards(shards_cfg, tokenizer)
    seconds = time.perf_counter() - start
    tokens = sum(ix["num_tokens"] for ix in indexes)
    rows.append(_row("prepare", tokens, seconds))
    for w in workers:
        loader = build_loader(shards_cfg, tokenizer, seq_len, batch_size, num_workers=w, seed=0)
        rate, tokens = _loader_rate(loader, min_tokens)
        rows.append(_row(f"shards w={w}", tokens, tokens / rate))

    for row in rows:
        row["mb_per_s"] = row["tokens_per_s"] * bytes_per_token / 1e6
    return {  # the load average is read last: other processes on the machine skew every figure
        "machine": {**machine_info(), "tokenizers": tokenizers.__version__},
        "corpus": {"sources": list(cfg.sources), "train_text_mb": text_bytes / 1e6, "train_tokens": n_tokens,
                   "bytes_per_token": bytes_per_token, "tokenizer_size": len(tokenizer),
                   "tokenizer_seconds": tokenizer_seconds},
        "settings": {"seq_len": seq_len, "batch_size": batch_size, "min_tokens": min_tokens,
                     "shuffle_buffer": cfg.shuffle_buffer},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    overrides, options = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2_000_000, help="input tokens read per loader row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model-tokens-per-s", type=float, default=5000.0)
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming loader rows")
    parser.add_argument("--config-dir", help="Hydra config folder (default: the repository's configs/)")
    args = parser.parse_args(options)
    cfg = compose_data_config(overrides, args.config_dir)
    with tempfile.TemporaryDirectory() as workdir:
        result = run(cfg, args.seq_len, args.batch_size, args.tokens, args.workers, workdir,
                     stream=not args.no_stream)
    for row in result["rows"]:
        row["x_model"] = row["tokens_per_s"] / args.model_tokens_per_s
    if args.json:
        print(json.dumps(result, indent=1))
        return
    m, c = result["machine"], result["corpus"]
    print(f"# {machine_line(m)} (at the end); tokenizers {m['tokenizers']}")
    print(f"# corpus {c['sources']}: {c['train_text_mb']:.2f} MB train text, {c['train_tokens']} tokens "
          f"({c['bytes_per_token']:.2f} B/token), tokenizer {c['tokenizer_size']} "
          f"({c['tokenizer_seconds']:.1f} s to train)")
    print(f"# T={args.seq_len} B={args.batch_size}, x_model: over {args.model_tokens_per_s:.0f} tokens/s")
    print(f"{'stage':<12} {'MB/s':>8} {'tokens/s':>11} {'seconds':>8} {'x_model':>8}")
    for row in result["rows"]:
        print(f"{row['stage']:<12} {row['mb_per_s']:8.2f} {row['tokens_per_s']:11,.0f} {row['seconds']:8.2f} "
              f"{row['x_model']:8.0f}")


if __name__ == "__main__":
    main()
