"""Resuming on another layout (ranks x workers x micro-batch size) with ``load_states``.

Shards: the global batches are a function of the global step alone, equal across layouts and to a
naive reference computed here from the token files, the permutation and scalar draws; a run
interrupted on 2 ranks continues on 1 or 3 with exactly the uninterrupted batches.

Streaming: exact coverage. Every word of the synthetic corpus is a distinct token, so each target
names the one corpus token it is (an EOS target is named by its input, the document's last word);
counting targets over the batches before the interruption and after the resume(s), every token is
a target exactly ``num_epochs`` times, except where packing itself loses tokens in any run: the
first token of a stream that starts at a document's beginning, and the tail of a finite stream
(fewer than T tokens after its last full window). Those show up as runs at the start or end of a
document, never inside one, never a whole document, and the test bounds their number and size.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from itertools import islice

import pytest
import torch
from test_data_common import take, tiny_tokenizer, windows, write_jsonl_corpus

from newtonlm.data import DataConfig, DataError, SourceConfig, build_loader, prepare_shards
from newtonlm.data.pipeline import _MIX, _SHARD_ORDER
from newtonlm.data.rng import IndexPermutation, hash_text, mix64, uniform
from newtonlm.data.shards import ShardSet

# ---- shards -------------------------------------------------------------------------------------

TS = 8  # shard sequence length
G = 12  # global batch (sequences a step): grad_accum x world x micro-batch
SHARD_SEED = 5


@pytest.fixture(scope="module")
def shard_mixture(tmp_path_factory):
    """Two prepared shard sources, a (weight 3) and b (weight 1), and their windows."""
    root = tmp_path_factory.mktemp("elastic_shards")
    write_jsonl_corpus(root / "a", n_files=2, docs_per_file=12, seed=21)
    write_jsonl_corpus(root / "b", n_files=2, docs_per_file=12, seed=22)
    sources = {"a": SourceConfig(kind="files", paths=[str(root / "a")], weight=3.0),
               "b": SourceConfig(kind="files", paths=[str(root / "b")], weight=1.0)}
    cfg = DataConfig(sources=sources, val_fraction=0.0, shuffle=True, format="shards",
                     shards_dir=str(root / "shards"), val_sequences=0)
    prepare_shards(cfg, tiny_tokenizer())
    seqs = {}
    for name in sources:
        shards = ShardSet(root / "shards" / name / "train")
        seqs[name] = [tuple(w) for w in windows(shards.read(0, shards.num_tokens).tolist(), TS)]
    return cfg, seqs


def reference_order(seqs: dict, weights: list[float], num_epochs: int | None, count: int) -> list[tuple]:
    """The global sequence order, computed naively: index v draws uniform(mix key, v) among the
    sources not yet finished (cumulative shares of their weights), source i's c-th visit is epoch
    c // N_i, sequence IndexPermutation(N_i, mix64(key_i, epoch))(c % N_i)."""
    names = list(seqs)
    keys = [mix64(SHARD_SEED, _SHARD_ORDER, hash_text(f"{n}/train")) for n in names]
    mix_key = mix64(SHARD_SEED, _MIX)
    counts = [0] * len(names)
    out = []
    for v in range(count):
        active = [num_epochs is None or c < num_epochs * len(seqs[n]) for c, n in zip(counts, names)]
        if not any(active):
            break
        total = sum(w for w, a in zip(weights, active) if a)
        u, acc, pick = uniform(mix_key, v), 0.0, max(i for i, a in enumerate(active) if a)
        for i, (w, a) in enumerate(zip(weights, active)):
            acc += w if a else 0.0
            if a and u < acc / total:
                pick = i
                break
        n = len(seqs[names[pick]])
        epoch, k = divmod(counts[pick], n)
        counts[pick] += 1
        out.append(seqs[names[pick]][IndexPermutation(n, mix64(keys[pick], epoch))(k)])
    return out


