"""Sharding over ranks and DataLoader workers: with world size 2 and 2 workers per rank, one epoch
delivers every sequence exactly once, checked exhaustively against references built here."""

import numpy as np
import torch
from test_data_common import files_config, reference_ids, tiny_tokenizer, windows, write_jsonl_corpus

from newtonlm.data import build_loader, prepare_shards

T, WORLD, WORKERS = 16, 2, 2


def rows_of(loader) -> list[tuple[int, ...]]:
    out = []
    for batch in loader:
        assert batch["input_ids"].dtype == batch["targets"].dtype == torch.int64
        assert (batch["targets"][:, :-1] == batch["input_ids"][:, 1:]).all()
        full = np.concatenate([batch["input_ids"].numpy(), batch["targets"].numpy()[:, -1:]], axis=1)
        out += [tuple(r) for r in full.tolist()]
    return out


def interleave(a: list, b: list) -> list:
    """Round-robin a, b, a, b, ... and then the rest of the longer one (the DataLoader's order)."""
    out = [x for pair in zip(a, b) for x in pair]
    return out + a[len(b):] + b[len(a):]


def test_streaming_epoch_is_partitioned_exactly(tmp_path):
    corpus = write_jsonl_corpus(tmp_path, n_files=5, docs_per_file=16)
    cfg = files_config([tmp_path], val_fraction=0.0, shuffle=False)
    tok = tiny_tokenizer()
    documents = [d for _, docs in corpus for d in docs]  # positions: sorted files, then file order
    streams = WORLD * WORKERS
    expected = []
    for s in range(streams):
        tokens = [i for d in documents[s::streams] for i in reference_ids(tok, d)]
        expected.append([tuple(w) for w in windows(tokens, T)])
    delivered = []
    for rank in range(WORLD):
        loader = build_loader(cfg, tok, T, 1, rank=rank, world_size=WORLD, num_workers=WORKERS, num_epochs=1)
        rows = rows_of(loader)
        assert rows == interleave(expected[rank * WORKERS], expected[rank * WORKERS + 1])
        delivered += rows
    assert len(delivered) == len(set(delivered)) == sum(map(len, expected))


def test_shuffled_streaming_epoch_has_no_repeats(tmp_path):
    corpus = write_jsonl_corpus(tmp_path, n_files=5, docs_per_file=16)
    cfg = files_config([tmp_path], val_fraction=0.0, shuffle=True, shuffle_buffer=7)
    tok = tiny_tokenizer()
    documents = {d for _, docs in corpus for d in docs}
    delivered = []
    for rank in range(WORLD):
        loader = build_loader(cfg, tok, 4 * T, 1, rank=rank, world_size=WORLD, num_workers=WORKERS,
                              num_epochs=1, seed=5)
        delivered += rows_of(loader)
    assert len(delivered) == len(set(delivered))
    # Every document lying whole inside a sequence is a corpus document, and none is seen twice.
    eos = tok.eos_token_id
    whole = []
    for row in delivered:
        cuts = [i for i, t in enumerate(row) if t == eos]
        whole += [tok.decode(row[a + 1:b]) for a, b in zip(cuts, cuts[1:])]
    assert whole and set(whole) <= documents and len(whole) == len(set(whole))
    # Stream s cuts its L_s tokens into (L_s - 1) // T' windows; summed over the 4 streams, whatever
    # documents each stream drew: (L - 4) / T' - 4 < count <= (L - 4) / T'.
    total = sum(len(reference_ids(tok, d)) for d in documents)
    assert (total - 4) / (4 * T) - 4 < len(delivered) <= (total - 4) / (4 * T)


def test_shard_epoch_is_partitioned_exactly(tmp_path):
    write_jsonl_corpus(tmp_path / "corpus", n_files=3, docs_per_file=20)
    cfg = files_config([tmp_path / "corpus"], val_fraction=0.0, shuffle=True, format="shards",
                       shards_dir=str(tmp_path / "shards"))
    tok = tiny_tokenizer()
    prepare_shards(cfg, tok)
    tokens_file = tmp_path / "shards" / "local" / "train" / "tokens-00000.bin"
    stream = np.fromfile(tokens_file, dtype=np.uint16).tolist()
    index_of = {tuple(w): i for i, w in enumerate(windows(stream, T))}
    assert len(index_of) == len(windows(stream, T)) > 100
    seen = []
    for rank in range(WORLD):
        loader = build_loader(cfg, tok, T, 1, rank=rank, world_size=WORLD, num_workers=WORKERS, num_epochs=1,
                              seed=3)
        seen += [index_of[row] for row in rows_of(loader)]
    assert sorted(seen) == list(range(len(index_of)))
    assert seen != sorted(seen)  # globally shuffled
