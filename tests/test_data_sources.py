"""Sources: file formats and globs, the hub path, the train/validation split, the partition into
streams, and the errors for bad input."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_common import files_config, make_documents, tiny_tokenizer, write_jsonl_corpus

from newtonlm.data import DataError, SourceConfig, build_loader, readers
from newtonlm.data.sources import DocumentSource, is_validation


def texts(source, **kw):
    return [t for _, t in source.documents(**kw)]


def test_formats_and_text_field(tmp_path):
    docs = make_documents(12, seed=1)
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs[1:4]) + "\n\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": d} for d in docs[4:7]]))
    table = pa.table({"body": docs[7:12], "n": list(range(5))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(tmp_path)], text_field="body"))
    assert [f.key for f in source.files] == ["a.txt", "b.jsonl", "c.json", "d.parquet"]
    assert texts(source) == docs


def test_globs_keys_and_txt_pieces(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    lines = [f"line {i} " + "word " * (i % 7) + "\n" for i in range(200)]
    (tmp_path / "x" / "y" / "big.txt").write_text("".join(lines))
    (tmp_path / "x" / "small.txt").write_text("small\n")
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(tmp_path / "x" / "**" / "*.txt")],
                                              txt_max_doc_bytes=300))
    assert [f.key for f in source.files] == ["small.txt", "y/big.txt"]
    expected, piece = [], ""  # greedy: whole lines, at most 300 bytes a document
    for line in lines:
        if piece and len(piece) + len(line) > 300:
            expected.append(piece)
            piece = ""
        piece += line
    assert texts(source) == ["small\n", *expected, piece]
    assert len(expected) > 10


@pytest.mark.parametrize("pattern, message", [
    ("missing/dir", "does not exist"),
    ("nothing-*.jsonl", "no file matches the glob"),
    ("notes.md", "unsupported file type '.md'"),
])
def test_bad_paths_are_named_at_start_up(tmp_path, pattern, message):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match=message) as err:
        DocumentSource("s", SourceConfig(kind="files", paths=[str(tmp_path / pattern)]))
    assert str(tmp_path / pattern) in str(err.value)


def test_empty_corpus_stops_at_start_up(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": ""}\n\n{"text": "  "}\n')
    (tmp_path / "b.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty corpus") as err:
        build_loader(files_config([tmp_path]), tiny_tokenizer(), 16, 2)
    assert str(tmp_path / "a.jsonl") in str(err.value)


def test_undecodable_bytes_are_replaced_counted_and_reported_once(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café ok\n".encode() + b"caf\xe9 \xff\xfe bad\n")
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(path)]))
    with caplog.at_level(logging.WARNING, logger="newtonlm.data.sources"):
        for _ in range(2):
            assert texts(source) == ["café ok\ncaf\ufffd \ufffd\ufffd bad\n"]
    reports = [r.getMessage() for r in caplog.records]
    assert reports == [f"{path}: replaced 3 undecodable byte sequence(s) with U+FFFD"]


def test_failures_mid_stream_name_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(bad)]))
    with pytest.raises(DataError, match=rf"{bad} line 3: not valid JSON"):
        texts(source)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=rf"{nofield} line 1: record has no field 'text'"):
        texts(DocumentSource("s", SourceConfig(kind="files", paths=[str(nofield)])))
    gone = tmp_path / "gone.txt"
    gone.write_text("soon deleted\n")
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(gone)]))
    gone.unlink()
    with pytest.raises(DataError, match=rf"{gone}: reading failed after 0 document\(s\) .*FileNotFoundError"):
        texts(source)
    flaky = tmp_path / "flaky.jsonl"
    flaky.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    real_lines = readers._jsonl_lines

    def lines_then_io_error(path):
        yield from list(real_lines(path))[:2]
        raise OSError("device went away")

    monkeypatch.setattr(readers, "_jsonl_lines", lines_then_io_error)
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(flaky)]))
    with pytest.raises(DataError, match=rf"{flaky}: reading failed after 2 document\(s\) .*device went away"):
        texts(source)


def test_hub_path_streams_the_same_documents(tmp_path):
    corpus = write_jsonl_corpus(tmp_path, n_files=2, docs_per_file=5)
    files = [str(p) for p, _ in corpus]
    hub = DocumentSource("h", SourceConfig(kind="hub", hub_name="json", hub_data_files=files))
    local = DocumentSource("l", SourceConfig(kind="files", paths=files))
    assert texts(hub) == texts(local) == [d for _, docs in corpus for d in docs]
    owned = texts(hub, stream=1, num_streams=3, start=2)
    assert owned == [d for p, d in enumerate(texts(local)) if p % 3 == 1 and p >= 2]


def test_split_is_deterministic_disjoint_and_seed_independent(tmp_path):
    corpus = write_jsonl_corpus(tmp_path, n_files=4, docs_per_file=100)
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(tmp_path)]))
    everything = texts(source)
    train = texts(source, split="train", val_fraction=0.1)
    val = texts(source, split="val", val_fraction=0.1)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(everything)
    assert 20 <= len(val) <= 60  # binomial(400, 0.1): mean 40, sd 6
    # A file's documents keep their side whatever the file order (epoch, seed) or the stream count.
    for epoch, seed in [(0, 7), (3, 99)]:
        shuffled_val = texts(source, split="val", val_fraction=0.1, epoch=epoch, order_seed=seed)
        assert sorted(shuffled_val) == sorted(val)
    # Membership is the documented hash of (file key, index in file).
    expected = [d for p, docs in corpus for i, d in enumerate(docs) if is_validation(p.name, i, 0.1)]
    assert val == expected


def test_streams_partition_every_epoch(tmp_path):
    write_jsonl_corpus(tmp_path, n_files=3, docs_per_file=7)
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(tmp_path)]))
    for epoch in (0, 1):
        full = texts(source, epoch=epoch, order_seed=5)
        parts = [texts(source, epoch=epoch, order_seed=5, stream=s, num_streams=4) for s in range(4)]
        assert sorted(d for part in parts for d in part) == sorted(full)
        assert parts[1] == full[1::4]
    # The file order is reshuffled every epoch.
    assert texts(source, epoch=0, order_seed=5) != texts(source, epoch=1, order_seed=5)