def shard_loaders(cfg, world: int, workers: int, batch: int, num_epochs: int | None, states=None):
    loaders = [build_loader(cfg, tiny_tokenizer(), TS, batch, rank=r, world_size=world, num_workers=workers,
                            seed=SHARD_SEED, num_epochs=num_epochs) for r in range(world)]
    notes = [loader.load_states(states) for loader in loaders] if states is not None else []
    return loaders, notes


def rows(batch: dict) -> list[tuple]:
    full = torch.cat([batch["input_ids"], batch["targets"][:, -1:]], dim=1)
    return [tuple(r) for r in full.tolist()]


def global_batches(loaders, accum: int, steps: int) -> list[tuple]:
    """The sequences of ``steps`` optimizer steps: micro-step by micro-step, rank by rank."""
    iterators = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps * accum):
        for it in iterators:
            out += rows(next(it))
    return out


def checkpoint(loaders, tmp_path) -> list[dict]:
    """Every rank's state, as the trainer saves it (all_gather) and torch.load reads it back."""
    torch.save([loader.state_dict() for loader in loaders], tmp_path / "data.pt")
    return torch.load(tmp_path / "data.pt", weights_only=True)


# (world, workers, micro-batch, grad accumulation) with world * micro-batch * accumulation = G
SHARD_LAYOUTS = [(1, 0, 4, 3), (2, 2, 3, 2), (3, 1, 2, 2), (3, 2, 4, 1), (1, 2, 12, 1), (2, 0, 2, 3),
                 (2, 1, 6, 1), (3, 0, 1, 4), (1, 1, 6, 2)]


def check_shard_layouts(cfg, seqs, layouts):
    """A finite mixture (one epoch; b, the smaller share, outlasts a): every layout delivers the
    reference's global batches until the order ends."""
    total = sum(map(len, seqs.values()))
    expected = reference_order(seqs, [3.0, 1.0], 1, total + 5)
    assert sorted(expected) == sorted(s for n in seqs for s in seqs[n])  # each sequence once
    assert expected[-1] in seqs["b"] and expected.index(seqs["b"][0]) > 0
    steps = total // G
    expected = expected[:steps * G]
    for world, workers, batch, accum in layouts:
        loaders, _ = shard_loaders(cfg, world, workers, batch, num_epochs=1)
        assert global_batches(loaders, accum, steps) == expected, (world, workers, batch)


def test_shard_global_batches_are_independent_of_the_layout(shard_mixture):
    cfg, seqs = shard_mixture
    check_shard_layouts(cfg, seqs, [SHARD_LAYOUTS[0], SHARD_LAYOUTS[1], SHARD_LAYOUTS[3]])


@pytest.mark.slow
def test_shard_global_batches_every_layout(shard_mixture):
    cfg, seqs = shard_mixture
    check_shard_layouts(cfg, seqs, SHARD_LAYOUTS)


def check_shard_resume(cfg, seqs, tmp_path, k, targets):
    """Endless, across epochs: 2 ranks x 1 worker (micro-batch 3, accumulation 2) for k steps, then
    each target layout continues with exactly the uninterrupted run's steps."""
    more = 24
    expected = reference_order(seqs, [3.0, 1.0], None, (k + more) * G)
    assert (k + more) * G > len(seqs["a"]) * 4 / 3  # source a (3/4 of the draws) enters epoch 1
    loaders, _ = shard_loaders(cfg, 2, 1, 3, None)
    assert global_batches(loaders, 2, k) == expected[:k * G]
    states = checkpoint(loaders, tmp_path)
    assert {s["shards"]["position"] for s in states} == {k * G}
    for world, workers, batch, accum in targets:
        resumed, notes = shard_loaders(cfg, world, workers, batch, None, states)
        assert all(f"shards: exact global order at sequence {k * G}" in note for note in notes)
        assert notes[0].startswith(f"data: re-mapped from 2 ranks x 1 worker (micro-batch 3) to {world} rank")
        assert global_batches(resumed, accum, more) == expected[k * G:]


