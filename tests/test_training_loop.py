"""The trainer's decisions and its loss, in process (no DeepSpeed run): the resume plan, the resume
config check, when to validate and log, and the batch convention shared by the data loader and the
trainer (``targets`` are already shifted; ``model(**batch)`` computes no loss)."""

import copy

import pytest
import torch
from test_data_common import tiny_tokenizer

from newtonlm.data import build_dataloaders, compose_data_config, vocab_size_for_model
from newtonlm.models import ARCHS, build_model, load_preset
from newtonlm.training.checkpoint import MARKER, Checkpoints
from newtonlm.training.config import TrainConfig
from newtonlm.training.loop import (
    ResumePlan,
    check_resume_config,
    checkpoint_index,
    count_targets,
    log_due,
    resume_plan,
    token_loss_sum,
    validation_due,
)

S2, S4, S6 = "step_00000002", "step_00000004", "step_00000006"


def plan(checkpoints, resume="auto", overwrite=False):
    return resume_plan(checkpoints, TrainConfig(resume=resume, overwrite=overwrite), where="ck")


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
    # a tag that does not exist is planned as asked; loading it fails with the list of complete ones
    assert plan({S2: True}, resume=S4) == ResumePlan(tag=S4)


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
    return {"model": {"arch": "paragru", "hidden_size": 32}, "data": {"sources": {"s": {"kind": "bible"}}},
            "train": {"seq_len": 32, "micro_batch_size": 2, "grad_accum": 1, "seed": 1, "lr": 1e-3},
            "wandb": {"mode": "disabled"}}


def test_check_resume_config_names_every_difference_that_breaks_the_run():
    saved = {"config": _resolved(), "world_size": 1}
    check_resume_config(saved, _resolved(), 1)
    changed = _resolved()
    changed["train"]["lr"], changed["wandb"]["mode"] = 3e-3, "offline"  # may change across a resume
    check_resume_config(saved, changed, 1)
    changed = copy.deepcopy(changed)
    changed["model"]["hidden_size"] = 64
    changed["train"]["seq_len"], changed["train"]["seed"] = 64, 2
    with pytest.raises(ValueError, match=r"different settings \(model, train.seq_len, train.seed, "
                                         r"world size \(1 saved, 2 now\)\); resume with the same ones"):
        check_resume_config(saved, changed, 2)


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
