"""Packing: one source's documents in one stream -> training sequences, tokenized on the fly.

Documents are tokenized in batches with the fast tokenizer, EOS appended to each, concatenated
into one token stream, and cut into windows of ``seq_len + 1`` tokens that start every
``seq_len`` tokens: window k is ``stream[k*T : k*T + T + 1]``, so inputs ``window[:-1]`` and
targets ``window[1:]`` make every token of the stream a target exactly once. Epochs follow each other
in the same token stream (the tail of one epoch opens the next), so nothing is dropped or repeated.

The resumable state is three integers: the next window starts at token ``offset`` of the document
at ``position`` of ``epoch``. Resuming re-reads from that document (earlier ones are skipped
without decoding) and re-tokenizes it, which yields the same ids, so no tokens are stored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from itertools import islice

import numpy as np

from .errors import DataError
from .sources import DocumentSource
from .tokenizer import TextEncoder


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
        self.state = dict(state) if state else {"epoch": 0, "position": 0, "offset": 0}

    def state_dict(self) -> dict:
        return dict(self.state)

    @property
    def exhausted(self) -> bool:
        return self.num_epochs is not None and self.state["epoch"] >= self.num_epochs

    def _tokenized(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, position, ids with EOS) of this stream's documents from the state on."""
        epoch, start = self.state["epoch"], self.state["position"]
        while self.num_epochs is None or epoch < self.num_epochs:
            docs = self.source.documents(epoch=epoch, order_seed=self.order_seed, split=self.split,
                                         val_fraction=self.val_fraction, stream=self.stream,
                                         num_streams=self.num_streams, start=start)
            found = False
            while chunk := list(islice(docs, self.batch_docs)):
                found = True
                for (position, _), ids in zip(chunk, self.encoder.encode([text for _, text in chunk])):
                    yield epoch, position, ids
            if not found and start == 0:
                raise DataError(
                    f"{self.source.describe()} has no {self.split} document for stream {self.stream} of "
                    f"{self.num_streams} (ranks x workers): the corpus has too few documents for this "
                    f"many streams{' or val_fraction is too small' if self.split == 'val' else ''}")
            epoch, start = epoch + 1, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        need, stride = self.seq_len + 1, self.seq_len
        docs = self._tokenized()
        window: deque[tuple[int, int, np.ndarray]] = deque()
        head = self.state["offset"]  # index of the next window's first token in window[0]
        available = -head
        while True:
            while available < need:
                item = next(docs, None)
                if item is None:
                    self.state = {"epoch": self.num_epochs, "position": 0, "offset": 0}
                    return
                window.append(item)
                available += len(item[2])
            parts, taken, start = [], 0, head
            for _, _, ids in window:
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
            self.state = {"epoch": window[0][0], "position": window[0][1], "offset": head}
            yield np.concatenate(parts)
