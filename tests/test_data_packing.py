"""Packing: documents -> EOS-separated token stream -> windows of seq_len + 1 every seq_len tokens,
compared with a reference built from the tokenizer's own ``__call__``; resume from any state."""

from itertools import islice

import numpy as np
from test_data_common import reference_ids, tiny_tokenizer, windows, write_jsonl_corpus

from newtonlm.data import SourceConfig
from newtonlm.data.packing import PackedSequences
from newtonlm.data.sources import DocumentSource
from newtonlm.data.tokenizer import TextEncoder

T = 24


def packer(source, **kw):
    args = dict(split="train", val_fraction=0.0, stream=0, num_streams=1, batch_docs=5)
    return PackedSequences(source, TextEncoder(tiny_tokenizer()), T, **{**args, **kw})


def test_windows_equal_the_reference_over_two_epochs(tmp_path):
    corpus = write_jsonl_corpus(tmp_path, n_files=2, docs_per_file=6)
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(tmp_path)]))
    tok = tiny_tokenizer()
    epoch = [i for _, docs in corpus for d in docs for i in reference_ids(tok, d)]
    expected = windows(epoch + epoch, T)  # the tail of epoch 0 opens epoch 1
    got = [s.tolist() for s in islice(packer(source), len(expected))]
    assert got == expected
    assert all(len(s) == T + 1 for s in got)
    finite = [s.tolist() for s in packer(source, num_epochs=1)]
    assert finite == windows(epoch, T) and len(finite) == (len(epoch) - 1) // T


def test_stream_of_a_split_and_a_shard_of_streams(tmp_path):
    write_jsonl_corpus(tmp_path, n_files=3, docs_per_file=10)
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(tmp_path)]))
    tok = tiny_tokenizer()
    owned = [t for _, t in source.documents(split="val", val_fraction=0.5, stream=2, num_streams=3)]
    expected = windows([i for d in owned for i in reference_ids(tok, d)], T)
    got = packer(source, split="val", val_fraction=0.5, stream=2, num_streams=3, num_epochs=1)
    assert [s.tolist() for s in got] == expected


def test_resume_from_every_state_is_exact(tmp_path):
    write_jsonl_corpus(tmp_path, n_files=2, docs_per_file=8)
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(tmp_path)]))
    reference = packer(source, order_seed=3)
    sequences, states = [], []
    for seq in islice(reference, 100):  # crosses epoch boundaries (about 40 windows an epoch)
        sequences.append(seq)
        states.append(reference.state_dict())
    assert states[-1]["epoch"] >= 2
    for k in range(0, 94, 3):
        resumed = packer(source, order_seed=3, state=states[k])
        assert all(np.array_equal(a, b) for a, b in zip(islice(resumed, 5), sequences[k + 1:k + 6]))


def test_runs_then_the_regular_partition(tmp_path):
    """A state with runs (as a re-map leaves it): the documents of each run in order, the first from
    its offset, then the stream's own positions of the later epochs, against a reference."""
    write_jsonl_corpus(tmp_path, n_files=2, docs_per_file=8)
    source = DocumentSource("s", SourceConfig(kind="files", paths=[str(tmp_path)]))
    tok = tiny_tokenizer()
    docs = dict(source.documents())  # position -> text; the file order is the same every epoch
    ids = {p: reference_ids(tok, t) for p, t in docs.items()}
    state = {"runs": [[0, 3, 2, 5], [0, 10, 3, 0], [1, 4, 5, 2]], "epoch": 2, "primed": True}
    tokens = (ids[3][5:] + [i for p in range(5, 16, 2) for i in ids[p]]
              + [i for p in (10, 13) for i in ids[p]]
              + ids[4][2:] + ids[9] + ids[14]
              + [i for p in range(1, 16, 3) for i in ids[p]])  # epoch 2: stream 1 of 3
    got = packer(source, stream=1, num_streams=3, num_epochs=3, state=state)
    assert [s.tolist() for s in got] == windows(tokens, T)
    assert got.exhausted and got.state_dict() == {"runs": [], "epoch": 3, "primed": True}
