"""The resumable loader: a torch DataLoader over per-worker pipelines, with exact state.

Streaming sources: each DataLoader worker of each rank runs one stream (``stream = rank * W +
worker`` of ``world_size * W``) and builds whole micro-batches itself; every batch carries the
worker's pipeline state after that batch. The DataLoader hands batches out round-robin over the
workers (worker 0, 1, ..., W-1, 0, ...), so the loader's state is: each worker's state as of the
last batch *delivered* from it (prefetched batches are not counted), and which worker delivers
next. A new iteration (after ``load_state_dict`` or after leaving a ``for`` loop) starts fresh
worker processes from those states and rotates the worker roles so that the next worker comes
first: the batches continue exactly where the delivered ones stopped.

Shards: the sequences have one global order (``shards.ShardOrder``) and rank r of R with
micro-batch b takes, for its j-th micro-batch, the global micro-batch ``g = j * R + r``: indices
``[base + g*b, base + (g+1)*b)``; worker w builds the micro-batches ``j % W == w``. Global step k
with gradient accumulation a therefore consumes indices ``[base + k*G, base + (k+1)*G)``, G = a*R*b,
for every layout with the same G. The state is the global index after the last delivered
micro-batch row (all R ranks' j-th micro-batches) plus each source's visit count there.

``load_states`` restores every rank's states of a checkpoint into a loader of another layout
(ranks, workers, micro-batch size): exactly for shards, with exact document coverage for
streaming (``pipeline.remap_stream_states``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import DataError
from .pipeline import PipelineSpec, remap_stream_states

STATE_VERSION = 2
LAYOUT_KEYS = ("rank", "world_size", "workers", "batch_size")  # what load_states may change


def _identity(batch):
    return batch


def _batch(rows: list[np.ndarray], worker: int, state: dict) -> dict:
    tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
    return {"input_ids": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(),
            "_worker": worker, "_state": state}


class StreamDataset(IterableDataset):
    """The batches of one worker: ``{"input_ids": int64 [B, T], "targets": int64 [B, T]}`` plus the
    bookkeeping keys ``_worker`` (logical worker index) and ``_state`` (its pipeline state).
    DataLoader worker ``i`` plays logical worker ``(i + rotation) % num_workers``."""

    def __init__(self, spec: PipelineSpec, batch_size: int, rank: int, world_size: int,
                 num_workers: int, worker_states: list[dict | None], rotation: int):
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.worker_states = worker_states
        self.rotation = rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.num_workers
        stream = self.rank * self.num_workers + worker
        pipeline = self.spec.build(stream, self.world_size * self.num_workers, self.worker_states[worker])
        sequences = iter(pipeline)
        while True:
            rows = list(islice(sequences, self.batch_size))
            if len(rows) < self.batch_size:  # only a finite stream ends; its last partial batch is dropped
                return
            yield _batch(rows, worker, pipeline.state_dict())


class ShardBatches(IterableDataset):
    """The micro-batches of one rank from the global shard order, starting at ``state`` (a
    ``ShardOrder`` state at the start of a micro-batch row): DataLoader worker w builds the rank's
    micro-batches j = w, w + W, ... (W = num_workers), so the round-robin DataLoader delivers j = 0,
    1, 2, ...; each carries the order's state at the end of its row. A finite order ends at the first
    incomplete micro-batch."""

    def __init__(self, spec: PipelineSpec, batch_size: int, rank: int, world_size: int,
                 num_workers: int, state: dict):
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.state = state

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        order = self.spec.shard_order()
        b, row = self.batch_size, self.world_size * self.batch_size
        base, state = self.state["position"], self.state
        for j in range(worker, 1 << 62, self.num_workers):
            start = base + j * row + self.rank * b
            state, _, _ = order.advance(state, start)
            state, sources, visits = order.advance(state, start + b)
            if len(sources) < b:
                return
            rows = [order.sequence(int(s), int(v)) for s, v in zip(sources, visits)]
            state, _, _ = order.advance(state, base + (j + 1) * row)
            yield _batch(rows, worker, state)


class ResumableLoader:
    """Iterable of micro-batches ``{"input_ids": LongTensor [B, T], "targets": LongTensor [B, T]}``
    with ``state_dict`` / ``load_state_dict`` / ``load_states``. ``targets[:, t]`` is the token after
    ``input_ids[:, t]`` (already shifted). The name is not transformers' ``labels`` on purpose: a
    causal LM shifts ``labels`` itself, so ``model(input_ids=..., labels=targets)`` would train on the
    token two ahead; ``model(**batch)`` computes no loss instead (``.loss`` is None).

    Iterating continues from the current state: the first ``for`` loop starts at the beginning,
    a later one (or one after ``load_state_dict``) continues after the last delivered batch.
    ``num_workers``: DataLoader worker processes (0: in this process; the data equal those of 1).
    ``load_state_dict`` restores only a state of the same signature (rank, world size, workers,
    batch size, sequence length, sources and their files' sizes, seed, shuffling); ``load_states``
    also takes the states of another layout (ranks, workers, batch size). Restore before
    iterating."""

    def __init__(self, spec: PipelineSpec, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, prefetch_factor: int = 2):
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} with world_size={world_size}; expected 0 <= rank < world_size")
        if batch_size < 1 or num_workers < 0:
            raise DataError(f"batch_size={batch_size}, num_workers={num_workers}; expected >= 1 and >= 0")
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.shards = spec.is_shards
        self._logical_workers = max(1, num_workers)
        self._next_worker = 0
        self._batches = 0
        self._worker_states: list[dict | None] = [None] * self._logical_workers
        self._shard_state: dict | None = spec.shard_order().start() if self.shards else None

    def signature(self) -> dict:
        """What a saved state must match to be restored here (``load_states``: all but LAYOUT_KEYS)."""
        s = self.spec
        return {"rank": self.rank, "world_size": self.world_size, "workers": self._logical_workers,
                "batch_size": self.batch_size, "seq_len": s.seq_len, "split": s.split,
                "sources": [[type(src).__name__, src.name, src.fingerprint] for src in s.sources],
                "weights": list(s.weights), "seed": s.seed, "shuffle": s.shuffle,
                "shuffle_buffer": s.shuffle_buffer, "val_fraction": s.val_fraction,
                "num_epochs": s.num_epochs}

    def state_dict(self) -> dict:
        """Plain Python values and int32 tensors (loadable with ``torch.load(weights_only=True)``).
        ``batches``: micro-batches delivered so far (after a re-map: the number this layout would
        have delivered for the same global data, rounded down). Streaming: ``workers`` (each
        worker's pipeline state, None before its first batch) and ``next_worker``; shards:
        ``shards`` (``{"position", "counts"}`` of the global order)."""
        return {"version": STATE_VERSION, "signature": self.signature(), "next_worker": self._next_worker,
                "batches": self._batches, "workers": list(self._worker_states),
                "shards": None if self._shard_state is None else dict(self._shard_state)}

    def _check_version(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise DataError(f"data loader state version {found!r}; expected {STATE_VERSION} (states written "
                            f"before elastic resume are not readable: resume with the code that wrote it)")

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's own state (same signature, layout included)."""
        self._check_version(state)
        mine, saved = self.signature(), state["signature"]
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"the data loader state was saved with another configuration ({details}); "
                            f"exact resume needs the same data settings, ranks and workers "
                            f"(load_states accepts other ranks, workers and batch sizes)")
        self._next_worker = state["next_worker"]
        self._batches = state["batches"]
        self._worker_states = list(state["workers"])
        self._shard_state = None if state["shards"] is None else dict(state["shards"])

    def load_states(self, states: list[dict]) -> str | None:
        """Restore from ``states``, the list of every rank's ``state_dict()`` of a checkpoint (rank
        order; the old world size is ``len(states)``, the old workers and batch size come from
        their signatures).

        Same layout (world size, workers, batch size): the same as
        ``load_state_dict(states[self.rank])``; returns None. Another layout: re-maps and returns
        a one-line description of what was re-mapped. Shards: the ranks' states must agree on the
        global position (they do at an optimizer step); the new layout continues the global order
        there, so a run with the same global batch sees exactly the batches of an uninterrupted
        one. Streaming: every document not yet trained on is trained on exactly once by the new
        streams (``pipeline.remap_stream_states``); packing and order differ from an
        uninterrupted run. Only the batch size changed, streaming: the streams continue unchanged.
        Anything else in the signature (sources, seq_len, seed, shuffle, weights, split ...) must
        match: DataError naming the differing fields."""
        if not isinstance(states, (list, tuple)) or not states:
            raise DataError(f"load_states needs the list of every rank's state_dict(); got "
                            f"{states!r:.60}")
        for state in states:
            self._check_version(state)
        saved = states[0]["signature"]
        old_world, old_workers, old_batch = saved["world_size"], saved["workers"], saved["batch_size"]
        if len(states) != old_world:
            raise DataError(f"load_states got {len(states)} states but they were saved by {old_world} ranks "
                            f"(world_size in their signature); pass every rank's state, in rank order")
        common = {k: v for k, v in saved.items() if k != "rank"}
        for rank, state in enumerate(states):
            found = state["signature"].get("rank")
            if found != rank or {k: v for k, v in state["signature"].items() if k != "rank"} != common:
                raise DataError(f"load_states: state {rank} has rank={found!r} or a signature unlike "
                                f"state 0's; pass every rank's state of one checkpoint, in rank order")
        mine = self.signature()
        diff = {k: (saved.get(k), v) for k, v in mine.items() if k not in LAYOUT_KEYS and saved.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"the data loader states were saved with another data configuration ({details}); "
                            f"only the numbers of ranks and workers and the micro-batch size may change")
        old = (old_world, old_workers, old_batch)
        new = (self.world_size, self._logical_workers, self.batch_size)
        if old == new:
            self.load_state_dict(states[self.rank])
            return None
        consumed = sum(s["batches"] for s in states) * old_batch
        self._batches = consumed // (self.world_size * self.batch_size)
        self._next_worker = 0
        layout = (f"data: re-mapped from {_layout(*old)} to {_layout(*new)}")
        if self.shards:
            positions = {(s["shards"]["position"], tuple(s["shards"]["counts"])) for s in states}
            if len(positions) != 1:
                found = sorted(p for p, _ in positions)
                raise DataError(f"load_states: the ranks' shard states stopped at different global positions "
                                f"{found}; an exact re-map needs a checkpoint taken at an optimizer step")
            self._shard_state = dict(states[0]["shards"])
            return f"{layout} (shards: exact global order at sequence {self._shard_state['position']})"
        if old[:2] == new[:2]:
            self.load_state_dict({**states[self.rank], "signature": mine})
            self._batches = consumed // (self.world_size * self.batch_size)
            return f"{layout} (streaming: the same streams continue)"
        old_states = [w for s in states for w in s["workers"]]
        num_streams = self.world_size * self._logical_workers
        new_states, counts = remap_stream_states(self.spec, old_states, num_streams)
        first = self.rank * self._logical_workers
        self._worker_states = new_states[first:first + self._logical_workers]
        return (f"{layout} (streaming: exact document coverage; {counts['runs']} document runs "
                f"({counts['in_progress']} in progress) and {counts['buffered']} buffered sequences dealt "
                f"to the new streams)")

    def __iter__(self) -> Iterator[dict]:
        if self.shards:
            dataset: IterableDataset = ShardBatches(self.spec, self.batch_size, self.rank, self.world_size,
                                                    self._logical_workers, dict(self._shard_state))
        else:
            dataset = StreamDataset(self.spec, self.batch_size, self.rank, self.world_size,
                                    self._logical_workers, list(self._worker_states),
                                    rotation=self._next_worker)
        if self.num_workers > 0:
            # Each worker tokenizes on its own core; the Rust thread pool inside a forked worker
            # would only compete with the other workers (and warns after a fork).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            pin_memory=torch.cuda.is_available(),
                            worker_init_fn=_ignore_stop_signals if self.num_workers else None)
        for batch in loader:
            worker, state = batch.pop("_worker"), batch.pop("_state")
            if self.shards:
                self._shard_state = state
            else:
                self._worker_states[worker] = state
                self._next_worker = (worker + 1) % self._logical_workers
            self._batches += 1
            yield batch


