"""Exact resume: consume k batches, save the state (through torch.save / torch.load with
weights_only), build a new loader, restore, and compare the next m batches bit for bit with an
uninterrupted loader: streaming with a mixture and a shuffle buffer, with 0 and 2 workers, across
epoch boundaries, and from pre-tokenized shards."""

import pickle
from itertools import islice

import pytest
import torch
from test_data_common import take, tiny_tokenizer, write_jsonl_corpus

from newtonlm.data import DataConfig, DataError, SourceConfig, build_loader, prepare_shards
from newtonlm.data.loader import StreamDataset

T, B, M = 16, 3, 12


def mixture_config(tmp_path, **kw) -> DataConfig:
    write_jsonl_corpus(tmp_path / "a", n_files=2, docs_per_file=10, seed=1)
    write_jsonl_corpus(tmp_path / "b", n_files=2, docs_per_file=10, seed=2)
    sources = {"a": SourceConfig(kind="files", paths=[str(tmp_path / "a")], weight=3.0),
               "b": SourceConfig(kind="files", paths=[str(tmp_path / "b")], weight=1.0)}
    return DataConfig(sources=sources, val_fraction=0.1, shuffle=True, shuffle_buffer=5, **kw)


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert set(a) == {"input_ids", "targets"}
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])


def resume_matches(make, k, tmp_path):
    uninterrupted = take(make(), k + M)
    first = make()
    assert_same_batches(take(first, k), uninterrupted[:k])
    torch.save(first.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = make()
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, M), uninterrupted[k:])
    return first, uninterrupted


@pytest.mark.parametrize("num_workers, k", [(0, 4), (2, 4), (2, 7)])
def test_streaming_resume_is_exact(tmp_path, num_workers, k):
    cfg = mixture_config(tmp_path)
    tok = tiny_tokenizer()

    def make():
        return build_loader(cfg, tok, T, B, rank=1, world_size=2, num_workers=num_workers, seed=11)

    first, uninterrupted = resume_matches(make, k, tmp_path)
    assert first.state_dict()["batches"] == k
    worker_states = [w for w in first.state_dict()["workers"] if w is not None]
    assert all(w["items"].shape == (5, T + 1) for w in worker_states)  # the buffer travels with the state
    # The same loader object continues where its last loop stopped.
    assert_same_batches(take(first, M), uninterrupted[k:])


def test_resume_crosses_epochs(tmp_path):
    cfg = mixture_config(tmp_path)
    tok = tiny_tokenizer()

    def make():
        return build_loader(cfg, tok, T, B, num_workers=0, seed=2)

    loader = make()
    take(loader, 30)
    assert loader.state_dict()["workers"][0]["upstream"]["sources"][0]["epoch"] >= 1  # source a
    resume_matches(make, 30, tmp_path)


def test_shard_resume_is_exact(tmp_path):
    cfg = mixture_config(tmp_path, format="shards", shards_dir=str(tmp_path / "shards"))
    tok = tiny_tokenizer()
    prepare_shards(cfg, tok)

    def make():
        return build_loader(cfg, tok, T, B, rank=0, world_size=2, num_workers=2, seed=4)

    resume_matches(make, 5, tmp_path)


def test_state_from_another_configuration_is_refused(tmp_path):
    cfg = mixture_config(tmp_path)
    tok = tiny_tokenizer()
    loader = build_loader(cfg, tok, T, B, num_workers=0, seed=1)
    take(loader, 2)
    other = build_loader(cfg, tok, T, B, num_workers=2, seed=1)
    with pytest.raises(DataError, match="workers: saved 1, now 2"):
        other.load_state_dict(loader.state_dict())


def test_worker_dataset_pickles_for_spawn_start_methods(tmp_path):
    cfg = mixture_config(tmp_path)
    loader = build_loader(cfg, tiny_tokenizer(), T, B, num_workers=0, seed=3)
    take(loader, 2)
    dataset = StreamDataset(loader.spec, B, 0, 1, 1, loader.state_dict()["workers"], rotation=0)
    copy = pickle.loads(pickle.dumps(dataset))
    batches = [{k: b[k] for k in ("input_ids", "targets")} for b in islice(copy, 4)]
    assert_same_batches(batches, take(loader, 4))


def test_state_of_a_changed_corpus_is_refused(tmp_path):
    cfg = mixture_config(tmp_path)
    tok = tiny_tokenizer()
    loader = build_loader(cfg, tok, T, B, num_workers=0, seed=1)
    take(loader, 2)
    with open(tmp_path / "b" / "part-01.jsonl", "a") as fh:
        fh.write('{"text": "a document appended after the checkpoint"}\n')
    changed = build_loader(cfg, tok, T, B, num_workers=0, seed=1)
    with pytest.raises(DataError, match="sources: saved .*'b', '[0-9a-f]{16}'"):
        changed.load_state_dict(loader.state_dict())
