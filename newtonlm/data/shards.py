"""Pre-tokenized shards: a split of a source as one token stream (documents with EOS appended, in
order) stored in flat binary files of ``uint16`` ids (``uint32`` when the vocabulary does not fit)
plus ``index.json``, read back through memory maps.

Layout: ``<shards_dir>/<source name>/<train|val>/{index.json, tokens-00000.bin, ...}``.

The stream is cut into the same windows as ``packing``: sequence i is tokens
``[i*T, i*T + T + 1)``, N = (num_tokens - 1) // T of them. Each epoch visits them in the order of
a seeded bijection of ``range(N)`` (global shuffle, O(1) memory). ``ShardOrder`` numbers the
sequences of the whole job (all sources, all epochs) by one global index, independent of ranks,
workers and batch size; its state is that index plus each source's visit count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import DataError
from .rng import IndexPermutation, mix64, uniform_array

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


class ShardOrder:
    """The global order of a job's shard sequences, a function of the global index alone.

    Global index v = 0, 1, 2, ... (counted over the whole job, all ranks and workers together) picks
    a source and that source's visit number c: with one source, c = v; with a mixture, source i with
    probability ``weights[i] / sum(weights)`` over the sources not yet finished, drawn with
    ``uniform(mix_key, v)``, and c = how many earlier indices picked it. Visit c of source i is
    epoch ``c // N_i`` and sequence ``perm_epoch(c % N_i)`` (``perm`` a seeded bijection of
    ``range(N_i)`` when shuffling, the identity otherwise). A source with finite ``num_epochs``
    finishes after ``num_epochs * N_i`` visits; the draws then ignore it (an index that would pick a
    finished source draws again among the others, with the same uniform value); the order ends when
    every source has finished.

    Nothing depends on the rank, the number of ranks or workers, or the batch size: a loader
    selects its indices from this order (``loader.ShardBatches``). The state at index v is
    ``{"position": v, "counts": [visits of each source before v]}``; a reader skips indices that
    are not its own by counting draws (vectorized, about 10^7 indices/s), never by reading tokens.
    """

    BLOCK = 1 << 16

    def __init__(self, shards: list[ShardSet], weights: list[float], seq_len: int, *,
                 shuffle_keys: list[int | None], mix_key: int, num_epochs: int | None = None):
        assert len(shards) == len(weights) == len(shuffle_keys) > 0
        self.shards = shards
        self.seq_len = seq_len
        self.weights = np.asarray(weights, dtype=np.float64)
        self.shuffle_keys = shuffle_keys
        self.mix_key = mix_key
        self.sizes = np.array([max(0, (s.num_tokens - 1) // seq_len) for s in shards], dtype=np.int64)
        for s, n in zip(shards, self.sizes):
            if n == 0:
                raise DataError(f"{s.folder} holds {s.num_tokens} tokens: not one sequence of {seq_len + 1}")
        endless = np.iinfo(np.int64).max
        self.limits = self.sizes * num_epochs if num_epochs is not None else np.full(len(shards), endless)
        self._perm: dict[int, tuple[int, IndexPermutation]] = {}

    def start(self) -> dict:
        return {"position": 0, "counts": [0] * len(self.shards)}

    def advance(self, state: dict, stop: int) -> tuple[dict, np.ndarray, np.ndarray]:
        """From ``state`` to global index ``stop`` (earlier if every source finishes first):
        (the new state, source int64 [n], visit number int64 [n]) of the n indices passed."""
        position, counts = state["position"], np.array(state["counts"], dtype=np.int64)
        assert position <= stop and len(counts) == len(self.shards)
        chosen, visits = [], []
        k = len(self.shards)
        while position < stop:
            active = counts < self.limits
            if not active.any():
                break
            n = min(stop - position, self.BLOCK)
            if k == 1:
                n = int(min(n, self.limits[0] - counts[0]))
                choice = np.zeros(n, dtype=np.int64)
                visit = counts[0] + np.arange(n, dtype=np.int64)
                counts = counts + n
            else:
                weights = np.where(active, self.weights, 0.0)
                cumulative = np.cumsum(weights) / weights.sum()
                u = uniform_array(self.mix_key, np.arange(position, position + n, dtype=np.int64))
                choice = np.searchsorted(cumulative, u, side="right")
                choice = np.minimum(choice, int(np.flatnonzero(active)[-1]))  # rounding of the last sum
                running = counts + np.cumsum(choice[:, None] == np.arange(k), axis=0)  # [n, k] after each
                over = (running > self.limits).any(axis=1)
                if over.any():  # a source finished inside the block: stop there and draw again
                    n = int(np.argmax(over))
                    choice, running = choice[:n], running[:n]
                visit = running[np.arange(n), choice] - 1
                counts = running[n - 1] if n else counts
            chosen.append(choice)
            visits.append(visit)
            position += n
        state = {"position": int(position), "counts": [int(c) for c in counts]}
        empty = np.zeros(0, dtype=np.int64)
        return state, np.concatenate(chosen) if chosen else empty, np.concatenate(visits) if visits else empty

    def sequence(self, source: int, visit: int) -> np.ndarray:
        """Visit ``visit`` of source ``source``: ``int32 [seq_len + 1]``."""
        n = int(self.sizes[source])
        epoch, k = divmod(int(visit), n)
        key = self.shuffle_keys[source]
        if key is not None:
            cached = self._perm.get(source)
            if cached is None or cached[0] != epoch:
                cached = self._perm[source] = (epoch, IndexPermutation(n, mix64(key, epoch)))
            k = cached[1](k)
        return self.shards[source].read(k * self.seq_len, self.seq_len + 1)
