"""Pre-tokenized shards: contents, dtypes, the split, the permutation, equivalence with streaming,
and the start-up checks (missing shards, another tokenizer or config, ids beyond the model)."""

import json

import numpy as np
import pytest
from test_data_common import (
    files_config,
    make_documents,
    reference_ids,
    take,
    tiny_tokenizer,
    write_jsonl_corpus,
)

from newtonlm.data import DataError, build_loader, prepare_shards, train_bpe_tokenizer
from newtonlm.data import prepare as prepmod
from newtonlm.data.rng import IndexPermutation
from newtonlm.data.shards import ShardSet, ShardWriter, token_dtype
from newtonlm.data.sources import DocumentSource


@pytest.fixture()
def prepared(tmp_path):
    write_jsonl_corpus(tmp_path / "corpus", n_files=3, docs_per_file=30)
    cfg = files_config([tmp_path / "corpus"], val_fraction=0.2, format="shards",
                       shards_dir=str(tmp_path / "shards"))
    indexes = prepare_shards(cfg, tiny_tokenizer(), shard_tokens=1000)
    return cfg, indexes


def test_prepared_splits_hold_the_documents_in_order(prepared):
    cfg, indexes = prepared
    tok = tiny_tokenizer()
    source = DocumentSource("local", cfg.sources["local"])
    for index in indexes:
        docs = [t for _, t in source.documents(split=index["split"], val_fraction=0.2)]
        expected = [i for d in docs for i in reference_ids(tok, d)]
        shards = ShardSet(f"{cfg.shards_dir}/local/{index['split']}")
        assert index["dtype"] == "uint16" and index["num_documents"] == len(docs)
        assert len(index["files"]) == -(-len(expected) // 1000)  # 1000 tokens a file
        assert shards.read(0, shards.num_tokens).tolist() == expected
        if len(expected) > 1005:
            assert shards.read(995, 10).tolist() == expected[995:1005]  # across a file boundary
    train, val = indexes
    assert train["num_documents"] + val["num_documents"] == 90 and val["num_documents"] > 5


def test_uint32_when_the_vocabulary_does_not_fit(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    writer = ShardWriter(tmp_path / "s", token_dtype(70000), shard_tokens=3)
    ids = [np.array([1, 70000, 65536], dtype=np.int32), np.array([69999, 5], dtype=np.int32)]
    for a in ids:
        writer.write(a)
    writer.close({"source_name": "x", "split": "train"})
    shards = ShardSet(tmp_path / "s")
    assert shards.dtype == np.uint32 and shards.read(0, 5).tolist() == [1, 70000, 65536, 69999, 5]
    with pytest.raises(DataError, match="does not fit uint16"):
        ShardWriter(tmp_path / "t", np.uint16).write(np.array([70000]))


def test_index_permutation_is_a_bijection():
    for n in range(1, 70):
        assert sorted(IndexPermutation(n, key=n)(i) for i in range(n)) == list(range(n))
    a = [IndexPermutation(1000, key=1)(i) for i in range(1000)]
    b = [IndexPermutation(1000, key=2)(i) for i in range(1000)]
    assert a != b and sum(x == i for i, x in enumerate(a)) < 10  # about 1 fixed point expected


def test_unshuffled_shard_loader_equals_the_streaming_loader(prepared):
    cfg, _ = prepared
    tok = tiny_tokenizer()
    from_shards = take(build_loader(cfg, tok, 16, 4, shuffle=False, num_workers=0), 20)
    cfg.format = "stream"
    streamed = take(build_loader(cfg, tok, 16, 4, shuffle=False, num_workers=0), 20)
    for a, b in zip(from_shards, streamed):
        assert a["input_ids"].equal(b["input_ids"]) and a["targets"].equal(b["targets"])


def test_start_up_checks(prepared, tmp_path):
    cfg, _ = prepared
    tok = tiny_tokenizer()
    index_path = tmp_path / "shards" / "local" / "train" / "index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "max_token_id": 5000}))  # ids a foreign tokenizer wrote
    with pytest.raises(DataError, match=f"{index_path}: token id 5000 >= the model's vocabulary size 448"):
        build_loader(cfg, tok, 16, 4)
    index_path.write_text(json.dumps(index))
    other = train_bpe_tokenizer(make_documents(100, seed=9), vocab_size=380)
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        build_loader(cfg, other, 16, 4)
    cfg.val_fraction = 0.3
    with pytest.raises(DataError, match="prepared with val_fraction=0.2 but the config has 0.3"):
        build_loader(cfg, tok, 16, 4)
    cfg.shards_dir = str(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=f"no pre-tokenized shards at {tmp_path / 'elsewhere'}/local/train"):
        build_loader(cfg, tok, 16, 4)


def test_streaming_ids_beyond_the_model_stop_at_start_up(tmp_path):
    write_jsonl_corpus(tmp_path, n_files=1, docs_per_file=3)
    with pytest.raises(DataError, match="ids up to 399, at or above the model's vocabulary size 384"):
        build_loader(files_config([tmp_path]), tiny_tokenizer(), 16, 2, model_vocab_size=384)


def test_prepare_command_line(tmp_path, capsys):
    write_jsonl_corpus(tmp_path / "corpus", n_files=2, docs_per_file=10)
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    prepmod.main(["data=local", f"data.sources.local.paths=[{tmp_path / 'corpus'}]",
                  f"data.shards_dir={tmp_path / 'shards'}", "--tokenizer", str(tmp_path / "tok")])
    report = json.loads(capsys.readouterr().out)
    assert [(s["split"], s["dtype"]) for s in report["splits"]] == [("train", "uint16"), ("val", "uint16")]
    assert sum(s["num_documents"] for s in report["splits"]) == 20
    assert (tmp_path / "shards" / "local" / "val" / "index.json").is_file()