def test_shard_resume_on_other_layouts_is_exact(shard_mixture, tmp_path):
    cfg, seqs = shard_mixture
    check_shard_resume(cfg, seqs, tmp_path, 7, [(1, 2, 6, 2), (3, 0, 2, 2)])


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 1, 19])
def test_shard_resume_every_layout(shard_mixture, tmp_path, k):
    cfg, seqs = shard_mixture
    check_shard_resume(cfg, seqs, tmp_path, k, SHARD_LAYOUTS)


def test_shard_same_layout_and_refusals(shard_mixture, tmp_path):
    cfg, _ = shard_mixture
    loaders, _ = shard_loaders(cfg, 2, 0, 3, None)
    uninterrupted = global_batches(shard_loaders(cfg, 2, 0, 3, None)[0], 1, 5)
    assert global_batches(loaders, 1, 2) == uninterrupted[:12]
    states = checkpoint(loaders, tmp_path)
    same, notes = shard_loaders(cfg, 2, 0, 3, None, states)
    assert notes == [None, None] and global_batches(same, 1, 3) == uninterrupted[12:]
    other_seed = build_loader(cfg, tiny_tokenizer(), TS, 3, seed=SHARD_SEED + 1)
    with pytest.raises(DataError, match="another data configuration \\(seed: saved 5, now 6\\)"):
        other_seed.load_states(states)
    other_len = build_loader(cfg, tiny_tokenizer(), TS + 1, 3, seed=SHARD_SEED)
    with pytest.raises(DataError, match="seq_len: saved 8, now 9"):
        other_len.load_states(states)
    one = build_loader(cfg, tiny_tokenizer(), TS, 6, seed=SHARD_SEED)
    with pytest.raises(DataError, match="got 1 states but they were saved by 2 ranks"):
        one.load_states(states[:1])
    with pytest.raises(DataError, match="state 0 has rank=1"):
        one.load_states(states[::-1])
    take(loaders[0], 1)  # rank 0 one micro-batch ahead: not an optimizer-step boundary
    with pytest.raises(DataError, match="different global positions \\[12, 18\\]"):
        one.load_states(checkpoint(loaders, tmp_path))
    with pytest.raises(DataError, match="version 1; expected 2"):
        one.load_states([{**s, "version": 1} for s in states])


# ---- streaming ----------------------------------------------------------------------------------

T = 4
SEED = 7


