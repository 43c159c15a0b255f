"""The trainer's decisions and its loss, in process (no DeepSpeed run): the resume plan, the resume
config check, the schedule after a resume with another learning rate, when to validate and log, and
the batch convention shared by the data loader and the trainer (``targets`` are already shifted;
``model(**batch)`` computes no loss)."""

import copy

import pytest
import torch
from test_data_common import tiny_tokenizer

from newtonlm.data import build_dataloaders, compose_data_config, vocab_size_for_model
from newtonlm.models import ARCHS, build_model, load_preset
from newtonlm.training.checkpoint import MARKER, Checkpoints
from newtonlm.training.config import TrainConfig
from newtonlm.training.loop import count_targets, log_due, token_loss_sum, validation_due
from newtonlm.training.optim import build_scheduler
from newtonlm.training.resume import (
    ResumePlan,
    ResumeRefused,
    check_resume_config,
    checkpoint_index,
    reschedule,
    resume_differences,
    resume_plan,
)

S2, S4, S6 = "step_00000002", "step_00000004", "step_00000006"


def plan(checkpoints, resume="auto", overwrite=False, unusable=None):
    return resume_plan(checkpoints, TrainConfig(resume=resume, overwrite=overwrite), where="ck",
                       unusable=unusable)


def test_resume_auto_takes_the_newest_complete_checkpoint():
    assert plan({}) == ResumePlan()
    # by step, not by the order given; an incomplete newer folder (a crashed save) is passed over
    assert plan({S4: True, S6: False, S2: True}) == ResumePlan(tag=S4)
    assert plan({S2: False}) == ResumePlan()
    assert plan({S2: True, S4: True}, overwrite=True) == ResumePlan(tag=S4)  # nothing to delete


def test_resume_from_a_tag_deletes_later_checkpoints_only_with_overwrite():
    held = {S2: True, S4: True, S6: False}
    refused = plan(held, resume=S2)
    assert refused.tag is None and refused.delete == ()
    assert refused.error.startswith(f"train.resume={S2} but ck also holds later checkpoints ({S4}, {S6})")
    assert "train.overwrite=true" in refused.error
    assert plan(held, resume=S2, overwrite=True) == ResumePlan(tag=S2, delete=(S4, S6))
    assert plan({S2: True, S4: True}, resume=S4) == ResumePlan(tag=S4)
    # a tag that does not exist or is partial: refused in the plan, with the complete ones
    assert plan({S2: True}, resume=S4).error == (f"train.resume={S4} but ck holds no folder of that name; "
                                                 f"complete checkpoints: {S2}")
    assert plan({S2: True, S4: False}, resume=S4, overwrite=True).error == (
        f"train.resume={S4} but ck holds a partial folder (its save did not finish) of that name; "
        f"complete checkpoints: {S2}")


def test_an_unusable_checkpoint_is_skipped_by_auto_and_refused_by_name():
    bad = {S6: "ck/step_00000006/mp_rank_00_model_states.pt has 10 bytes, expected 20 (truncated ...)"}
    held = {S2: True, S4: True, S6: True}
    assert plan(held, unusable=bad) == ResumePlan(tag=S4, skipped=((S6, bad[S6]),))
    # an older unusable one is not "skipped": auto never looked at it
    assert plan(held, unusable={S2: "x"}) == ResumePlan(tag=S6)
    # every complete one unusable: an error, never a silent fresh start
    refused = plan({S2: True, S4: False}, unusable={S2: "broken"})
    assert refused.tag is None and refused.skipped == ((S2, "broken"),)
    assert refused.error.startswith(f"ck holds no usable checkpoint ({S2}: broken), and train.resume=auto "
                                    "does not silently start over")
    assert "train.resume=none train.overwrite=true" in refused.error
    named = plan(held, resume=S6, unusable=bad)
    assert named.tag is None and named.error == (
        f"train.resume={S6}: checkpoint ck/{S6} is unusable: {bad[S6]}; resume from another one (complete: "
        f"{S2}, {S4}, {S6}), or train.resume=auto (the newest usable one)")


def test_resume_none_starts_over_only_in_an_empty_directory_or_with_overwrite():
    assert plan({}, resume="none") == ResumePlan()
    refused = plan({S2: True, S4: False}, resume="none")
    assert refused.error == ("ck already holds checkpoints and train.resume=none: use train.resume=auto, "
                             "another hydra.run.dir, or train.overwrite=true")
    assert plan({S4: False, S2: True}, resume="none", overwrite=True) == ResumePlan(delete=(S2, S4))


