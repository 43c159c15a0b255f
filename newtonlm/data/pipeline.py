"""The per-stream pipeline: per-source sequences -> weighted mixture -> shuffle buffer.

One stream is what one DataLoader worker of one rank produces. ``PipelineSpec`` (picklable) holds
everything needed and ``build(stream, num_streams, state)`` assembles the stages; every stage has
``state_dict()`` valid between two sequences, so a pipeline rebuilt from that state yields exactly
the sequences the original would have yielded next.

Randomness is counter-based (``rng``): the mixture's and the buffer's states are draw counters,
and the buffer's state also holds its sequences (``int32 [n, seq_len + 1]``).
``remap_stream_states`` turns the states of S streams into those of S' streams with exact document
coverage (resume on another number of ranks or workers). Pre-tokenized shards do not use the
per-stream stages: ``PipelineSpec.shard_order`` gives their global order (``shards.ShardOrder``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError
from .packing import PackedSequences, fresh_state
from .rng import hash_text, mix64, random_below, uniform
from .shards import ShardOrder, ShardSet
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
                    int(np.flatnonzero(active)[-1]))  # the last active one if the sum rounds below 1
            seq = next(iterators[i], None)
            if seq is None:
                active[i] = False
                continue
            self.draws += 1
            yield seq


class ShuffleBuffer:
    """A shuffle buffer of ``size`` sequences (0: pass-through): once full, each incoming sequence
    replaces a uniformly drawn one, which is emitted; at the end of a finite stream the rest is
    emitted in random order. A buffer holding more than ``size`` sequences (after a re-map onto
    fewer streams) first emits uniformly drawn ones until it holds ``size``, before reading more.
    ``generation``: how many re-maps the stream descends from (part of its random keys, kept in
    the state)."""

    def __init__(self, upstream: Mixture, size: int, key: int, seq_len: int, draws: int = 0,
                 items: torch.Tensor | None = None, generation: int = 0):
        self.upstream = upstream
        self.size = size
        self.key = key
        self.seq_len = seq_len
        self.draws = draws
        self.items = [] if items is None else list(items.numpy())
        self.generation = generation

    def state_dict(self) -> dict:
        items = (torch.from_numpy(np.stack(self.items)) if self.items
                 else torch.zeros(0, self.seq_len + 1, dtype=torch.int32))
        return {"generation": self.generation, "draws": self.draws, "items": items,
                "upstream": self.upstream.state_dict()}

    def _draw(self) -> np.ndarray:
        """Remove and return a uniformly drawn item."""
        j = random_below(len(self.items), self.key, self.draws)
        self.draws += 1
        out = self.items[j]
        self.items[j] = self.items[-1]
        self.items.pop()
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        upstream = iter(self.upstream)
        while True:
            while len(self.items) > self.size:  # before reading on, so the state never loses one
                yield self._draw()
            seq = next(upstream, None)
            if seq is None:
                break
            if self.size == 0:
                yield seq
                continue
            if len(self.items) < self.size:
                self.items.append(seq)
                continue
            j = random_below(self.size, self.key, self.draws)
            self.draws += 1
            out, self.items[j] = self.items[j], seq
            yield out
        while self.items:
            yield self._draw()


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

    @property
    def is_shards(self) -> bool:
        """Pre-tokenized shards (every source a ShardSet) rather than streaming documents."""
        kinds = {isinstance(src, ShardSet) for src in self.sources}
        if len(kinds) != 1:
            raise DataError("a pipeline mixes ShardSet and DocumentSource sources; expected one kind")
        return kinds == {True}

    def shard_order(self) -> ShardOrder:
        """The global order of the shard sequences (``shards.ShardOrder``): its keys depend on the
        seed and the source names only, never on the rank or the number of streams."""
        assert self.is_shards
        keys = [mix64(self.seed, _SHARD_ORDER, hash_text(src.name)) if self.shuffle else None
                for src in self.sources]
        return ShardOrder(self.sources, self.weights, self.seq_len, shuffle_keys=keys,
                          mix_key=mix64(self.seed, _MIX), num_epochs=self.num_epochs)

    def build(self, stream: int, num_streams: int, state: dict | None = None) -> ShuffleBuffer:
        """The streaming pipeline of stream ``stream`` of ``num_streams``, resumed from ``state``
        if given. The document order of an epoch is global (``_ORDER`` key: seed only); the
        mixture's and the buffer's keys are per stream and per generation (re-maps so far)."""
        assert not self.is_shards
        state = state or {}
        generation = state.get("generation", 0)
        upstream_state = state.get("upstream", {})
        source_states = upstream_state.get("sources", [None] * len(self.sources))
        order_seed = mix64(self.seed, _ORDER) if self.shuffle else None
        streams = [PackedSequences(
            source, self.encoder, self.seq_len, split=self.split, val_fraction=self.val_fraction,
            stream=stream, num_streams=num_streams, order_seed=order_seed,
            num_epochs=self.num_epochs, batch_docs=self.batch_docs, state=source_state)
            for source, source_state in zip(self.sources, source_states)]
        mixture = Mixture(streams, self.weights, mix64(self.seed, _MIX, stream, num_streams, generation),
                          draws=upstream_state.get("draws", 0))
        size = self.shuffle_buffer if self.shuffle else 0
        return ShuffleBuffer(mixture, size, mix64(self.seed, _BUFFER, stream, num_streams, generation),
                             self.seq_len, draws=state.get("draws", 0), items=state.get("items"),
                             generation=generation)


def remap_stream_states(spec: PipelineSpec, states: list[dict | None],
                        num_streams: int) -> tuple[list[dict], dict]:
    """Streaming states of ``len(states)`` streams (None: not started) -> states of ``num_streams``
    new streams that together train on exactly what the old ones had not yet trained on.

    Per source, every old stream s of S leaves: its runs (the first one, the document in progress,
    from its current token), then the regular runs ``[e, s, S, 0]`` of the epochs between its own
    next regular epoch and E = the largest next regular epoch of all old streams (streams drift
    apart in epochs: they pack documents of different lengths). Epochs from E on are untouched by
    every old stream and are partitioned among the new streams as usual. The leftover runs are
    dealt out, run i to new stream ``i % num_streams``, the runs in progress first (so that new
    streams start in the middle of a document whose current token was already a target, and lose
    no token). A run in progress dealt behind another run starts one token later: its current
    token was the last target of the old stream's last window. Conversely, a run starting at
    ``offset > 0`` that is not in progress (one dealt behind another run by an earlier re-map: token
    ``offset - 1`` was a target) and lands first in a new stream starts one token earlier, as a run
    in progress. So a stream's first token (only an input, never a target) is a token already
    trained on, unless the stream starts at the beginning of a document: then that one token is
    not trained on, as the first token of every stream of an uninterrupted run. Sequences held in
    shuffle buffers are dealt the same way (item i to new stream ``i % num_streams``); draw
    counters restart at 0 under the keys of the next generation.

    Returns (new states, counts for the description: runs, runs in progress, buffered sequences).
    """
    assert not spec.is_shards and num_streams >= 1
    old_streams = len(states)
    states = [s or {} for s in states]
    source_states = [(s.get("upstream") or {}).get("sources") or [None] * len(spec.sources) for s in states]
    limit = spec.num_epochs
    new_sources: list[list[dict]] = [[] for _ in range(num_streams)]
    counts = {"runs": 0, "in_progress": 0, "buffered": 0}
    for i in range(len(spec.sources)):
        packers = [source_states[s][i] or fresh_state() for s in range(old_streams)]
        last = max(p["epoch"] for p in packers)
        if limit is not None:
            last = min(last, limit)
        in_progress, rest = [], []
        for s, p in enumerate(packers):
            runs = [list(r) for r in p["runs"]]
            runs += [[e, s, old_streams, 0] for e in range(p["epoch"], last)]
            if runs and p["primed"] and p["runs"]:
                in_progress.append(runs.pop(0))
            rest += [(run, False) for run in runs]
        dealt = [(run, True) for run in in_progress] + rest
        counts["runs"] += len(dealt)
        counts["in_progress"] += len(in_progress)
        for new in range(num_streams):
            runs, primed = [], False
            for k, ([e, p, stride, offset], targeted) in enumerate(dealt[new::num_streams]):
                if k == 0:  # the new stream's first token is only an input: make it one already targeted
                    primed = targeted or offset > 0
                    runs.append([e, p, stride, offset - (offset > 0 and not targeted)])
                else:  # behind another run: start after the token already targeted
                    runs.append([e, p, stride, offset + targeted])
            new_sources[new].append({"runs": runs, "epoch": last, "primed": primed})
    items = [row for s in states if s.get("items") is not None for row in s["items"]]
    counts["buffered"] = len(items)
    generation = 1 + max(s.get("generation", 0) for s in states)
    empty = torch.zeros(0, spec.seq_len + 1, dtype=torch.int32)
    out = []
    for new in range(num_streams):
        mine = items[new::num_streams]
        out.append({"generation": generation, "draws": 0, "items": torch.stack(mine) if mine else empty,
                    "upstream": {"draws": 0, "sources": new_sources[new]}})
    return out, counts
