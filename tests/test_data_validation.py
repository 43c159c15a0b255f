"""The validation set is the run's, not the allocation's: the same sequences, scored once each,
on any number of ranks and micro-batch size (data.val_sequences)."""

from collections import Counter

import pytest
import torch
from test_data_common import tiny_tokenizer

from newtonlm.data import DataError, build_dataloaders, compose_data_config
from newtonlm.data.loader import IGNORE_INDEX, ValidationSet


def _scored(batches) -> Counter:
    """Every scored row (its input ids and targets with the ignored targets left out) and how often."""
    rows = Counter()
    for batch in batches:
        for ids, targets in zip(batch["input_ids"], batch["targets"]):
            keep = targets != IGNORE_INDEX
            if keep.any():
                rows[(tuple(ids.tolist()), tuple(targets[keep].tolist()))] += 1
    return rows


@pytest.fixture(scope="module")
def setup():
    cfg = compose_data_config(["data.num_workers=0", "data.val_sequences=7"])
    return cfg, tiny_tokenizer()


def test_the_same_set_on_any_number_of_ranks(setup):
    cfg, tok = setup
    reference = None
    for world, micro in [(1, 7), (1, 2), (2, 3), (3, 2), (4, 1), (8, 1)]:
        shares, lengths = Counter(), set()
        for rank in range(world):
            _, val = build_dataloaders(cfg, tok, seq_len=16, micro_batch_size=micro, rank=rank,
                                       world_size=world, seed=rank)  # the seed is the training stream's
            batches = list(val)
            lengths.add((len(batches), tuple(b["input_ids"].shape for b in batches)))
            shares += _scored(batches)
        assert len(lengths) == 1, f"world {world}: ranks run different numbers/shapes of batches {lengths}"
        assert sum(shares.values()) == 7 and max(shares.values()) == 1  # each sequence scored once
        reference = reference or shares
        assert shares == reference, f"world {world}, micro {micro}: another validation set"


def test_it_is_the_first_sequences_of_the_single_stream(setup):
    cfg, tok = setup
    _, one = build_dataloaders(cfg, tok, seq_len=16, micro_batch_size=7, rank=0, world_size=1, seed=0)
    (batch,) = list(one)
    assert batch["input_ids"].shape == (7, 16) and (batch["targets"] != IGNORE_INDEX).all()
    _, rank1 = build_dataloaders(cfg, tok, seq_len=16, micro_batch_size=2, rank=1, world_size=3, seed=0)
    rows = torch.cat([b["input_ids"] for b in rank1])
    assert torch.equal(rows[:2], batch["input_ids"][[1, 4]])  # rank 1 of 3: sequences 1 and 4 ...
    padded = torch.cat([b["targets"] for b in rank1])[2:]  # ... and padding to rank 0's 3 (2 batches of 2)
    assert padded.shape == (2, 16) and (padded == IGNORE_INDEX).all()


def test_fewer_sequences_than_ranks_still_gives_every_rank_a_batch(setup):
    cfg, tok = setup
    _, val = build_dataloaders(compose_data_config(["data.num_workers=0", "data.val_sequences=1"]), tok,
                               seq_len=16, micro_batch_size=4, rank=2, world_size=3, seed=0)
    (batch,) = list(val)
    assert batch["input_ids"].shape == (1, 16) and (batch["targets"] == IGNORE_INDEX).all()


def test_bad_values_are_refused(setup):
    cfg, tok = setup
    with pytest.raises(DataError, match="data.val_sequences=-1"):
        compose_data_config(["data.num_workers=0", "data.val_sequences=-1"])
    with pytest.raises(DataError, match="num_sequences=0"):
        ValidationSet(None, 0)
    with pytest.raises(DataError, match="rank=3 with world_size=2"):
        ValidationSet(None, 4, rank=3, world_size=2)
