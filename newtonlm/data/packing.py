"""Packing: one source's documents in one stream -> training sequences, tokenized on the fly.

Documents are tokenized in batches with the fast tokenizer, EOS appended to each, concatenated
into one token stream, and cut into windows of ``seq_len + 1`` tokens that start every
``seq_len`` tokens: window k is ``stream[k*T : k*T + T + 1]``, so inputs ``window[:-1]`` and
targets ``window[1:]`` make every token of the stream a target exactly once (all but the stream's
first token, which is only an input). Epochs follow each other in the same token stream (the tail
of one epoch opens the next), so nothing is dropped or repeated.

A stream's documents are a list of *runs*, then the *regular* partition. A run ``[epoch, position,
stride, offset]`` is the documents at positions ``position, position + stride, ...`` of that
epoch (to its end), the first one from token ``offset`` on. The regular part is, for each epoch
``e >= state["epoch"]``, the run ``[e, stream, num_streams, 0]`` (the positions this stream owns).
A fresh stream has no run; a re-map onto another number of streams (``pipeline.remap_stream_states``)
hands each new stream the unfinished runs of the old ones.

The resumable state is ``{"runs", "epoch", "primed"}``: ``runs[0]`` starts at the document of the
next window's first token (``offset``: that token's index in the document), the runs after it
follow, ``epoch`` is the next regular epoch not listed in ``runs``, and ``primed`` says whether
that first token has already been a target (true once the stream has delivered a window).
Resuming re-reads from that document (earlier ones are skipped without decoding) and re-tokenizes
it, which yields the same ids, so no tokens are stored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from itertools import islice

import numpy as np

from .errors import DataError
from .sources import DocumentSource
from .tokenizer import TextEncoder


def fresh_state() -> dict:
    """The state of a stream that has not started: no run, regular from epoch 0."""
    return {"runs": [], "epoch": 0, "primed": False}


class PackedSequences:
    """Sequences ``int32 [seq_len + 1]`` of one source's split in stream ``stream`` of
    ``num_streams``. ``order_seed``: None keeps the file order, an integer shuffles files per epoch.
    ``num_epochs``: None repeats forever; otherwise the stream ends after that many epochs (the last
    partial window is dropped). ``state``: a dict from ``state_dict`` to resume from."""

    def __init__(self, source: DocumentSource, encoder: TextEncoder, seq_len: int, *, split: str,
                 val_fraction: float, stream: int, num_streams: int, order_seed: int | None = None,
                 num_epochs: int | None = None, batch_docs: int = 32, state: dict | None = None):
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len}; expected >= 1")
        self.source = source
        self.encoder = encoder
        self.seq_len = seq_len
        self.split = split
        self.val_fraction = val_fraction
        self.stream = stream
        self.num_streams = num_streams
        self.order_seed = order_seed
        self.num_epochs = num_epochs
        self.batch_docs = batch_docs
        state = state or fresh_state()
        self.state = {"runs": [list(r) for r in state["runs"]], "epoch": state["epoch"],
                      "primed": state["primed"]}

    def state_dict(self) -> dict:
        return {"runs": [list(r) for r in self.state["runs"]], "epoch": self.state["epoch"],
                "primed": self.state["primed"]}

    @property
    def exhausted(self) -> bool:
        return (self.num_epochs is not None and not self.state["runs"]
                and self.state["epoch"] >= self.num_epochs)

    def _tokenized(self, runs: list[list[int]],
                   next_epoch: list[int]) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """(run index, position, ids with EOS from token ``base`` on, base) of this stream's
        documents from the state on; appends each regular epoch to ``runs`` as it is reached
        (``next_epoch[0]``: the next regular epoch not yet appended)."""
        i = 0
        while True:
            regular = i == len(runs)
            if regular:
                if self.num_epochs is not None and next_epoch[0] >= self.num_epochs:
                    return
                runs.append([next_epoch[0], self.stream, self.num_streams, 0])
                next_epoch[0] += 1
            epoch, start, stride, offset = runs[i]
            docs = self.source.documents(epoch=epoch, order_seed=self.order_seed, split=self.split,
                                         val_fraction=self.val_fraction, stream=start % stride,
                                         num_streams=stride, start=start)
            found = False
            while chunk := list(islice(docs, self.batch_docs)):
                found = True
                for (position, _), ids in zip(chunk, self.encoder.encode([text for _, text in chunk])):
                    base = offset if position == start else 0
                    if base < len(ids):
                        yield i, position, ids[base:], base
            if regular and not found:
                raise DataError(
                    f"{self.source.describe()} has no {self.split} document for stream {self.stream} of "
                    f"{self.num_streams} (ranks x workers): the corpus has too few documents for this "
                    f"many streams{' or val_fraction is too small' if self.split == 'val' else ''}")
            i += 1

    def __iter__(self) -> Iterator[np.ndarray]:
        need, stride = self.seq_len + 1, self.seq_len
        runs = [list(r) for r in self.state["runs"]]
        next_epoch = [self.state["epoch"]]
        docs = self._tokenized(runs, next_epoch)
        window: deque[tuple[int, int, np.ndarray, int]] = deque()
        head = 0  # index of the next window's first token in window[0]'s ids
        available = 0
        while True:
            while available < need:
                item = next(docs, None)
                if item is None:
                    self.state = {"runs": [], "epoch": self.num_epochs, "primed": True}
                    return
                window.append(item)
                available += len(item[2])
            parts, taken, start = [], 0, head
            for _, _, ids, _ in window:
                piece = ids[start:start + need - taken]
                parts.append(piece)
                taken += len(piece)
                start = 0
                if taken == need:
                    break
            head += stride
            available -= stride
            while head >= len(window[0][2]):
                head -= len(window[0][2])
                window.popleft()
            i, position, _, base = window[0]
            self.state = {"runs": [[runs[i][0], position, runs[i][2], base + head]] + runs[i + 1:],
                          "epoch": next_epoch[0], "primed": True}
            yield np.concatenate(parts)
