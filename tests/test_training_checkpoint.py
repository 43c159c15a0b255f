"""Checkpoint folders in process (newtonlm/training/checkpoint.py): the COMPLETE marker (the
manifest: files, sizes, CRC-32), verification, the ``latest`` pointer, keep-last pruning, partial
folders left by a crash, failed writes (file-size limit, full disk), re-saved tags and loading.

A fake engine stands in for DeepSpeed: its ``save_checkpoint`` writes files the way DeepSpeed's does
(``<save_dir>/<tag>/`` with the model and optimizer states, the client state inside the model file,
``<save_dir>/latest`` only with ``save_latest=True``), and it can crash part way through a save.
"""

import binascii
import errno
import json
import os
import resource
import signal
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from newtonlm.training import checkpoint
from newtonlm.training.checkpoint import (
    MARKER,
    CheckpointError,
    Checkpoints,
    CheckpointWriteError,
    checksum,
    file_owner,
    human_size,
    tag_for,
)

FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")


class Crash(Exception):
    """A save killed part way (not a write error: those are reported, see the tests at the end)."""


class FakeEngine:
    """``save_checkpoint`` / ``load_checkpoint`` with DeepSpeed's signatures and file layout: the
    model-states file holds the weights (``module``) and the client state's keys at its top level,
    the optimizer file the optimizer state. ``crash_after``: raise after writing that many files of
    the next save (a killed save). ``payload``: floats per file (the files' size)."""

    def __init__(self, crash_after=None, payload=0):
        self.saves, self.crash_after, self.payload = [], crash_after, payload

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        self.saves.append({"save_dir": save_dir, "tag": tag, "save_latest": save_latest})
        folder = os.path.join(save_dir, tag)
        os.makedirs(folder, exist_ok=True)
        states = ({"module": {"weight": torch.ones(self.payload)}, **(client_state or {})},
                  {"optimizer_state_dict": {"exp_avg": torch.ones(self.payload)}})
        for i, (name, state) in enumerate(zip(FILES, states)):
            if i == self.crash_after:
                raise Crash(f"killed while saving {tag}")
            torch.save(state, os.path.join(folder, name))
        if save_latest:
            with open(os.path.join(save_dir, "latest"), "w") as fh:
                fh.write(tag)
        return True

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True, load_lr_scheduler_states=True):
        path = os.path.join(load_dir, tag, FILES[0])
        if not os.path.isfile(path):  # DeepSpeed warns and returns (None, None)
            return None, None
        return path, {k: v for k, v in torch.load(path).items() if k != "module"}


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
    assert listing(root) == (["step_00000100"], "step_00000100")  # no temporary files left
    assert ck.load(engine, tag) == {"step": 100, "tokens_seen": 6400}


def test_the_marker_is_a_manifest_of_every_file_with_its_size_and_crc32(tmp_path):
    root = tmp_path / "checkpoints"
    ck = Checkpoints(root, keep_last=2, is_main=True)
    client = {"step": 100, "world_size": 1, "tokenizer_fingerprint": "0123456789abcdef",
              "tokenizer_size": 400, "vocab_size": 448, "data_signature": {"seq_len": 16},
              "config": {"train": {"seq_len": 16}}, "rng": [{}]}
    tag = ck.save(FakeEngine(payload=1000), 100, client)
    manifest = json.loads((root / tag / MARKER).read_text())
    assert manifest.keys() == {"format", "step", "time", "world_size", "tokenizer_fingerprint",
                               "tokenizer_size", "vocab_size", "data_signature", "config", "files"}
    assert (manifest["format"], manifest["step"]) == (2, 100)
    keys = checkpoint.MANIFEST_KEYS
    assert {k: manifest[k] for k in keys} == {k: client[k] for k in keys}
    assert sorted(manifest["files"]) == sorted(FILES)
    for name, rec in manifest["files"].items():  # an independent CRC-32: the whole file at once
        data = (root / tag / name).read_bytes()
        assert rec == {"size": len(data), "crc32": f"{binascii.crc32(data):08x}"}
    assert ck.manifest(tag) == manifest and ck.size(tag) == sum(r["size"] for r in manifest["files"].values())
    # keys the client state lacks are null (e.g. a caller that records no tokenizer)
    assert ck.manifest(ck.save(FakeEngine(), 200, {"step": 200}))["tokenizer_fingerprint"] is None


