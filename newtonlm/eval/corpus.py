"""Held-out text as one token stream with its exact byte count (for perplexity and bits per byte).

The documents of a configured split are tokenized with the model's own tokenizer (newtonlm.data's
``TextEncoder``: each document's ids then EOS, special-token strings inside text encoded as text)
and joined as the trainer packs them, behind one leading EOS::

    ids = [EOS, doc_1 ..., EOS, doc_2 ..., EOS, ...]        targets = ids[1:]

so every token of every document and every separator is a target exactly once, the first token of
each document predicted after an EOS as in training. ``text_mask`` marks the targets that are text
tokens (not separators), ``n_bytes`` is the UTF-8 size of the documents those tokens encode.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from newtonlm.data import DataConfig
from newtonlm.data.sources import SPLITS, DocumentSource
from newtonlm.data.tokenizer import TextEncoder


@dataclass
class TokenStream:
    """``ids`` int64 ``[n + 1]`` (leading EOS, then documents each followed by EOS);
    ``text_mask`` bool ``[n]``: target ``ids[j + 1]`` is a text token; ``n_bytes``: UTF-8 bytes of
    the documents; ``n_docs``: documents."""

    ids: np.ndarray
    text_mask: np.ndarray
    n_bytes: int
    n_docs: int

    @property
    def n_targets(self) -> int:
        return len(self.ids) - 1


def split_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """The non-blank documents of ``split`` ("val", "train" or "all") of every source of ``cfg``,
    source after source, each in its fixed (unshuffled) order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    if split == "val" and cfg.val_fraction == 0:
        raise ValueError("split=val with data.val_fraction=0: there is no held-out split (use split=all "
                         "on a corpus the model was not trained on)")
    for name, source_cfg in cfg.sources.items():
        for _, text in DocumentSource(name, source_cfg).documents(split=split, val_fraction=cfg.val_fraction):
            yield text


def token_stream(texts: Iterable[str], tokenizer, max_tokens: int | None = None,
                 batch_docs: int = 32) -> TokenStream:
    """Tokenize ``texts`` into a :class:`TokenStream`; with ``max_tokens``, stop after the document
    that brings the number of targets to at least ``max_tokens`` (whole documents only, so the
    byte count stays exact)."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}; expected a positive number of tokens (or None)")
    encoder = TextEncoder(tokenizer)
    pieces, masks = [np.array([encoder.eos_id], dtype=np.int64)], []
    n_bytes = n_docs = n_targets = 0
    texts = iter(texts)
    while max_tokens is None or n_targets < max_tokens:
        batch = [t for _, t in zip(range(batch_docs), texts)]
        for text, ids in zip(batch, encoder.encode(batch) if batch else []):
            pieces.append(ids.astype(np.int64))
            mask = np.ones(len(ids), dtype=bool)
            mask[-1] = False  # the EOS the encoder appended
            masks.append(mask)
            n_bytes += len(text.encode("utf-8"))
            n_docs += 1
            n_targets += len(ids)
            if max_tokens is not None and n_targets >= max_tokens:
                break
        if len(batch) < batch_docs:
            break
    if n_docs == 0:
        raise ValueError("no document to evaluate: the configured split is empty")
    return TokenStream(np.concatenate(pieces), np.concatenate(masks), n_bytes, n_docs)


def windows(stream: TokenStream, length: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Cut the stream into sequences of ``length`` targets: (ids ``[L + 1]``, text_mask ``[L]``) for
    window k = ``ids[k L : k L + L + 1]`` (the last one shorter), so every target appears once."""
    if length < 1:
        raise ValueError(f"length={length}; expected a positive number of tokens")
    for start in range(0, stream.n_targets, length):
        end = min(start + length, stream.n_targets)
        yield stream.ids[start:end + 1], stream.text_mask[start:end]
