"""Pre-tokenized shards: a split of a source as one token stream (documents with EOS appended, in
order) stored in flat binary files of ``uint16`` ids (``uint32`` when the vocabulary does not fit)
plus ``index.json``, read back through memory maps.

Layout: ``<shards_dir>/<source name>/<train|val>/{index.json, tokens-00000.bin, ...}``.

The stream is cut into the same windows as ``packing``: sequence i is tokens
``[i*T, i*T + T + 1)``, N = (num_tokens - 1) // T of them. Each epoch visits them in the order of
a seeded bijection of ``range(N)`` (global shuffle, O(1) memory), and stream s of S takes the
visits s, s + S, s + 2S, ...; its state is (epoch, number of sequences taken).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import DataError
from .rng import IndexPermutation, mix64

INDEX = "index.json"
FORMAT = "newtonlm-token-shards"
VERSION = 1


def token_dtype(max_id: int) -> np.dtype:
    """uint16 when every id fits (max_id < 65536), else uint32."""
    return np.dtype(np.uint16) if max_id < 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token arrays to ``folder/tokens-%05d.bin`` files of at most ``shard_tokens`` ids;
    ``close`` writes ``index.json`` (last, so a folder without it is an unfinished write)."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int = 1 << 28):
        if shard_tokens < 1:
            raise DataError(f"shard_tokens={shard_tokens}; expected >= 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=False)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.files: list[dict] = []
        self.num_documents = 0
        self.max_id = -1
        self._fh = None

    def write(self, ids: np.ndarray) -> None:
        """Append one document's ids (EOS included)."""
        if len(ids) and int(ids.max()) > np.iinfo(self.dtype).max:
            raise DataError(f"token id {int(ids.max())} does not fit {self.dtype}")
        self.max_id = max(self.max_id, int(ids.max()) if len(ids) else -1)
        self.num_documents += 1
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._fh is None or self.files[-1]["num_tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.files[-1]["num_tokens"]
            self._fh.write(ids[:room].tobytes())
            self.files[-1]["num_tokens"] += len(ids[:room])
            ids = ids[room:]

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"tokens-{len(self.files):05d}.bin"
        self._fh = open(self.folder / name, "wb")
        self.files.append({"name": name, "num_tokens": 0})

    def close(self, meta: dict) -> dict:
        """Finish the files and write the index (``meta`` plus format, dtype, counts)."""
        if self._fh is not None:
            self._fh.close()
        index = {**meta, "format": FORMAT, "version": VERSION, "dtype": self.dtype.name,
                 "num_tokens": sum(f["num_tokens"] for f in self.files),
                 "num_documents": self.num_documents, "max_token_id": self.max_id, "files": self.files}
        tmp = self.folder / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.folder / INDEX)
        return index


class ShardSet:
    """The token stream of one prepared split, memory-mapped lazily (maps are opened in the process
    that reads, never pickled into DataLoader workers)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / INDEX
        if not path.is_file():
            raise DataError(f"no pre-tokenized shards at {path}: run `python -m newtonlm.data.prepare` "
                            f"with the same data config first")
        self.index = json.loads(path.read_text())
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise DataError(f"{path}: not a {FORMAT} v{VERSION} index")
        self.name = f"{self.index['source_name']}/{self.index['split']}"
        self.fingerprint = f"{self.index['num_tokens']}-{self.index.get('tokenizer_fingerprint')}"
        self.dtype = np.dtype(self.index["dtype"])
        sizes = [f["num_tokens"] for f in self.index["files"]]
        self.starts = np.cumsum([0] + sizes)
        self.num_tokens = int(self.starts[-1])
        for f in self.index["files"]:
            file = self.folder / f["name"]
            expected = f["num_tokens"] * self.dtype.itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise DataError(f"{file}: missing or truncated (expected {expected} bytes); re-run prepare")
        self._maps: list[np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def _mapped(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.memmap(self.folder / f["name"], dtype=self.dtype, mode="r")
                          if f["num_tokens"] else np.zeros(0, self.dtype) for f in self.index["files"]]
        return self._maps

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream as ``int32 [length]``."""
        assert 0 <= start and start + length <= self.num_tokens
        maps = self._mapped()
        parts = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            lo = start - int(self.starts[i])
            piece = maps[i][lo:lo + length]
            parts.append(piece)
            start += len(piece)
            length -= len(piece)
            i += 1
        return np.concatenate(parts).astype(np.int32)


class ShardSequences:
    """Sequences ``int32 [seq_len + 1]`` of a ShardSet in stream ``stream`` of ``num_streams``,
    with the interface of ``packing.PackedSequences``. ``shuffle_key``: None visits sequences in
    order, an integer draws a permutation per epoch. ``state``: {"epoch", "taken"}."""

    def __init__(self, shards: ShardSet, seq_len: int, *, stream: int, num_streams: int,
                 shuffle_key: int | None = None, num_epochs: int | None = None, state: dict | None = None):
        self.shards = shards
        self.seq_len = seq_len
        self.stream = stream
        self.num_streams = num_streams
        self.shuffle_key = shuffle_key
        self.num_epochs = num_epochs
        self.num_sequences = max(0, (shards.num_tokens - 1) // seq_len)
        if self.num_sequences < num_streams:
            raise DataError(f"{shards.folder} holds {self.num_sequences} sequences of {seq_len + 1} tokens, "
                            f"fewer than the {num_streams} streams (ranks x workers) that read it")
        self.state = dict(state) if state else {"epoch": 0, "taken": 0}

    def state_dict(self) -> dict:
        return dict(self.state)

    @property
    def exhausted(self) -> bool:
        return self.num_epochs is not None and self.state["epoch"] >= self.num_epochs

    def __iter__(self) -> Iterator[np.ndarray]:
        n, stride, step = self.num_sequences, self.seq_len, self.num_streams
        while not self.exhausted:
            epoch, taken = self.state["epoch"], self.state["taken"]
            order = None if self.shuffle_key is None else IndexPermutation(n, mix64(self.shuffle_key, epoch))
            for visit in range(self.stream + taken * step, n, step):
                index = visit if order is None else order(visit)
                taken += 1
                self.state = {"epoch": epoch, "taken": taken}
                yield self.shards.read(index * stride, stride + 1)
            self.state = {"epoch": epoch + 1, "taken": 0}