def test_checksum_is_zlib_crc32(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"123456789")
    assert checksum(path) == "cbf43926"  # the CRC-32 check value
    big = os.urandom(3 * checkpoint._CHUNK + 5)  # several streamed reads
    path.write_bytes(big)
    assert checksum(path) == f"{binascii.crc32(big):08x}"
    assert human_size(512) == "512 bytes" and human_size(1_500_000) == "1.50 MB"
    assert human_size(112e9) == "112.00 GB" and human_size(3e15) == "3,000.00 TB"


def test_each_rank_checksums_the_files_it_wrote():
    assert [file_owner(f, 4) for f in ("mp_rank_00_model_states.pt",
                                       "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                       "zero_pp_rank_3_mp_rank_00_optim_states.pt",
                                       "zero_pp_rank_2_mp_rank_00_model_states.pt", "zero_to_fp32.py",
                                       "offloaded_tensors/rank1/tensor.swp")] == [0, 0, 3, 2, 0, 1]
    assert file_owner("zero_pp_rank_7_mp_rank_00_optim_states.pt", 4) == 0  # beyond the world: rank 0


def test_verify_names_each_damaged_file_with_what_was_expected(tmp_path):
    root = tmp_path / "checkpoints"
    ck = make(root, 100, 200)
    for tag in ("step_00000100", "step_00000200"):
        assert ck.verify(tag) is None
    model, optim = (root / "step_00000200" / name for name in FILES)
    size = model.stat().st_size
    with open(model, "r+b") as fh:
        fh.truncate(size - 10)
    problem = ck.verify("step_00000200")
    assert problem == f"{model} has {size - 10:,} bytes, expected {size:,} (truncated or overwritten)"
    data = bytearray(optim.read_bytes())  # a bit flip: same size, another CRC-32
    want = f"{binascii.crc32(data):08x}"
    data[len(data) // 2] ^= 0x10
    optim.write_bytes(data)
    optim_problem = f"{optim} has CRC-32 {binascii.crc32(data):08x}, expected {want} (its content changed)"
    assert ck.verify("step_00000200") == f"{problem}; {optim_problem}"
    model.unlink()
    assert ck.verify("step_00000200") == f"{model} is missing; {optim_problem}"
    missing = f"{root / 'step_00000300'} is missing or incomplete (no COMPLETE marker)"
    assert ck.verify("step_00000300") == missing
    # a format-1 marker (before manifests): accepted without verification
    (root / "step_00000100" / MARKER).write_text(json.dumps({"step": 100, "time": 1.0}))
    assert ck.manifest("step_00000100") is None and ck.verify("step_00000100") is None
    (root / "step_00000100" / MARKER).write_text('{"step": 1')
    marker = root / "step_00000100" / MARKER
    assert ck.verify("step_00000100").startswith(f"{marker} is unreadable (JSONDecodeError")
    (root / "step_00000100" / MARKER).write_text(json.dumps({"format": 3, "files": {}}))
    assert ck.verify("step_00000100").endswith("has format 3; this newtonlm reads format 2")
    (root / "step_00000100" / MARKER).write_text(json.dumps({"format": 2, "files": {"a": {"crc32": None}}}))
    assert ck.verify("step_00000100") == (f"{marker} is a malformed manifest: expected \"files\": {{path: "
                                          '{"size": int, "crc32": 8 hex digits or null}}')


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
    # latest named the old folder: it moved back to the newest remaining complete checkpoint
    assert listing(root) == (["step_00000100", "step_00000200"], "step_00000100")
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


def test_remove_moves_latest_to_the_newest_remaining_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    ck = make(root, 100, 200, 300)
    ck.remove(["step_00000100", "step_00000999"])  # a missing tag is not an error
    assert listing(root) == (["step_00000200", "step_00000300"], "step_00000300")
    (root / "step_00000250").mkdir()  # a partial folder: never a target of latest
    ck.remove(["step_00000300"])
    assert listing(root) == (["step_00000200", "step_00000250"], "step_00000200")
    assert ck.latest_complete() == "step_00000200"
    ck.remove(["step_00000200", "step_00000250"])
    assert listing(root) == ([], None)  # no complete checkpoint left: no pointer


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
    with pytest.raises(CheckpointError, match="DeepSpeed could not load checkpoint .*step_00000100"):
        ck.load(FakeEngine(), "step_00000100")
    with pytest.raises(ValueError, match=r"step_00000200 is missing or incomplete.*complete ones: \['step_"):
        ck.load(FakeEngine(), "step_00000200")
    with pytest.raises(ValueError, match="complete ones: none"):
        Checkpoints(tmp_path / "empty", keep_last=1, is_main=True).load(FakeEngine(), "step_00000100")


class RaisingEngine(FakeEngine):
    def __init__(self, exc):
        super().__init__()
        self.exc = exc

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        raise self.exc


@contextmanager
def file_size_limit(limit):
    """RLIMIT_FSIZE in this process, SIGXFSZ ignored (so a write past the limit fails with EFBIG
    instead of killing the process): the fault of a full quota, without filling a disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_save_past_the_file_size_limit_names_the_folder_the_limit_and_the_last_good_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    ck = make(root, 100)
    before = listing(root)
    with file_size_limit(200_000), pytest.raises(CheckpointWriteError) as info:
        ck.save(FakeEngine(payload=100_000), 200, {"step": 200})  # 400 kB files: torch's writer fails
    message = str(info.value)
    folder = root / "step_00000200"
    assert message.startswith(f"saving checkpoint {folder} failed: RuntimeError: ")  # torch: "unexpected pos"
    assert "free space on its filesystem: " in message
    assert f"file-size limit (ulimit -f, RLIMIT_FSIZE): 200.00 kB, reached by {FILES[0]}" in message
    assert message.endswith(f"the folder is not marked complete and is never resumed from; the last complete "
                            f"checkpoint is {root / 'step_00000100'} (train.resume=auto resumes from it)")
    assert not (folder / MARKER).exists() and (folder / FILES[0]).stat().st_size == 200_000
    assert listing(root) == (["step_00000100", "step_00000200"], before[1])
    assert ck.complete() == [(100, "step_00000100")]


def test_a_save_on_a_full_disk_names_the_os_error_and_the_free_space(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    ck = Checkpoints(root, keep_last=2, is_main=True)
    usage = type("Usage", (), {"free": 1_234_000, "total": 10**12})
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(CheckpointWriteError) as info:
        ck.save(RaisingEngine(RuntimeError("write failed")), 100, {"step": 100})
    assert str(info.value).startswith(f"saving checkpoint {root / 'step_00000100'} failed: RuntimeError: "
                                      "write failed; free space on its filesystem: 1.23 MB of 1.00 TB; ")
    assert str(info.value).endswith("the folder is not marked complete; there is no complete checkpoint yet")
    try:  # the OS error behind a wrapped one is named
        raise RuntimeError("save failed") from full
    except RuntimeError as wrapped:
        chained = wrapped
    with pytest.raises(CheckpointWriteError, match=r"failed: RuntimeError: save failed \(OS error: "
                       r"\[Errno 28\] No space left on device\); free space on its filesystem: 1.23 MB"):
        ck.save(RaisingEngine(chained), 100, {"step": 100})
    assert ck.complete() == []


def test_space_warning_before_a_save_that_will_not_fit(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    ck = make(root, 100)
    size = ck.size("step_00000100")
    assert size == sum((root / "step_00000100" / f).stat().st_size for f in FILES)
    usage = type("Usage", (), {"free": size - 1, "total": 10**12})
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage)
    assert ck.space_warning() == (
        f"{human_size(size - 1)} free on the filesystem of {root}, but the last checkpoint (step_00000100) "
        f"took {human_size(size)}: the next save will likely fail (free space, e.g. delete older "
        "checkpoints, or raise the limit)")
    usage.free = size
    assert ck.space_warning() is None
    largest = max((root / "step_00000100" / f).stat().st_size for f in FILES)
    with file_size_limit(largest - 1):
        assert ck.space_warning().startswith(f"the file-size limit (ulimit -f) is {human_size(largest - 1)}, "
                                             f"but the last checkpoint has a file of {human_size(largest)}")
    assert Checkpoints(tmp_path / "none", keep_last=1, is_main=True).space_warning() is None
