"""The per-stream pipeline: per-source sequences -> weighted mixture -> shuffle buffer.

One stream is what one DataLoader worker of one rank produces. ``PipelineSpec`` (picklable) holds
everything needed and ``build(stream, num_streams, state)`` assembles the stages; every stage has
``state_dict()`` valid between two sequences, so a pipeline rebuilt from that state yields exactly
the sequences the original would have yielded next.

Randomness is counter-based (``rng``): the mixture's and the buffer's states are draw counters,
and the buffer's state also holds its sequences (``int32 [n, seq_len + 1]``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .packing import PackedSequences
from .rng import hash_text, mix64, random_below, uniform
from .shards import ShardSequences, ShardSet
from .sources import DocumentSource
from .tokenizer import TextEncoder

_ORDER, _SHARD_ORDER, _MIX, _BUFFER = 1, 2, 3, 4  # purposes of the random keys


class Mixture:
    """Each sequence comes from source i with probability weights[i] / sum(weights) (so weights
    are shares of tokens). A finished source (finite epochs) leaves the draw to the others; the
    draw counter advances only when a sequence is delivered, so a restored mixture, which knows the
    finished sources in advance, makes the same choices."""

    def __init__(self, streams: list, weights: list[float], key: int, draws: int = 0):
        assert len(streams) == len(weights) > 0
        self.streams = streams
        self.weights = np.asarray(weights, dtype=np.float64)
        self.key = key
        self.draws = draws

    def state_dict(self) -> dict:
        return {"draws": self.draws, "sources": [s.state_dict() for s in self.streams]}

    def __iter__(self) -> Iterator[np.ndarray]:
        iterators = [iter(s) for s in self.streams]
        active = np.array([not s.exhausted for s in self.streams])
        while active.any():
            weights = np.where(active, self.weights, 0.0)
            cumulative = np.cumsum(weights) / weights.sum()
            i = min(int(np.searchsorted(cumulative, uniform(self.key, self.draws), side="right")),
                    len(weights) - 1)
            seq = next(iterators[i], None)
            if seq is None:
                active[i] = False
                continue
            self.draws += 1
            yield seq


class ShuffleBuffer:
    """A shuffle buffer of ``size`` sequences (0: pass-through): once full, each incoming sequence
    replaces a uniformly drawn one, which is emitted; at the end of a finite stream the rest is
    emitted in random order."""

    def __init__(self, upstream: Mixture, size: int, key: int, seq_len: int, draws: int = 0,
                 items: torch.Tensor | None = None):
        self.upstream = upstream
        self.size = size
        self.key = key
        self.seq_len = seq_len
        self.draws = draws
        self.items = [] if items is None else list(items.numpy())

    def state_dict(self) -> dict:
        items = (torch.from_numpy(np.stack(self.items)) if self.items
                 else torch.zeros(0, self.seq_len + 1, dtype=torch.int32))
        return {"draws": self.draws, "items": items, "upstream": self.upstream.state_dict()}

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.size == 0:
            yield from self.upstream
            return
        for seq in self.upstream:
            if len(self.items) < self.size:
                self.items.append(seq)
                continue
            j = random_below(self.size, self.key, self.draws)
            self.draws += 1
            out, self.items[j] = self.items[j], seq
            yield out
        while self.items:
            j = random_below(len(self.items), self.key, self.draws)
            self.draws += 1
            out = self.items[j]
            self.items[j] = self.items[-1]
            self.items.pop()
            yield out


@dataclass
class PipelineSpec:
    """Everything a stream needs (picklable into DataLoader workers).

    ``sources``: DocumentSource objects (tokenized on the fly with ``encoder``) or ShardSet objects
    (pre-tokenized), with mixture ``weights``. ``split``: train / val / all (streaming only; a
    ShardSet is already one split). ``shuffle``: file order per epoch and a buffer of
    ``shuffle_buffer`` sequences (streaming), a global permutation per epoch (shards, which need
    no buffer). ``num_epochs``: None for an endless stream.
    """

    sources: list
    weights: list[float]
    seq_len: int
    split: str = "train"
    encoder: TextEncoder | None = None
    val_fraction: float = 0.0
    shuffle: bool = False
    shuffle_buffer: int = 0
    seed: int = 0
    num_epochs: int | None = None
    batch_docs: int = 32

    def build(self, stream: int, num_streams: int, state: dict | None = None) -> ShuffleBuffer:
        """The pipeline of stream ``stream`` of ``num_streams``, resumed from ``state`` if given."""
        state = state or {}
        upstream_state = state.get("upstream", {})
        source_states = upstream_state.get("sources", [None] * len(self.sources))
        streams = []
        for source, source_state in zip(self.sources, source_states):
            if isinstance(source, ShardSet):
                key = mix64(self.seed, _SHARD_ORDER, hash_text(source.name)) if self.shuffle else None
                streams.append(ShardSequences(
                    source, self.seq_len, stream=stream, num_streams=num_streams, shuffle_key=key,
                    num_epochs=self.num_epochs, state=source_state))
            else:
                assert isinstance(source, DocumentSource) and self.encoder is not None
                streams.append(PackedSequences(
                    source, self.encoder, self.seq_len, split=self.split, val_fraction=self.val_fraction,
                    stream=stream, num_streams=num_streams,
                    order_seed=mix64(self.seed, _ORDER) if self.shuffle else None,
                    num_epochs=self.num_epochs, batch_docs=self.batch_docs, state=source_state))
        mixture = Mixture(streams, self.weights, mix64(self.seed, _MIX, stream, num_streams),
                          draws=upstream_state.get("draws", 0))
        size = self.shuffle_buffer if self.shuffle and not isinstance(self.sources[0], ShardSet) else 0
        return ShuffleBuffer(mixture, size, mix64(self.seed, _BUFFER, stream, num_streams), self.seq_len,
                             draws=state.get("draws", 0), items=state.get("items"))