def test_checkpoint_index_reads_folders_and_markers(tmp_path):
    for tag in (S2, S4, "step_12", "notes"):
        (tmp_path / tag).mkdir()
    (tmp_path / S2 / MARKER).write_text("{}")
    (tmp_path / "latest").write_text(S2)
    assert checkpoint_index(Checkpoints(tmp_path, keep_last=2, is_main=True)) == {S2: True, S4: False}
    assert checkpoint_index(Checkpoints(tmp_path / "missing", keep_last=2, is_main=True)) == {}


def _resolved():
    return {"model": {"arch": "paragru", "hidden_size": 32, "cell_mode": "auto", "newton_max_iters": 3},
            "data": {"sources": {"s": {"kind": "files", "paths": ["a.txt"], "weight": 1.0}},
                     "val_sequences": 4,
                     "num_workers": 1, "shuffle": True, "tokenizer": {"vocab_size": 512, "cache_dir": "c"}},
            "train": {"seq_len": 32, "micro_batch_size": 2, "grad_accum": 1, "seed": 1, "lr": 1e-3,
                      "max_steps": 10, "zero_stage": 0, "betas": [0.9, 0.95]},
            "wandb": {"mode": "disabled"}}


def _facts(**changes):
    facts = {"config": _resolved(), "world_size": 1, "tokenizer_fingerprint": "a" * 16, "tokenizer_size": 512,
             "vocab_size": 512, "data_signature": {"sources": [["DocumentSource", "s", "f1"]], "workers": 1,
                                                   "seq_len": 32}}
    facts.update(changes)
    return facts


def test_settings_that_may_change_on_resume():
    now = _facts()
    cfg = now["config"]
    cfg["train"].update(lr=3e-3, max_steps=20)  # longer, another learning rate: the schedule follows
    cfg["wandb"]["mode"] = "offline"
    cfg["model"].update(cell_mode="fused", newton_max_iters=5)  # how the recurrence is solved
    cfg["data"].update(val_sequences=8, num_workers=2)  # workers: re-mapped by the loader
    cfg["data"]["sources"]["s"]["paths"] = ["/moved/a.txt"]  # the files: compared by the signature
    cfg["data"]["tokenizer"].update(cache_dir="elsewhere", vocab_size=500)  # the tokenizer: by fingerprint
    cfg["train"]["new_setting_of_a_later_version"] = 1  # absent from the checkpoint: not compared
    assert resume_differences(_facts(), now) == []
    check_resume_config(_facts(), now)
    # a checkpoint of an older format records fewer facts: only those are compared
    older = {"config": _resolved()}
    assert resume_differences(older, _facts(world_size=2, tokenizer_fingerprint="b" * 16)) == []


def test_check_resume_config_names_every_difference_with_both_values():
    now = _facts(world_size=2, data_signature={"sources": [["DocumentSource", "s", "f2"]], "workers": 2,
                                               "seq_len": 64})
    now["config"]["model"]["hidden_size"] = 64
    now["config"]["train"].update(seq_len=64, seed=2, betas=[0.9, 0.99])
    now["config"]["data"]["shuffle"] = False
    del now["config"]["train"]["zero_stage"]
    assert resume_differences(_facts(), now) == [
        "model.hidden_size (32 in the checkpoint, 64 now)",
        "data.shuffle (true in the checkpoint, false now)",
        "train.seq_len (32 in the checkpoint, 64 now)", "train.seed (1 in the checkpoint, 2 now)",
        "train.zero_stage (0 in the checkpoint, absent now)",
        "train.betas ([0.9, 0.95] in the checkpoint, [0.9, 0.99] now)",
        'data files (per source: type, name, fingerprint of the file names and sizes) '
        '([["DocumentSource", "s", "f1"]] in the checkpoint, [["DocumentSource", "s", "f2"]] now)',
        # the world size may change (elastic resume), the global batch may not: 2 x 1 x 1 rank then,
        # 2 x 1 x 2 ranks now (no train.global_batch_size in either config)
        "train.global_batch_size (sequences per optimizer step: 2 in the checkpoint, 4 now)"]
    with pytest.raises(ResumeRefused, match=r"^checkpoint ck/step_2 was written with other settings than "
                       r"this run's: model.hidden_size \(32 in the checkpoint, 64 now\); data.shuffle .* "
                       r"4 now\)\. A resume continues the same run: "
                       r".*another hydra.run.dir, or train.resume=none train.overwrite=true"):
        check_resume_config(_facts(), now, "checkpoint ck/step_2")


