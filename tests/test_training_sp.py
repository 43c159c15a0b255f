"""Sequence parallelism in the trainer (train.sequence_parallel=K).

In-process (fast): the start-up checks name the bad setting (K not dividing the world size, a
sequence shorter than K chunks, torch.compile, an architecture or model without support, a
recorded global batch that does not divide over the data-parallel groups of a resume), the batch
plan counts data-parallel groups, the group layout. End to end (slow, the trainer in subprocesses,
CPU/gloo): 2 ranks splitting every sequence (K=2, T=31: chunks of 16 and 15) give the losses,
gradient norms and validation losses of one process, for ParaGRU (ZeRO 0) and Llama (Ulysses,
ZeRO 2); a K=2 checkpoint resumes in one process (K=1) with the uninterrupted run's losses.
"""

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_trainer
from omegaconf import OmegaConf

from newtonlm.training.config import BatchPlan, TrainConfig, WandbConfig, batch_plan, validate
from newtonlm.training.distributed import sequence_groups
from newtonlm.training.errors import UserError
from newtonlm.training.loop import check_model_sequence_parallel

# Measured on the 2-core VM (fp32): the K=2 losses equal the 1-process ones to ~4e-8 relative
# (ParaGRU and Llama), gradient norms to ~1e-7: sums in another order. Asserted with margin.
RTOL = 1e-5


# ----------------------------------------------------------------------------- start-up checks


@pytest.mark.parametrize("settings,world,message", [
    ({"sequence_parallel": 2}, 3, "train.sequence_parallel=2 does not divide the world size 3"),
    ({"sequence_parallel": 4, "seq_len": 3}, 4, "train.seq_len=3 cannot be split over "
                                                "train.sequence_parallel=4 ranks; expected seq_len >= 4"),
    ({"sequence_parallel": 2, "compile": True}, 2, "train.compile=true with train.sequence_parallel=2"),
    ({"sequence_parallel": 0}, 2, "train.sequence_parallel=0; expected a positive integer"),
])
def test_bad_sequence_parallel_settings_are_refused_naming_the_value(settings, world, message):
    with pytest.raises(UserError, match=message):
        validate(TrainConfig(**settings), WandbConfig(), world)


def test_the_batch_is_spread_over_data_parallel_groups():
    cfg = TrainConfig(micro_batch_size=2, grad_accum=1, sequence_parallel=2)
    plan = batch_plan(cfg, 4)  # 4 ranks = 2 groups of 2: the default global batch is 2 x 1 x 2
    assert plan == BatchPlan(4, 2, 1, 2, sequence_parallel=2)
    assert plan.describe() == ("global batch 4 sequences = 2 data-parallel groups (each sequence split "
                               "over 2 ranks) x 1 micro-step x 2")
    assert batch_plan(cfg, 2, recorded=4) == BatchPlan(4, 2, 2, 1, sequence_parallel=2)
    assert batch_plan(TrainConfig(micro_batch_size=2), 2, recorded=4) == BatchPlan(4, 2, 1, 2)


def test_a_recorded_batch_that_does_not_map_onto_the_new_layout_is_refused():
    """A 4-sequence run resumed on 6 ranks with K=2: 3 data-parallel groups cannot share 4."""
    with pytest.raises(UserError, match="the run's global batch \\(recorded in its checkpoints\\)=4 "
                                        "sequences per step does not divide over 3 data-parallel groups"):
        batch_plan(TrainConfig(sequence_parallel=2), 6, recorded=4)


def test_groups_are_consecutive_ranks():
    assert sequence_groups(6, 2) == [[0, 1], [2, 3], [4, 5]]
    assert sequence_groups(4, 4) == [[0, 1, 2, 3]]
    assert sequence_groups(3, 1) == [[0], [1], [2]]


