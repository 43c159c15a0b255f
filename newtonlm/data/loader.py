"""The resumable loader: a torch DataLoader over per-worker pipelines, with exact state.

Each DataLoader worker of each rank runs one stream (``stream = rank * W + worker`` of
``world_size * W``) and builds whole micro-batches itself; every batch carries the worker's
pipeline state after that batch. The DataLoader hands batches out round-robin over the workers
(worker 0, 1, ..., W-1, 0, ...), so the loader's state is: each worker's state as of the last batch
*delivered* from it (prefetched batches are not counted), and which worker delivers next. A new
iteration (after ``load_state_dict`` or after leaving a ``for`` loop) starts fresh worker processes
from those states and rotates the worker roles so that the next worker comes first: the batches
continue exactly where the delivered ones stopped.
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
from .pipeline import PipelineSpec

STATE_VERSION = 1


def _identity(batch):
    return batch


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
            tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
            yield {"input_ids": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(),
                   "_worker": worker, "_state": pipeline.state_dict()}


class ResumableLoader:
    """Iterable of micro-batches ``{"input_ids": LongTensor [B, T], "targets": LongTensor [B, T]}``
    with ``state_dict`` / ``load_state_dict``. ``targets[:, t]`` is the token after ``input_ids[:, t]``
    (already shifted). The name is not transformers' ``labels`` on purpose: a causal LM shifts
    ``labels`` itself, so ``model(input_ids=..., labels=targets)`` would train on the token two
    ahead; ``model(**batch)`` computes no loss instead (``.loss`` is None).

    Iterating continues from the current state: the first ``for`` loop starts at the beginning,
    a later one (or one after ``load_state_dict``) continues after the last delivered batch.
    ``num_workers``: DataLoader worker processes (0: in this process; the data equal those of 1).
    A state restores only into a loader with the same signature (rank, world size, workers,
    batch size, sequence length, sources and their files' sizes, seed, shuffling); restore before
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
        self._logical_workers = max(1, num_workers)
        self._next_worker = 0
        self._batches = 0
        self._worker_states: list[dict | None] = [None] * self._logical_workers

    def signature(self) -> dict:
        """What a saved state must match to be restored here."""
        s = self.spec
        return {"rank": self.rank, "world_size": self.world_size, "workers": self._logical_workers,
                "batch_size": self.batch_size, "seq_len": s.seq_len, "split": s.split,
                "sources": [[type(src).__name__, src.name, src.fingerprint] for src in s.sources],
                "weights": list(s.weights), "seed": s.seed, "shuffle": s.shuffle,
                "shuffle_buffer": s.shuffle_buffer, "val_fraction": s.val_fraction,
                "num_epochs": s.num_epochs}

    def state_dict(self) -> dict:
        """Plain Python values and int32 tensors (loadable with ``torch.load(weights_only=True)``);
        ``batches`` counts the batches delivered so far."""
        return {"version": STATE_VERSION, "signature": self.signature(), "next_worker": self._next_worker,
                "batches": self._batches, "workers": list(self._worker_states)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')!r}; expected {STATE_VERSION}")
        mine, saved = self.signature(), state["signature"]
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"the data loader state was saved with another configuration ({details}); "
                            f"exact resume needs the same data settings, ranks and workers")
        self._next_worker = state["next_worker"]
        self._batches = state["batches"]
        self._worker_states = list(state["workers"])

    def __iter__(self) -> Iterator[dict]:
        dataset = StreamDataset(self.spec, self.batch_size, self.rank, self.world_size, self._logical_workers,
                                list(self._worker_states), rotation=self._next_worker)
        if self.num_workers > 0:
            # Each worker tokenizes on its own core; the Rust thread pool inside a forked worker
            # would only compete with the other workers (and warns after a fork).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            pin_memory=torch.cuda.is_available(),
                            worker_init_fn=_ignore_stop_signals if self.num_workers else None)
        for batch in loader:
            worker = batch.pop("_worker")
            self._worker_states[worker] = batch.pop("_state")
            self._next_worker = (worker + 1) % self._logical_workers
            self._batches += 1
            yield batch


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
