"""Checkpoint folders in process (newtonlm/training/checkpoint.py): the COMPLETE marker, the
``latest`` pointer, keep-last pruning, partial folders left by a crash, re-saved tags and loading.

A fake engine stands in for DeepSpeed: its ``save_checkpoint`` writes files the way DeepSpeed's does
(``<save_dir>/<tag>/`` with the model and optimizer states, the client state inside the model file,
``<save_dir>/latest`` only with ``save_latest=True``), and it can crash part way through a save.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist

from newtonlm.training.checkpoint import MARKER, Checkpoints, tag_for

FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")


class Crash(RuntimeError):
    pass


class FakeEngine:
    """``save_checkpoint`` / ``load_checkpoint`` with DeepSpeed's signatures and file layout.
    ``crash_after``: raise after writing that many files of the next save (a killed save)."""

    def __init__(self, crash_after=None):
        self.saves, self.crash_after = [], crash_after

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        self.saves.append({"save_dir": save_dir, "tag": tag, "save_latest": save_latest})
        folder = os.path.join(save_dir, tag)
        os.makedirs(folder, exist_ok=True)
        for i, name in enumerate(FILES):
            if i == self.crash_after:
                raise Crash(f"killed while saving {tag}")
            torch.save({"client_state": client_state, "file": name}, os.path.join(folder, name))
        if save_latest:
            with open(os.path.join(save_dir, "latest"), "w") as fh:
                fh.write(tag)
        return True

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True, load_lr_scheduler_states=True):
        path = os.path.join(load_dir, tag, FILES[0])
        if not os.path.isfile(path):  # DeepSpeed warns and returns (None, None)
            return None, None
        return path, torch.load(path)["client_state"]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("NEWTONLM_FAULTS", raising=False)  # no fault injection in the saves
    assert not dist.is_initialized()  # barriers are no-ops


def listing(root):
    """(checkpoint folders, the tag ``latest`` names or None), everything else in root too."""
    names = sorted(os.listdir(root))
    latest = (root / "latest").read_text() if "latest" in names else None
    return [n for n in names if n != "latest"], latest


def make(root, *steps, keep_last=100):
    ck, engine = Checkpoints(root, keep_last=keep_last, is_main=True), FakeEngine()
    for step in steps:
        ck.save(engine, step, {"step": step})
    return ck


def test_tag_names():
    assert [tag_for(s) for s in (0, 100, 12345678)] == ["step_00000000", "step_00000100", "step_12345678"]


def test_save_writes_deepspeed_files_then_the_marker_then_latest(tmp_path):
    root = tmp_path / "checkpoints"
    ck, engine = Checkpoints(root, keep_last=2, is_main=True), FakeEngine()
    assert ck.latest_complete() is None and not ck.has_any()
    tag = ck.save(engine, 100, {"step": 100, "tokens_seen": 6400})
    assert tag == "step_00000100"
    # DeepSpeed must not write `latest` itself (it would name the folder before COMPLETE exists)
    assert engine.saves == [{"save_dir": str(root), "tag": tag, "save_latest": False}]
    assert sorted(os.listdir(root / tag)) == sorted([*FILES, MARKER])
    assert json.loads((root / tag / MARKER).read_text())["step"] == 100
    assert listing(root) == (["step_00000100"], "step_00000100")  # no temporary files left
    assert ck.load(engine, tag) == {"step": 100, "tokens_seen": 6400}


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_keep_last_keeps_the_newest_complete_checkpoints(tmp_path, keep_last):
    root = tmp_path / "checkpoints"
    ck, engine = Checkpoints(root, keep_last=keep_last, is_main=True), FakeEngine()
    saved = []
    for step in (100, 200, 300, 400, 500):
        saved.append(ck.save(engine, step, {"step": step}))
        assert listing(root) == (saved[-keep_last:], saved[-1])
    assert ck.complete() == [(int(t[5:]), t) for t in saved[-keep_last:]]
    assert ck.latest_complete() == "step_00000500"


def test_pruning_never_removes_the_checkpoint_latest_names(tmp_path):
    root = tmp_path / "checkpoints"
    make(root, 100, 200, 300)
    (root / "latest").write_text("step_00000100")  # e.g. DeepSpeed's pointer left on an older tag
    Checkpoints(root, keep_last=1, is_main=True).prune()
    assert listing(root) == (["step_00000100", "step_00000300"], "step_00000100")


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_in_charge(tmp_path):
    root = tmp_path / "checkpoints"
    ck = make(root, 100, 200)
    with pytest.raises(Crash):
        ck.save(FakeEngine(crash_after=1), 300, {"step": 300})
    # the partial folder: one file, no marker; latest still on the last complete checkpoint
    assert sorted(os.listdir(root / "step_00000300")) == [FILES[0]]
    assert listing(root) == (["step_00000100", "step_00000200", "step_00000300"], "step_00000200")
    assert ck.latest_complete() == "step_00000200"
    assert ck.complete() == [(100, "step_00000100"), (200, "step_00000200")]
    assert ck.all_tags() == ["step_00000100", "step_00000200", "step_00000300"]
    assert ck.newer_than("step_00000200") == ["step_00000300"]  # partial folders count there
    assert ck.newer_than("step_00000100") == ["step_00000200", "step_00000300"]
    with pytest.raises(ValueError, match=r"step_00000300 is missing or incomplete \(no COMPLETE marker\); "
                                         r"complete ones: \['step_00000100', 'step_00000200'\]"):
        ck.load(FakeEngine(), "step_00000300")
    # a partial folder newer than the newest complete one survives pruning ...
    ck.prune()
    assert listing(root)[0] == ["step_00000100", "step_00000200", "step_00000300"]
    # ... and goes once a later checkpoint is complete
    ck.save(FakeEngine(), 400, {"step": 400})
    assert listing(root) == (["step_00000100", "step_00000200", "step_00000400"], "step_00000400")


def test_a_partial_folder_older_than_the_newest_complete_one_is_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    make(root, 200)
    (root / "step_00000100").mkdir()
    (root / "step_00000100" / FILES[0]).write_bytes(b"torn")
    Checkpoints(root, keep_last=5, is_main=True).prune()
    assert listing(root) == (["step_00000200"], "step_00000200")


def test_re_saving_a_tag_starts_from_an_empty_folder(tmp_path):
    root = tmp_path / "checkpoints"
    ck = make(root, 100, 200)
    (root / "step_00000200" / "stale_from_an_abandoned_branch.pt").write_bytes(b"old")
    with pytest.raises(Crash):  # the re-save crashes: no old marker may vouch for the new files
        ck.save(FakeEngine(crash_after=1), 200, {"step": 200, "branch": 2})
    assert sorted(os.listdir(root / "step_00000200")) == [FILES[0]]
    assert listing(root) == (["step_00000100", "step_00000200"], None)  # latest named the old folder
    assert ck.latest_complete() == "step_00000100"
    ck.save(FakeEngine(), 200, {"step": 200, "branch": 3})
    assert sorted(os.listdir(root / "step_00000200")) == sorted([*FILES, MARKER])
    assert ck.load(FakeEngine(), "step_00000200") == {"step": 200, "branch": 3}
    assert listing(root)[1] == "step_00000200"


def test_names_that_are_not_checkpoint_tags_are_left_alone(tmp_path):
    root = tmp_path / "checkpoints"
    make(root, 70)
    others = ["step_1", "step_000000100", "tmp", "Step_00000090"]
    for name in others:
        (root / name).mkdir()
        (root / name / MARKER).write_text("{}")
    (root / "step_00000050").write_text("a file, not a folder")
    ck = Checkpoints(root, keep_last=1, is_main=True)
    assert ck.complete() == [(70, "step_00000070")]
    assert ck.all_tags() == ["step_00000070"]
    ck.save(FakeEngine(), 80, {"step": 80})
    assert listing(root) == (sorted([*others, "step_00000050", "step_00000080"]), "step_00000080")


def test_remove_deletes_folders_and_the_latest_pointer_only_when_it_names_one(tmp_path):
    root = tmp_path / "checkpoints"
    ck = make(root, 100, 200, 300)
    ck.remove(["step_00000100", "step_00000999"])  # a missing tag is not an error
    assert listing(root) == (["step_00000200", "step_00000300"], "step_00000300")
    ck.remove(["step_00000300"])
    assert listing(root) == (["step_00000200"], None)
    assert ck.latest_complete() == "step_00000200"


def test_only_rank_0_writes_the_marker_latest_and_prunes(tmp_path):
    root = tmp_path / "checkpoints"
    make(root, 100, 200)
    other = Checkpoints(root, keep_last=1, is_main=False)
    engine = FakeEngine()
    other.save(engine, 300, {"step": 300})  # every rank writes its own DeepSpeed files ...
    assert engine.saves[0]["tag"] == "step_00000300"
    assert sorted(os.listdir(root / "step_00000300")) == list(FILES)
    # ... but the marker, the pointer and the pruning are rank 0's (after the barrier)
    assert listing(root) == (["step_00000100", "step_00000200", "step_00000300"], "step_00000200")
    other.remove(["step_00000100"])
    assert (root / "step_00000100").is_dir()


def test_load_reports_a_checkpoint_deepspeed_cannot_read(tmp_path):
    root = tmp_path / "checkpoints"
    ck = make(root, 100)
    (root / "step_00000100" / FILES[0]).unlink()
    with pytest.raises(ValueError, match="DeepSpeed could not load checkpoint .*step_00000100"):
        ck.load(FakeEngine(), "step_00000100")
    with pytest.raises(ValueError, match=r"step_00000200 is missing or incomplete.*complete ones: \['step_"):
        ck.load(FakeEngine(), "step_00000200")
    with pytest.raises(ValueError, match="complete ones: none"):
        Checkpoints(tmp_path / "empty", keep_last=1, is_main=True).load(FakeEngine(), "step_00000100")