MAMBA = {"arch": "mamba2", "hidden_size": 32, "num_hidden_layers": 1, "head_dim": 16}
LLAMA = {"arch": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2, "intermediate_size": 64}
GRU = {"arch": "paragru", "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2, "conv_kernel": 4}


@pytest.mark.parametrize("model,K,seq_len,message", [
    (MAMBA, 2, 64, "train.sequence_parallel=2: arch 'mamba2' has no sequence parallelism"),
    (LLAMA, 4, 64, "num_attention_heads=2, num_key_value_heads=2 over sequence_parallel=4"),
    (GRU, 4, 11, r"chunks \[3, 3, 3, 2\]; the paragru convolution \(conv_kernel=4\)"),
    ({**GRU, "hidden_size": -1}, 2, 64, "model \\(paragru\\): "),
])
def test_the_model_is_checked_before_any_work(model, K, seq_len, message):
    cfg = OmegaConf.create({"model": model})
    with pytest.raises(UserError, match=message):
        check_model_sequence_parallel(cfg, TrainConfig(sequence_parallel=K, seq_len=seq_len))
    check_model_sequence_parallel(cfg, TrainConfig(sequence_parallel=1, seq_len=seq_len))  # K=1: no check


# ----------------------------------------------------------------------------- end to end

TINY = ["train.seq_len=31", "train.micro_batch_size=2", "train.eval_every=2", "train.log_every=1",
        "train.sample_tokens=0", "train.progress=false", "data.val_sequences=4", "data.num_workers=1",
        "data.tokenizer.vocab_size=512", "wandb=disabled", "train.max_steps=4", "train.save_every=2"]
MODELS = {
    "paragru": ["model.hidden_size=32", "model.num_hidden_layers=2", "model.intermediate_size=64",
                "model.num_heads=2"],
    "llama": ["model=llama_demo", "model.hidden_size=32", "model.num_hidden_layers=2",
              "model.intermediate_size=64", "model.num_attention_heads=2", "model.num_key_value_heads=2",
              "train.zero_stage=2", "train.sample_tokens=4"],
}


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizers")


def train(run_dir, *overrides, nproc=1, tok_cache=None):
    return run_trainer([*TINY, f"hydra.run.dir={run_dir}", f"data.tokenizer.cache_dir={tok_cache}",
                        *overrides], nproc=nproc)


def records(run_dir, kind):
    rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["kind"] == kind]


def _same(a, b, keys):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["step"] == y["step"]
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=RTOL), (key, x, y)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["paragru", "llama"])
def test_two_ranks_splitting_each_sequence_train_like_one_process(tmp_path, tok_cache, arch):
    one, split = tmp_path / "one", tmp_path / "split"
    single = train(one, *MODELS[arch], tok_cache=tok_cache)
    proc = train(split, *MODELS[arch], "train.sequence_parallel=2", nproc=2, tok_cache=tok_cache)
    assert "1 data-parallel group (each sequence split over 2 ranks)" in proc.stderr
    _same(records(one, "train"), records(split, "train"), ("loss", "grad_norm", "tokens_seen"))
    _same(records(one, "val"), records(split, "val"), ("val_loss", "val_tokens"))
    if arch == "llama":  # generation runs whole on every rank (switched off and on): the same sample
        def sample(p):
            return p.stdout.split("sample:\n")[1].split("\nwhat the numbers mean")[0]
        assert sample(proc) == sample(single)


@pytest.mark.slow
def test_a_sequence_parallel_checkpoint_resumes_with_another_k(tmp_path, tok_cache):
    """K=2 on 2 ranks to step 4 (checkpoints at 2 and 4); its step-2 checkpoint resumed in one
    process (K=1): steps 3 and 4 have the uninterrupted run's losses; the checkpoint holds one
    data-loader state (one data-parallel group)."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, *MODELS["paragru"], "train.sequence_parallel=2", nproc=2, tok_cache=tok_cache)
    shutil.copytree(a, b)
    proc = train(b, *MODELS["paragru"], "train.resume=step_00000002", "train.overwrite=true",
                 tok_cache=tok_cache)
    assert "resumed on 1 rank from a 2-rank checkpoint" in proc.stderr, proc.stderr[-2000:]
    resumed = records(b, "train")[-2:]  # (metrics.jsonl came with the copy: the resumed steps are last)
    assert [r["step"] for r in resumed] == [3, 4]
    _same(records(a, "train")[2:], resumed, ("loss", "grad_norm", "tokens_seen"))
