"""Shared helpers of the data tests (no tests here): small synthetic corpora with unique
documents, a tiny byte-level BPE trained on them, and references computed with the tokenizer's
own ``__call__`` (independent of the pipeline's batch encoder)."""

from __future__ import annotations

import json
import random
from functools import cache
from itertools import islice
from pathlib import Path

from newtonlm.data import DataConfig, SourceConfig, train_bpe_tokenizer

WORDS = ("the king queen lord sword crown night day love death heaven earth fire water stone bread wine "
         "horse ship sea land gold iron bone blood breath voice hand heart eye ear mouth word song tale "
         "ghost storm wind rain snow sun moon star field wood tree river hill road gate tower hall").split()


def make_documents(n: int, seed: int, min_words: int = 5, max_words: int = 60) -> list[str]:
    """``n`` distinct documents of random words (each opens with a unique tag)."""
    rng = random.Random(seed)
    return [f"doc{seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
            + ("\n" if i % 3 else f".\nÆ {seed}-{i} déjà ✓\n")
            for i in range(n)]


def write_jsonl_corpus(folder: Path, n_files: int = 4, docs_per_file: int = 25, seed: int = 0,
                       field: str = "text") -> list[tuple[Path, list[str]]]:
    """``n_files`` jsonl files under ``folder``; returns (path, documents) per file, sorted by path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in range(n_files):
        docs = make_documents(docs_per_file, seed * 1000 + f)
        path = folder / f"part-{f:02d}.jsonl"
        path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
        out.append((path, docs))
    return out


def files_config(paths: list, **kw) -> DataConfig:
    """A DataConfig with one ``files`` source named ``local``; ``kw`` sets DataConfig fields."""
    return DataConfig(sources={"local": SourceConfig(kind="files", paths=[str(p) for p in paths])}, **kw)


@cache
def tiny_tokenizer():
    """A byte-level BPE with 400 entries trained on synthetic documents (about 0.1 s)."""
    return train_bpe_tokenizer(make_documents(300, seed=12345), vocab_size=400)


def reference_ids(tokenizer, text: str) -> list[int]:
    """A document's ids as the packer must produce them: the text's tokens, then EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def windows(stream: list[int], seq_len: int) -> list[list[int]]:
    """All windows of seq_len + 1 tokens starting every seq_len tokens."""
    return [stream[i:i + seq_len + 1] for i in range(0, len(stream) - seq_len, seq_len)]


def take(loader, n: int) -> list[dict]:
    return list(islice(iter(loader), n))