@cache
def word_tokenizer(n_words: int = 3000):
    """A word-level tokenizer: ``w<i>`` -> id i + 4, so every corpus word is its own token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]
    vocab = {s: i for i, s in enumerate(specials)} | {f"w{i}": i + 4 for i in range(n_words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[2], unk_token=specials[3])


def word_corpus(folder, first_word: int, n_files: int, docs_per_file: int) -> list[list[int]]:
    """jsonl files of documents of 12..30 distinct words; returns each document's ids, EOS included."""
    folder.mkdir(parents=True)
    docs, word = [], first_word
    for f in range(n_files):
        lines = []
        for d in range(docs_per_file):
            length = 12 + (7 * d + 5 * f) % 19
            ids = list(range(word, word + length))
            word += length
            lines.append(json.dumps({"text": " ".join(f"w{i}" for i in ids)}))
            docs.append([i + 4 for i in ids] + [1])
        (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    return docs


@pytest.fixture()
def stream_corpus(tmp_path):
    """Two sources (a: weight 2, b: weight 1), 3 x 8 and 2 x 8 documents, shuffled, buffer 5."""
    docs = word_corpus(tmp_path / "a", 0, 3, 8)
    docs += word_corpus(tmp_path / "b", 1500, 2, 8)
    sources = {"a": SourceConfig(kind="files", paths=[str(tmp_path / "a")], weight=2.0),
               "b": SourceConfig(kind="files", paths=[str(tmp_path / "b")], weight=1.0)}
    cfg = DataConfig(sources=sources, val_fraction=0.0, shuffle=True, shuffle_buffer=5, val_sequences=0,
                     tokenize_batch_docs=3)
    return cfg, docs


def stream_loaders(cfg, world, workers, batch, num_epochs, states=None):
    loaders = [build_loader(cfg, word_tokenizer(), T, batch, rank=r, world_size=world, num_workers=workers,
                            seed=SEED, num_epochs=num_epochs) for r in range(world)]
    notes = [loader.load_states(states) for loader in loaders] if states is not None else []
    return loaders, notes


def count_targets(batches, counts: Counter) -> None:
    """Counts each target token; an EOS target counts as ('eos', the word before it), or as
    ('eos', None) after another EOS: a run in progress may resume at its document's EOS, which then
    follows the previous document's EOS (``check_coverage`` attributes those)."""
    for batch in batches:
        for inputs, targets in zip(batch["input_ids"].tolist(), batch["targets"].tolist()):
            for x, y in zip(inputs, targets):
                counts[("eos", None if x == 1 else x) if y == 1 else y] += 1


def check_coverage(docs, counts: Counter, times: int, starts: int, ends: int) -> None:
    """Every token a target exactly ``times`` times but for packing's own losses: at most one token
    at each of ``starts`` stream starts (the first token of a document) and fewer than T at each of
    ``ends`` stream ends (a suffix of one document and a prefix of the next)."""
    names = [[("eos", d[-2]) if t == 1 else t for t in d] for d in docs]
    counts = Counter(counts)
    for _ in range(counts.pop(("eos", None), 0)):  # an EOS after an EOS: a document whose EOS is short
        short = [d for d in names if counts[d[-1]] < times and counts[d[-2]] == times]
        assert short, "an EOS target that belongs to no document"
        counts[short[0][-1]] += 1
    assert set(counts) <= {n for d in names for n in d}, "a target that is no corpus token"
    assert max(counts.values()) <= times, "a token trained on too often"
    missing = runs = 0
    for d in names:
        short = [i for i, n in enumerate(d) if counts[n] < times]
        missing += sum(times - counts[n] for n in d)
        if not short:
            continue
        prefix = next((i for i in range(len(d)) if i not in short), len(d))
        suffix = len(d) - next((i for i in reversed(range(len(d))) if i not in short), -1) - 1
        assert prefix + suffix == len(short) and prefix < len(d), f"tokens missed inside a document: {short}"
        runs += (prefix > 0) + (suffix > 0)
    assert runs <= starts + 2 * ends and missing <= starts + (T - 1) * ends, (runs, missing)


def run_chain(cfg, docs, tmp_path, chain, num_epochs=1):
    """Run the layouts of ``chain`` one after the other, each (world, workers, batch, k): k batches
    on every rank (None: to the end; a list: per rank), then a checkpoint and ``load_states`` into
    the next; returns the target counts and the number of stream starts and ends."""
    counts, states, starts = Counter(), None, 0
    for n, (world, workers, batch, k) in enumerate(chain):
        loaders, notes = stream_loaders(cfg, world, workers, batch, num_epochs, states)
        if n:
            old = chain[n - 1]
            assert all(note is None for note in notes) if old[:3] == (world, workers, batch) else all(
                note.startswith("data: re-mapped from") for note in notes)
        starts += world * max(1, workers) * len(cfg.sources)
        for r, loader in enumerate(loaders):
            n_batches = k[r] if isinstance(k, list) else k
            count_targets(list(loader) if k is None else take(loader, n_batches), counts)
        states = checkpoint(loaders, tmp_path)
    world, workers = chain[-1][:2]
    return counts, starts, world * max(1, workers) * len(cfg.sources)


def test_uninterrupted_stream_coverage_reference(stream_corpus, tmp_path):
    """The check itself on an uninterrupted epoch (it would fail on a repeat or a skip)."""
    cfg, docs = stream_corpus
    counts, starts, ends = run_chain(cfg, docs, tmp_path, [(2, 0, 1, None)])
    check_coverage(docs, counts, 1, starts, ends)
    repeated = Counter(counts)
    repeated[docs[3][5]] += 1
    with pytest.raises(AssertionError, match="too often"):
        check_coverage(docs, repeated, 1, starts, ends)
    skipped = Counter(counts)
    for t in docs[9][2:6]:
        skipped[t] = 0
    with pytest.raises(AssertionError, match="inside a document"):
        check_coverage(docs, skipped, 1, starts, ends)


def test_stream_remap_covers_every_token_once(stream_corpus, tmp_path):
    """2 ranks x 0 workers, micro-batch 2, interrupted after 5 batches -> 3 ranks x 2 workers,
    micro-batch 1, to the end of the epoch."""
    cfg, docs = stream_corpus
    counts, starts, ends = run_chain(cfg, docs, tmp_path, [(2, 0, 2, 5), (3, 2, 1, None)])
    check_coverage(docs, counts, 1, starts, ends)


def test_stream_remap_twice_without_workers(stream_corpus, tmp_path):
    """2 -> 3 -> 1 ranks with batch sizes 2, 1, 1, the streams of the 3-rank layout in mid-run."""
    cfg, docs = stream_corpus
    counts, starts, ends = run_chain(cfg, docs, tmp_path, [(2, 0, 2, 6), (3, 0, 1, 9), (1, 0, 1, None)])
    check_coverage(docs, counts, 1, starts, ends)


def test_stream_remap_of_a_remap_that_never_ran(stream_corpus, tmp_path):
    """2 -> 1 (no batch: one stream holds a run in progress, then the other's, one token later)
    -> 3 ranks: the second run now opens a stream and must start at the token already trained on."""
    cfg, docs = stream_corpus
    counts, starts, ends = run_chain(cfg, docs, tmp_path, [(2, 0, 1, 5), (1, 0, 1, 0), (3, 0, 1, None)])
    check_coverage(docs, counts, 1, starts, ends)


STREAM_CHAINS = [
    [(2, 1, 2, 0), (3, 0, 1, None)],                            # nothing delivered yet
    [(2, 0, 1, 1), (1, 2, 1, None)],
    [(1, 0, 3, 10), (2, 1, 1, None)],                           # 1 -> 2 ranks
    [(2, 2, 2, 4), (2, 0, 2, 3), (2, 1, 1, None)],              # workers 2 -> 1 -> 1 (same layout once)
    [(2, 0, 2, 6), (3, 1, 1, 5), (1, 0, 1, None)],              # 2 -> 3 -> 1
    [(3, 0, 1, 12), (1, 0, 4, 2), (2, 2, 1, 3), (3, 0, 1, None)],
    [(2, 0, 2, 30), (1, 0, 1, None)],                           # deep into the epoch, buffers full
    [(2, 0, 2, 6), (2, 0, 3, 4), (1, 0, 1, None)],              # only the batch size changes first
]


@pytest.mark.slow
@pytest.mark.parametrize("chain", STREAM_CHAINS)
def test_stream_remap_matrix(stream_corpus, tmp_path, chain):
    cfg, docs = stream_corpus
    counts, starts, ends = run_chain(cfg, docs, tmp_path, chain)
    check_coverage(docs, counts, 1, starts, ends)


def test_stream_remap_of_streams_in_different_epochs(stream_corpus, tmp_path):
    """Two epochs; rank 0 runs far into the second epoch while rank 1 is still in the first, then
    3 ranks finish: every token twice."""
    cfg, docs = stream_corpus
    loaders, _ = stream_loaders(cfg, 2, 0, 1, 2)
    counts = Counter()
    count_targets(take(loaders[0], 120), counts)
    count_targets(take(loaders[1], 15), counts)
    states = checkpoint(loaders, tmp_path)
    epochs = [[src["epoch"] for src in s["workers"][0]["upstream"]["sources"]] for s in states]
    assert epochs[0] == [2, 2] and epochs[1] == [1, 1]  # next regular epochs: rank 0 is in epoch 1
    resumed, notes = stream_loaders(cfg, 3, 0, 1, 2, states)
    assert "streaming: exact document coverage" in notes[0]
    for loader in resumed:
        count_targets(list(loader), counts)
    check_coverage(docs, counts, 2, starts=2 * 2 + 3 * 2, ends=3 * 2)


def test_stream_batch_size_change_continues_the_streams(stream_corpus, tmp_path):
    cfg, _ = stream_corpus
    loaders, _ = stream_loaders(cfg, 2, 0, 2, None)
    reference = [rows(b) for b in take(stream_loaders(cfg, 2, 0, 2, None)[0][1], 6)]
    take(loaders[0], 2)
    take(loaders[1], 2)
    resumed, notes = stream_loaders(cfg, 2, 0, 4, None, checkpoint(loaders, tmp_path))
    assert notes[1] == ("data: re-mapped from 2 ranks x 1 worker (micro-batch 2) to 2 ranks x 1 worker "
                        "(micro-batch 4) (streaming: the same streams continue)")
    flat = [r for b in reference for r in b]
    assert [r for b in take(resumed[1], 2) for r in rows(b)] == flat[4:12]
    assert resumed[1].state_dict()["batches"] == 1 + 2  # (2 + 2) x 2 sequences = 1 batch of 2 x 4, then 2


def test_stream_refusals(stream_corpus, tmp_path):
    cfg, _ = stream_corpus
    loaders, _ = stream_loaders(cfg, 2, 0, 2, None)
    take(loaders[0], 1)
    states = checkpoint(loaders, tmp_path)
    cfg.shuffle_buffer = 6
    other = stream_loaders(cfg, 1, 0, 2, None)[0][0]
    with pytest.raises(DataError, match="shuffle_buffer: saved 5, now 6"):
        other.load_states(states)
    with pytest.raises(DataError, match="expected >= 1"):
        build_loader(cfg, word_tokenizer(), T, 0)
    with pytest.raises(DataError, match="needs the list of every rank's state_dict"):
        other.load_states(states[0])


def test_remap_deals_runs_and_buffered_sequences(stream_corpus, tmp_path):
    """The re-mapped states themselves: buffered sequences dealt round-robin, none lost, and a
    further resume of an unstarted re-mapped loader (its states are explicit) still covers all."""
    cfg, docs = stream_corpus
    loaders, _ = stream_loaders(cfg, 2, 0, 1, 1)
    counts = Counter()
    for loader in loaders:
        count_targets(take(loader, 8), counts)
    states = checkpoint(loaders, tmp_path)
    buffered = [tuple(r) for s in states for r in s["workers"][0]["items"].tolist()]
    assert len(buffered) == 10
    middle, _ = stream_loaders(cfg, 3, 0, 1, 1, states)
    dealt = [[tuple(r) for r in m.state_dict()["workers"][0]["items"].tolist()] for m in middle]
    assert [len(d) for d in dealt] == [4, 3, 3] and sorted(sum(dealt, [])) == sorted(buffered)
    assert all(m.state_dict()["workers"][0]["generation"] == 1 for m in middle)
    final, _ = stream_loaders(cfg, 1, 0, 1, 1, checkpoint(middle, tmp_path))  # 3 unstarted streams -> 1
    for loader in final:
        count_targets(list(loader), counts)
    check_coverage(docs, counts, 1, starts=2 * 2 + 1 * 2, ends=1 * 2)
    assert list(islice(iter(final[0]), 1)) == []
