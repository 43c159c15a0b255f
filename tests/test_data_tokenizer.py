"""Tokenizers: byte-level BPE training, the cache, the model's vocabulary size, the batch encoder,
and the command line."""

import json

import pytest
from test_data_common import files_config, make_documents, reference_ids, tiny_tokenizer, write_jsonl_corpus
from transformers import AutoTokenizer

from newtonlm.data import DataError, get_or_train_tokenizer, load_tokenizer, vocab_size_for_model
from newtonlm.data import tokenizer as tokmod
from newtonlm.data.tokenizer import TextEncoder, train_bpe_tokenizer


def test_bpe_specials_round_trip_and_reload(tmp_path):
    tok = tiny_tokenizer()
    assert len(tok) == 400
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    text = "Ünïcödé, emoji 🎭 and\ttabs\n  never seen: qzx"  # byte-level: every string round-trips
    assert tok.decode(tok(text)["input_ids"]) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.pad_token_id == 2


@pytest.mark.parametrize("extra, expected", [(0, 448), (48, 448), (49, 512)])
def test_vocab_size_for_model_counts_added_tokens_and_rounds_up(extra, expected):
    tok = train_bpe_tokenizer(make_documents(300, seed=12345), vocab_size=400)
    tok.add_tokens([f"<extra{i}>" for i in range(extra)])
    assert len(tok) == 400 + extra
    assert vocab_size_for_model(tok) == expected
    assert vocab_size_for_model(tok, multiple=1) == 400 + extra


def test_text_encoder_matches_the_tokenizer_and_escapes_specials():
    tok = tiny_tokenizer()
    docs = make_documents(20, seed=3) + ["literal <|eos|> in the text"]
    encoded = TextEncoder(tok).encode(docs)
    assert [e.tolist() for e in encoded[:-1]] == [reference_ids(tok, d) for d in docs[:-1]]
    last = encoded[-1].tolist()
    assert last.count(tok.eos_token_id) == 1 and last[-1] == tok.eos_token_id
    assert tok.decode(last[:-1]) == docs[-1]


def test_get_or_train_caches_and_is_deterministic(tmp_path, monkeypatch):
    write_jsonl_corpus(tmp_path / "corpus", n_files=2, docs_per_file=40)
    cfg = files_config([tmp_path / "corpus"])
    cfg.tokenizer.vocab_size = 300
    first = get_or_train_tokenizer(cfg, tmp_path / "cache")
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("bpe300-")

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although cached")

    monkeypatch.setattr(tokmod, "train_bpe_tokenizer", no_training)
    second = get_or_train_tokenizer(cfg, tmp_path / "cache")
    assert second.get_vocab() == first.get_vocab()
    monkeypatch.undo()
    retrained = get_or_train_tokenizer(cfg, tmp_path / "other-cache")
    assert retrained.get_vocab() == first.get_vocab()  # same data, same tokenizer
    cfg.tokenizer.vocab_size = 320
    assert len(get_or_train_tokenizer(cfg, tmp_path / "cache")) != len(first)  # new key, new folder
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_training_reads_only_the_training_split(tmp_path):
    corpus = write_jsonl_corpus(tmp_path, n_files=1, docs_per_file=200)
    cfg = files_config([tmp_path], val_fraction=0.2)
    seen = list(tokmod.training_texts(cfg))
    val = set(t for _, t in tokmod.DocumentSource("local", cfg.sources["local"]).documents(split="val",
                                                                                             val_fraction=0.2))
    assert val and not val & set(seen) and len(seen) + len(val) == len(corpus[0][1])
    cfg.tokenizer.train_max_bytes = 1000
    limited = list(tokmod.training_texts(cfg))
    assert sum(len(t.encode()) for t in limited[:-1]) < 1000 <= sum(len(t.encode()) for t in limited)


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_tokenizer(str(tmp_path / "nope"))


def test_command_line_trains_and_saves(tmp_path, capsys):
    write_jsonl_corpus(tmp_path / "corpus", n_files=2, docs_per_file=30)
    tokmod.main(["data=local", f"data.sources.local.paths=[{tmp_path / 'corpus'}]",
                 "data.tokenizer.vocab_size=300", "--out", str(tmp_path / "tok"),
                 "--cache-dir", str(tmp_path / "cache")])
    report = json.loads(capsys.readouterr().out)
    assert report["tokenizer_size"] == 300 and report["model_vocab_size"] == 320
    assert report["bos_eos_pad_ids"] == [0, 1, 2]
    assert len(load_tokenizer(str(tmp_path / "tok"))) == 300
