"""Readers: one file (or one hub dataset) -> its documents, in a fixed order.

A reader yields *payloads*, one per document, and ``payload_text`` turns a payload into the
document's text. For line-based formats (.txt, .jsonl) the payload is the raw bytes, so that a
document another rank or worker owns is skipped without decoding or JSON parsing; whole-file
formats (.json, .parquet, the bundled plays and Bible) parse the file once and yield strings.

Undecodable bytes are replaced with U+FFFD and counted (``replaced_count``); the caller reports
the count once per file. Failures carry the file name (and line, where there is one).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import bundled
from .config import SourceConfig
from .errors import DataError

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

_replaced = 0


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    global _replaced
    _replaced += 1
    return "\ufffd", err.end


codecs.register_error("newtonlm.count-replace", _count_and_replace)


def replaced_count() -> int:
    """Undecodable byte sequences replaced so far in this process."""
    return _replaced


def decode_utf8(data: bytes) -> str:
    """UTF-8 text of ``data``; each undecodable byte sequence becomes U+FFFD and is counted."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", "newtonlm.count-replace")


@dataclass(frozen=True)
class SourceFile:
    """A file of a source: ``key`` (its path relative to the source's root) names it in the
    train/validation hash, so the split is the same on every machine; ``format`` picks the reader."""

    path: Path
    key: str
    format: str


def _record_text(record: Any, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with field {text_field!r}, "
                        f"got {type(record).__name__}")
    if text_field not in record:
        raise DataError(f"{where}: record has no field {text_field!r} (data.sources.*.text_field); "
                        f"fields: {sorted(record)[:10]}")
    text = record[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
    return text


def _txt_pieces(path: Path, max_bytes: int) -> Iterator[bytes]:
    piece: list[bytes] = []
    size = 0
    with open(path, "rb") as fh:
        for line in fh:
            if piece and size + len(line) > max_bytes:
                yield b"".join(piece)
                piece, size = [], 0
            piece.append(line)
            size += len(line)
    if piece:
        yield b"".join(piece)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                yield line_no, line


def _json_records(path: Path, text_field: str) -> Iterator[str]:
    data = json.loads(decode_utf8(path.read_bytes()))
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or one record), got {type(data).__name__}")
    for i, record in enumerate(data):
        yield _record_text(record, text_field, f"{path} record {i}")


def _parquet_rows(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (data.sources.*.text_field); "
                        f"columns: {pf.schema_arrow.names}")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield "" if text is None else text


def read_payloads(file: SourceFile, cfg: SourceConfig) -> Iterator[Any]:
    """One payload per document of ``file``, in file order."""
    if file.format == "txt":
        return _txt_pieces(file.path, cfg.txt_max_doc_bytes)
    if file.format == "jsonl":
        return _jsonl_lines(file.path)
    if file.format == "json":
        return _json_records(file.path, cfg.text_field)
    if file.format == "parquet":
        return _parquet_rows(file.path, cfg.text_field)
    if file.format == "play":
        return iter(bundled.play_documents(decode_utf8(file.path.read_bytes())))
    if file.format == "kjv":
        return bundled.bible_documents(decode_utf8(file.path.read_bytes()).splitlines())
    raise AssertionError(f"unknown format {file.format}")


def payload_text(file: SourceFile, payload: Any, cfg: SourceConfig) -> str:
    """The text of one document from its payload."""
    if file.format == "txt":
        return decode_utf8(payload)
    if file.format == "jsonl":
        line_no, line = payload
        where = f"{file.path} line {line_no}"
        try:
            record = json.loads(decode_utf8(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from exc
        return _record_text(record, cfg.text_field, where)
    return payload


def hub_texts(cfg: SourceConfig) -> Iterator[str]:
    """Texts of a dataset streamed with ``datasets.load_dataset(..., streaming=True)``: a hub name,
    or a packaged builder such as ``json`` / ``parquet`` / ``text`` with ``hub_data_files``."""
    import datasets

    where = f"hub dataset {cfg.hub_name!r} (config {cfg.hub_config!r}, split {cfg.hub_split!r})"
    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split,
                                   data_files=list(cfg.hub_data_files) or None, streaming=True)
    except Exception as exc:  # the library raises many types (network, not found, bad config)
        raise DataError(f"{where} could not be opened: {type(exc).__name__}: {exc}") from exc
    for i, record in enumerate(ds):
        yield _record_text(record, cfg.text_field, f"{where} record {i}")


def suffix_format(path: Path) -> str:
    """The reader format of a local file from its suffix."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {FILE_SUFFIXES}")
    return suffix[1:]
