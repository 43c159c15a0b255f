"""A configured source as a deterministic sequence of documents, and its partition into the
train/validation split and into streams (one stream per rank and DataLoader worker).

Within an epoch, every document of a source has a *position* 0, 1, 2, ...: files in order (a
permutation of the sorted files drawn from (seed, epoch) when shuffling, sorted otherwise) and
documents in file order. Stream ``s`` of ``S`` owns the positions ``p`` with ``p % S == s``, so
the streams partition the corpus; the split keeps a document in validation when a hash of its
identity (file key, index in file) falls below ``val_fraction``, independent of seed and epoch.
Resuming at a position skips the earlier documents without decoding them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import bundled, readers
from .config import SourceConfig
from .errors import DataError
from .readers import SourceFile
from .rng import hash_text, mix64

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "all")
_reported_files: set[str] = set()


def is_validation(key: str, index: int, val_fraction: float) -> bool:
    """Whether document ``index`` of the file (or hub dataset) named ``key`` is held out."""
    return mix64(hash_text(key), index) < val_fraction * 2.0**64


def _expand(pattern: str) -> list[Path]:
    path = Path(os.path.expanduser(pattern))
    if glob.has_magic(pattern):
        matches = [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))]
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(f"no file matches the glob {pattern!r}")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in readers.FILE_SUFFIXES)
        if not files:
            raise DataError(f"directory {path} contains no {'/'.join(readers.FILE_SUFFIXES)} file")
        return files
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    return [path]


def resolve_files(cfg: SourceConfig) -> list[SourceFile]:
    """The files of a source, sorted, with their keys and formats (empty for kind=hub).
    Raises DataError naming the path for a missing path, an empty glob or an unsupported type."""
    if cfg.kind == "shakespeare":
        root, plays = bundled.shakespeare_files()
        return [SourceFile(p, p.relative_to(root).as_posix(), "play") for p in plays]
    if cfg.kind == "bible":
        path = bundled.bible_file()
        return [SourceFile(path, path.name, "kjv")]
    if cfg.kind == "hub":
        return []
    paths: dict[Path, None] = {}
    for pattern in cfg.paths:
        for p in _expand(pattern):
            readers.suffix_format(p)
            paths[p.resolve()] = None
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return [SourceFile(p, p.relative_to(root).as_posix(), readers.suffix_format(p)) for p in sorted(paths)]


class DocumentSource:
    """The documents of one configured source.

    Built in the main process at start-up (paths are resolved and checked there), then copied
    into DataLoader workers, which call ``documents``.
    """

    def __init__(self, name: str, cfg: SourceConfig):
        self.name = name
        self.cfg = cfg
        self.files = resolve_files(cfg)
        self.hub_key = f"hub:{cfg.hub_name}/{cfg.hub_config}/{cfg.hub_split}"
        # What a resumed position refers to: the files' keys and sizes (a hub dataset: its name).
        layout = [(f.key, f.path.stat().st_size) for f in self.files] or self.hub_key
        self.fingerprint = hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]

    def describe(self) -> str:
        if self.cfg.kind == "hub":
            return f"source {self.name!r} ({self.hub_key})"
        shown = ", ".join(str(f.path) for f in self.files[:3]) + (" ..." if len(self.files) > 3 else "")
        return f"source {self.name!r} ({shown})"

    def check_not_empty(self) -> None:
        """Raise DataError naming the paths when no file holds a non-blank document."""
        for _ in self.documents():
            return
        raise DataError(f"empty corpus: {self.describe()} contains no non-blank document")

    def _file_order(self, epoch: int, order_seed: int | None) -> list[SourceFile]:
        if order_seed is None:
            return self.files
        return sorted(self.files, key=lambda f: mix64(order_seed, epoch, hash_text(f.key)))

    def _units(self, epoch: int, order_seed: int | None) -> Iterator[tuple[str, int, SourceFile | None, Any]]:
        """(split key, index in file, file, payload) for every document of the epoch, in order;
        a failure while reading names the file (or hub dataset) and the document it reached."""
        inputs = [None] if self.cfg.kind == "hub" else self._file_order(epoch, order_seed)
        for file in inputs:
            key = self.hub_key if file is None else file.key
            before = readers.replaced_count()
            index = -1
            try:
                payloads = (readers.hub_texts(self.cfg) if file is None
                            else readers.read_payloads(file, self.cfg))
                for index, payload in enumerate(payloads):
                    yield key, index, file, payload
            except DataError:
                raise
            except Exception as exc:
                where = self.hub_key if file is None else file.path
                raise DataError(f"{where}: reading failed after {index + 1} document(s) of the file: "
                                f"{type(exc).__name__}: {exc}") from exc
            replaced = readers.replaced_count() - before
            if replaced and file is not None and str(file.path) not in _reported_files:
                _reported_files.add(str(file.path))
                log.warning("%s: replaced %d undecodable byte sequence(s) with U+FFFD", file.path, replaced)

    def documents(self, *, epoch: int = 0, order_seed: int | None = None, split: str = "all",
                  val_fraction: float = 0.0, stream: int = 0, num_streams: int = 1,
                  start: int = 0) -> Iterator[tuple[int, str]]:
        """(position, text) of the non-blank documents of ``split`` owned by ``stream`` of
        ``num_streams`` in ``epoch``, from position ``start`` on. ``order_seed``: None keeps the
        sorted file order, an integer draws a file permutation per epoch."""
        if split not in SPLITS:
            raise DataError(f"split={split!r}; expected one of {SPLITS}")
        assert 0 <= stream < num_streams
        position = -1
        for key, index, file, payload in self._units(epoch, order_seed):
            position += 1
            if position < start or position % num_streams != stream:
                continue
            if split != "all" and is_validation(key, index, val_fraction) != (split == "val"):
                continue
            text = payload if file is None else readers.payload_text(file, payload, self.cfg)
            if text.strip():
                yield position, text