def test_another_architecture_is_named_once_and_another_tokenizer_even_at_the_same_vocabulary_size():
    now = _facts(tokenizer_fingerprint="b" * 16, tokenizer_size=500)  # 500 tokens: still 512 rows
    now["config"]["model"] = {"arch": "llama", "hidden_size": 32, "num_attention_heads": 2}
    assert resume_differences(_facts(), now) == [
        'model.arch ("paragru" in the checkpoint, "llama" now)',
        f"tokenizer (fingerprint {'a' * 16}, 512 tokens, model vocabulary 512 in the checkpoint; "
        f"fingerprint {'b' * 16}, 500 tokens, model vocabulary 512 now)"]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_a_resume_with_another_learning_rate_or_length_follows_the_new_schedule(schedule):
    """The checkpoint restores the old peak rate (scheduler base_lrs) and the optimizer's current
    rate; reschedule makes the resumed steps use the new settings: the rates of a schedule built
    with them from step 0 (the independent reference), from the first resumed step on."""
    def optimizer(lr):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        return torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}],
                                 lr=lr)

    def steps(opt, sched, n):
        rates = []
        for _ in range(n):
            rates.append(sched.get_last_lr()[0])
            assert all(g["lr"] == rates[-1] for g in opt.param_groups)  # the rate the step applies
            opt.step()
            sched.step()
        return rates

    old_cfg = TrainConfig(lr=1e-3, schedule=schedule, warmup_steps=2)
    new_cfg = TrainConfig(lr=4e-3, schedule=schedule, warmup_steps=2)
    opt = optimizer(old_cfg.lr)
    sched = build_scheduler(opt, old_cfg, 10)
    steps(opt, sched, 5)
    saved = (copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))

    ref_opt = optimizer(new_cfg.lr)
    ref_sched = build_scheduler(ref_opt, new_cfg, 20)
    reference = steps(ref_opt, ref_sched, 9)[5:]

    opt = optimizer(new_cfg.lr)  # the resumed run: built with the new settings, then the checkpoint loaded
    sched = build_scheduler(opt, new_cfg, 20)
    opt.load_state_dict(saved[0])
    sched.load_state_dict(saved[1])
    assert sched.base_lrs == [1e-3, 1e-3]  # without reschedule: the old peak rate, silently
    reschedule(sched, new_cfg.lr)
    assert sched.last_epoch == 5 and steps(opt, sched, 4) == pytest.approx(reference, rel=1e-12)


def test_validation_and_logging_steps():
    # the last step is validated once, by the final validation, not also by eval_every
    assert [s for s in range(1, 7) if validation_due(s, 6, eval_every=2)] == [2, 4]
    assert [s for s in range(1, 7) if validation_due(s, 6, eval_every=4)] == [4]
    assert not any(validation_due(s, 6, eval_every=0) for s in range(1, 7))
    assert [s for s in range(1, 8) if log_due(s, 7, log_every=3)] == [3, 6, 7]


@pytest.fixture(scope="module")
def loader_batch():
    cfg = compose_data_config(["data.num_workers=0"])
    tok = tiny_tokenizer()
    train, _ = build_dataloaders(cfg, tok, seq_len=16, micro_batch_size=2, rank=0, world_size=1, seed=0)
    return next(iter(train)), vocab_size_for_model(tok)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", ARCHS)
def test_loader_batches_train_on_the_next_token_and_cannot_feed_a_model_loss(arch, loader_batch):
    """The trainer's loss on a loader batch is the model's own causal-LM loss in the Hugging Face
    convention (``labels`` = the unshifted tokens) on the same window; ``model(**batch)`` gives no
    loss at all (``targets`` is not a loss keyword), so it cannot train on a two-token shift."""
    batch, vocab = loader_batch
    assert set(batch) == {"input_ids", "targets"}
    torch.manual_seed(0)
    model = build_model(load_preset(f"{arch}_demo"), vocab).eval()
    window = torch.cat([batch["input_ids"][:, :1], batch["targets"]], dim=1)  # [B, T + 1] tokens
    assert torch.equal(window[:, :-1], batch["input_ids"])
    with torch.no_grad():
        trainer_loss = token_loss_sum(model, batch, "cpu") / count_targets(batch)
        hf_loss = model(input_ids=window, labels=window).loss
        out = model(**batch)
    assert count_targets(batch) == batch["targets"].numel() == 2 * 16
    torch.testing.assert_close(trainer_loss, hf_loss, rtol=1e-5, atol=1e-6)
    assert out.loss is None and out.logits.shape == (2, 16, model.config.vocab_size)