def _layout(world: int, workers: int, batch: int) -> str:
    return (f"{world} rank{'s' * (world != 1)} x {workers} worker{'s' * (workers != 1)} "
            f"(micro-batch {batch})")


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers ignore SIGTERM / SIGINT / SIGUSR1: those are preemption notices for the training
    process, which checkpoints and then shuts its workers down. Sent to a whole process group (Ctrl-C
    in a terminal, Slurm's scancel, the deepspeed launcher) they would otherwise kill a worker
    (torch installs a SIGTERM handler that exits) and the trainer would die before its checkpoint.
    A worker whose trainer is gone still exits: torch's workers watch their parent."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class FixedBatches:
    """The first ``num_batches`` batches of a loader, identical on every iteration (validation).
    They are computed on the first iteration and kept in memory."""

    def __init__(self, loader: ResumableLoader, num_batches: int):
        self.loader = loader
        self.num_batches = num_batches
        self._batches: list[dict] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        if self._batches is None:
            self._batches = list(islice(iter(self.loader), self.num_batches))
        return iter(self._batches)


IGNORE_INDEX = -100  # a target that is not scored (cross_entropy's default ignore_index)


class ValidationSet:
    """The validation set of a run: the first ``num_sequences`` sequences of ``loader``'s stream
    (build it with ``rank=0, world_size=1``: one stream, unshuffled), the same on any number of
    ranks. Rank ``rank`` of ``world_size`` scores the sequences ``rank, rank + world_size, ...`` in
    batches of ``min(batch_size, the largest share)``; every rank yields the same number of batches
    of the same shape (a collective forward, e.g. ZeRO-3's, needs every rank), rows past a rank's share
    repeating a sequence with every target ``IGNORE_INDEX`` (scored by nobody). So the summed loss
    and target count over the ranks are those of the whole set, whatever the world size.
    The sequences are read on the first iteration and kept in memory."""

    def __init__(self, loader: ResumableLoader, num_sequences: int, *, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1):
        if num_sequences < 1 or batch_size < 1:
            raise DataError(f"num_sequences={num_sequences}, batch_size={batch_size}; expected >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} with world_size={world_size}; expected 0 <= rank < world_size")
        self.loader = loader
        self.num_sequences = num_sequences
        self.rank = rank
        self.world_size = world_size
        share = -(-num_sequences // world_size)  # the largest share of a rank
        self.batch_size = min(batch_size, share)
        self._num_batches = -(-share // self.batch_size)
        self._batches: list[dict] | None = None

    def __len__(self) -> int:
        return self._num_batches

    def _build(self) -> list[dict]:
        rows_in, rows_out, have = [], [], 0
        for batch in self.loader:  # the loader's own batch size does not matter: rows are regrouped
            rows_in.append(batch["input_ids"])
            rows_out.append(batch["targets"])
            have += len(batch["input_ids"])
            if have >= self.num_sequences:
                break
        every = torch.cat(rows_in)[:self.num_sequences]
        inputs = every[self.rank::self.world_size]
        targets = torch.cat(rows_out)[:self.num_sequences][self.rank::self.world_size]
        pad = self._num_batches * self.batch_size - len(inputs)
        if pad:
            inputs = torch.cat([inputs, every[:1].expand(pad, -1)])
            ignored = torch.full((pad, targets.shape[1]), IGNORE_INDEX, dtype=targets.dtype)
            targets = torch.cat([targets, ignored])
        return [{"input_ids": i.contiguous(), "targets": t.contiguous()}
                for i, t in zip(inputs.split(self.batch_size), targets.split(self.batch_size))]

    def __iter__(self) -> Iterator[dict]:
        if self._batches is None:
            self._batches = self._build()
        return iter(self._batches)
