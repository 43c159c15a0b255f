"""A refused or failed trainer start never damages its run directory (issue 12, items 1, 2, 3, 6).

Fast, in process: run directories written in the trainer's layout (checkpoints by ``Checkpoints``
with a fake DeepSpeed engine, manifests, a real tokenizer), then the trainer's own claim on them
(``claim_run_dir``: the lock and the resume plan, what ``setup`` runs before anything is written).
Each refusal (another model, another tokenizer also when it rounds to the same vocabulary, another
sequence length, a corrupt checkpoint named explicitly, a lock held by a second process) must name
the cause and leave every file byte-identical (a hash of the whole tree). The lock is tested with
two processes. Slow, end to end: the same faults against the real trainer in subprocesses
(refusals, a corrupt newest checkpoint skipped with an exact resume, a second trainer, a save past
the file-size limit).
"""

import copy
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_common import make_documents
from test_training_checkpoint import FILES, FakeEngine

from newtonlm.data import train_bpe_tokenizer
from newtonlm.training.checkpoint import MARKER, Checkpoints
from newtonlm.training.config import TrainConfig
from newtonlm.training.lock import LOCK_NAME, RunDirectoryInUse, RunLock
from newtonlm.training.loop import claim_run_dir
from newtonlm.training.resume import ResumePlan, ResumeRefused, run_facts

REPO = Path(__file__).resolve().parents[1]


def tree_hash(root: Path) -> dict:
    """Every file under ``root`` (relative path -> sha256 of its bytes), folders included as such."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


@pytest.fixture(scope="module")
def tokenizers():
    """The run's tokenizer (400 ids: 448 embedding rows) and one of 390 ids, which rounds to the same
    448 rows: only the fingerprint tells them apart."""
    docs = make_documents(300, seed=12345)
    return {"run": train_bpe_tokenizer(docs, 400), "rounds_the_same": train_bpe_tokenizer(docs, 390)}


def config(**train):
    return {"model": {"arch": "paragru", "hidden_size": 32, "num_hidden_layers": 2, "cell_mode": "auto"},
            "data": {"sources": {"s": {"kind": "shakespeare", "weight": 1.0}}, "val_sequences": 4,
                     "tokenizer": {"vocab_size": 400}},
            "train": {"seed": 1, "seq_len": 32, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-3,
                      "max_steps": 4, **train},
            "wandb": {"mode": "disabled"}}


SIGNATURE = {"rank": 0, "world_size": 1, "workers": 1, "batch_size": 2, "seq_len": 32,
             "sources": [["DocumentSource", "s", "0f0f0f0f0f0f0f0f"]], "seed": 1}


def make_run(tmp_path: Path, tokenizer, steps=(2, 4)) -> tuple[Path, dict]:
    """A run directory as the trainer leaves it: config.yaml, tokenizer/, metrics.jsonl, checkpoints
    with manifests, and the lock file of a trainer that ended. -> (run dir, its facts)."""
    run = tmp_path / "run"
    run.mkdir()
    facts = run_facts(config(), 1, tokenizer, SIGNATURE)
    (run / "config.yaml").write_text(json.dumps(facts["config"]))
    tokenizer.save_pretrained(run / "tokenizer")
    lines = [json.dumps({"kind": "train", "step": s}) + "\n" for s in (1, 2, 3, 4)]
    (run / "metrics.jsonl").write_text("".join(lines))
    ckpts = Checkpoints(run / "checkpoints", keep_last=5, is_main=True)
    for step in steps:
        ckpts.save(FakeEngine(payload=2000), step, {"step": step, **facts})
    RunLock.acquire(run).release()
    return run, facts


def claim(run: Path, now: dict, **train):
    cfg = TrainConfig(**train)
    return claim_run_dir(run, Checkpoints(run / "checkpoints", keep_last=5, is_main=True), cfg, now)


def refused(run: Path, now: dict, **train) -> str:
    """Claim ``run`` the way the trainer does; it must be refused with the directory untouched."""
    before = tree_hash(run)
    with pytest.raises((ResumeRefused, RunDirectoryInUse)) as info:
        claim(run, now, **train)
    assert tree_hash(run) == before
    return str(info.value)


def test_another_model_is_refused_naming_the_setting_and_nothing_changes(tmp_path, tokenizers):
    run, facts = make_run(tmp_path, tokenizers["run"])
    now = copy.deepcopy(facts)
    now["config"]["model"]["hidden_size"] = 64
    message = refused(run, now)
    assert message.startswith(f"checkpoint {run / 'checkpoints' / 'step_00000004'} was written with other "
                              "settings than this run's: model.hidden_size (32 in the checkpoint, 64 now). ")
    assert "another hydra.run.dir, or train.resume=none train.overwrite=true" in message
    assert message.endswith(f"; nothing in {run} was changed")
    now["config"]["model"] = {"arch": "llama", "hidden_size": 32}
    assert 'model.arch ("paragru" in the checkpoint, "llama" now)' in refused(run, now)
    lock, plan = claim(run, facts)  # the same settings: accepted (and the lock is free again)
    assert plan == ResumePlan(tag="step_00000004")
    lock.release()


def test_another_tokenizer_is_refused_even_when_it_rounds_to_the_same_vocabulary(tmp_path, tokenizers):
    run, facts = make_run(tmp_path, tokenizers["run"])
    now = run_facts(config(), 1, tokenizers["rounds_the_same"], SIGNATURE)
    assert (now["vocab_size"], facts["vocab_size"]) == (448, 448)
    message = refused(run, now)
    assert (f"tokenizer (fingerprint {facts['tokenizer_fingerprint']}, 400 tokens, model vocabulary 448 in "
            f"the checkpoint; fingerprint {now['tokenizer_fingerprint']}, 390 tokens, model vocabulary 448 "
            "now)" in message)


def test_another_sequence_length_is_refused(tmp_path, tokenizers):
    run, facts = make_run(tmp_path, tokenizers["run"])
    now = copy.deepcopy(facts)
    now["config"]["train"]["seq_len"] = 64
    now["config"]["train"]["max_steps"] = 10  # may change: not named
    message = refused(run, now)
    assert "settings than this run's: train.seq_len (32 in the checkpoint, 64 now). A resume" in message


def test_a_corrupt_checkpoint_named_explicitly_is_refused_naming_the_file(tmp_path, tokenizers):
    run, facts = make_run(tmp_path, tokenizers["run"])
    damaged = run / "checkpoints" / "step_00000002" / FILES[0]
    size = damaged.stat().st_size
    with open(damaged, "r+b") as fh:
        fh.truncate(size // 2)
    message = refused(run, facts, resume="step_00000002", overwrite=True)
    assert message.startswith(f"train.resume=step_00000002: checkpoint {run / 'checkpoints'}/step_00000002 "
                              f"is unusable: {damaged} has {size // 2:,} bytes, expected {size:,} (truncated "
                              "or overwritten); resume from another one")


def test_auto_passes_over_a_corrupt_checkpoint_and_never_starts_over_silently(tmp_path, tokenizers):
    run, facts = make_run(tmp_path, tokenizers["run"])
    newest = run / "checkpoints" / "step_00000004" / FILES[1]
    data = bytearray(newest.read_bytes())
    data[100] ^= 1  # a bit flip: the size is right, the CRC-32 is not
    newest.write_bytes(data)
    before = tree_hash(run)
    lock, plan = claim(run, facts)
    assert plan.tag == "step_00000002" and [t for t, _ in plan.skipped] == ["step_00000004"]
    why = plan.skipped[0][1]
    assert why.startswith(f"{newest} has CRC-32 ") and why.endswith("(its content changed)")
    lock.release(restore=True)
    assert tree_hash(run) == before
    # every checkpoint corrupt: refused, with each reason, instead of a fresh start
    older = run / "checkpoints" / "step_00000002" / FILES[0]
    older.unlink()
    message = refused(run, facts)
    assert message.startswith(f"{run / 'checkpoints'} holds no usable checkpoint (step_00000002: {older} is "
                              "missing; step_00000004: ")
    assert "train.resume=auto does not silently start over" in message


def test_a_format_1_checkpoint_is_compared_through_its_client_state_and_tokenizer(tmp_path, tokenizers):
    """Checkpoints written before manifests: the settings come from the client state, the tokenizer's
    fingerprint from the run's tokenizer/ folder."""
    run, facts = make_run(tmp_path, tokenizers["run"], steps=(2,))
    marker = run / "checkpoints" / "step_00000002" / MARKER
    marker.write_text(json.dumps({"step": 2, "time": 1.0}))
    lock, plan = claim(run, facts)
    assert plan.tag == "step_00000002"
    lock.release(restore=True)
    now = run_facts(config(), 1, tokenizers["rounds_the_same"], SIGNATURE)
    assert "tokenizer (fingerprint " in refused(run, now)


# ---- the lock: two processes ---------------------------------------------------------------------

HOLDER = """
import os, sys, time
from newtonlm.training.lock import RunLock
lock = RunLock.acquire(sys.argv[1])
child = os.fork()  # like a data-loader worker: must not keep the lock alive after the trainer dies
if child == 0:
    time.sleep(120)
    os._exit(0)
print(os.getpid(), child, flush=True)
sys.stdin.read()  # hold until stdin closes
lock.release()
print("released", flush=True)
"""


def start_holder(run: Path) -> tuple[subprocess.Popen, int, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    pid, child = map(int, proc.stdout.readline().split())
    return proc, pid, child


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path, tokenizers):
    run, facts = make_run(tmp_path, tokenizers["run"])
    proc, pid, child = start_holder(run)
    try:
        message = refused(run, facts)  # the trainer's claim, in this process
        assert message.startswith(f"run directory {run} is in use by another trainer (pid {pid} on host "
                                  f"{socket.gethostname()}, started ")
        assert message.endswith(f"which holds {run / LOCK_NAME}: two trainers must not write one run "
                                "directory (their checkpoints and metrics would interleave); wait for it to "
                                "end or stop it, or use another hydra.run.dir. Nothing was written")
        os.kill(pid, signal.SIGKILL)  # killed: its forked child lives on, but does not hold the lock
        proc.wait(timeout=30)
        lock = RunLock.acquire(run)
        note = lock.takeover_note()
        assert note.startswith(f"the previous trainer of this run directory (pid {pid} on host "
                               f"{socket.gethostname()}, started ")
        assert note.endswith("ended without releasing its lock (killed?); taking it over")
        lock.release()
        assert "released" in json.loads((run / LOCK_NAME).read_text())
    finally:
        proc.kill()
        proc.wait(timeout=30)
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_released_lock_is_taken_without_a_note_and_a_refused_start_restores_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc, pid, child = start_holder(run)
    os.kill(child, signal.SIGKILL)
    proc.stdin.close()  # the holder releases
    assert proc.stdout.readline().strip() == "released"
    proc.wait(timeout=30)
    released = (run / LOCK_NAME).read_bytes()
    lock = RunLock.acquire(run)
    assert lock.takeover_note() is None and lock.previous == released
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release(restore=True)
    assert (run / LOCK_NAME).read_bytes() == released
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    RunLock.acquire(fresh).release(restore=True)  # a lock file this start created goes again
    assert list(fresh.iterdir()) == []


# ---- end to end: the trainer in subprocesses -----------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run (checkpoints at steps 2 and 4) of the tiny trainer settings."""
    from test_training import COMMON, train

    cache = tmp_path_factory.mktemp("tokenizers")
    run = tmp_path_factory.mktemp("trained") / "run"
    train(run, *COMMON, tok_cache=cache)
    return run, cache


def copy_run(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    return run


@pytest.mark.slow
def test_trainer_refusals_leave_the_run_directory_byte_identical(trained, tmp_path):
    from test_training import COMMON, train

    run = copy_run(trained, tmp_path)
    before = tree_hash(run)
    cases = [(["model.hidden_size=64", "train.seq_len=64"],
              "model.hidden_size (32 in the checkpoint, 64 now); train.seq_len (32 in the checkpoint, "
              "64 now)"),
             (["data.tokenizer.vocab_size=500"], "model vocabulary 512 in the checkpoint; fingerprint "),
             (["train.resume=step_00000002", "train.overwrite=true"], "mp_rank_00_model_states.pt has ")]
    damaged = run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    for overrides, expected in cases:
        if "train.resume=step_00000002" in overrides:
            with open(damaged, "r+b") as fh:
                fh.truncate(1000)
            before = tree_hash(run)
        proc = train(run, *COMMON, *overrides, tok_cache=trained[1], check=False, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert expected in proc.stderr and f"nothing in {run} was changed" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert tree_hash(run) == before, overrides


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_skipped_logged_and_the_resume_is_exact(trained, tmp_path):
    from test_training import COMMON, losses, records, train

    run = copy_run(trained, tmp_path)
    newest = run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    with open(newest, "r+b") as fh:  # the storage fault of the issue: COMPLETE present, the file cut
        fh.truncate(newest.stat().st_size // 2)
    proc = train(run, *COMMON, tok_cache=trained[1])
    assert (f"newtonlm: warning: checkpoint {newest.parent} is unusable ({newest} has " in proc.stderr
            and "skipped, resuming from step_00000002" in proc.stderr)
    assert "resumed from step_00000002" in proc.stderr
    events = records(run, "event")
    assert len(events) == 1 and events[0]["event"] == "skipped_corrupt_checkpoint"
    assert (events[0]["step"], events[0]["checkpoint"], events[0]["resumed_from"]) == (
        2, str(newest.parent), "step_00000002")
    assert events[0]["reason"].startswith(f"{newest} has ")
    assert losses(run) == losses(trained[0])  # steps 3 and 4 again, bit for bit
    manifest = json.loads((newest.parent / "COMPLETE").read_text())  # written again, intact
    assert manifest["files"]["mp_rank_00_model_states.pt"]["size"] == newest.stat().st_size


HOLD = ("import sys; from newtonlm.training.lock import RunLock; lock = RunLock.acquire(sys.argv[1]); "
        "print('locked', flush=True); sys.stdin.read()")


@pytest.mark.slow
def test_a_second_trainer_is_refused_while_another_holds_the_run_directory(trained, tmp_path):
    from test_training import COMMON, train

    run = copy_run(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_hash(run)
        proc = train(run, *COMMON, "train.max_steps=6", tok_cache=trained[1], check=False, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"run directory {run} is in use by another trainer (pid {holder.pid} on host " in proc.stderr
        assert tree_hash(run) == before
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.slow
def test_a_save_past_the_file_size_limit_reports_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    """RLIMIT_FSIZE (``ulimit -f``, SIGXFSZ ignored so that the write fails with EFBIG): the save of
    step 6 fails; the trainer says where, why, how much space is free and which checkpoint is the
    last good one, exits non-zero, and the partial folder is not marked complete."""
    from helpers import start_process, wait_process
    from test_training import COMMON, TINY

    run = copy_run(trained, tmp_path)
    limit_kb = 500  # the checkpoint's model-states file is ~750 kB; everything else is far smaller
    args = [*TINY, *COMMON, "train.max_steps=6", f"hydra.run.dir={run}",
            f"data.tokenizer.cache_dir={trained[1]}"]
    script = f"ulimit -f {limit_kb}; trap '' XFSZ; exec \"$@\""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = wait_process(start_process(["bash", "-c", script, "bash", sys.executable, "-m",
                                       "newtonlm.training.train", *args], env), 300, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    folder = run / "checkpoints" / "step_00000006"
    assert f"saving checkpoint {folder} failed: " in proc.stderr
    assert "free space on its filesystem: " in proc.stderr
    assert ("file-size limit (ulimit -f, RLIMIT_FSIZE): 512.00 kB, reached by mp_rank_00_model_states.pt"
            in proc.stderr)
    assert (f"the last complete checkpoint is {run / 'checkpoints' / 'step_00000004'} (train.resume=auto "
            "resumes from it)") in proc.stderr
    assert not (folder / "COMPLETE").exists()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"


@pytest.mark.slow
def test_a_resume_with_another_learning_rate_and_length_follows_the_new_schedule(trained, tmp_path):
    """train.lr and train.max_steps may change on resume and take effect at once: the rates of the
    resumed steps are those of the new settings' schedule (built here from step 0), and the new
    rate reaches the optimizer (the same weights at step 4, another update at step 5)."""
    import torch
    from test_training import COMMON, records, train

    from newtonlm.training.optim import build_scheduler

    runs = {}
    for lr in (3e-3, 3e-2):  # 3e-3: the checkpoint's own rate (configs/train/demo.yaml)
        runs[lr] = copy_run(trained, tmp_path / str(lr))
        train(runs[lr], *COMMON, "train.max_steps=6", f"train.lr={lr}", tok_cache=trained[1])
    for lr, run in runs.items():
        reference = build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr),
                                    TrainConfig(lr=lr, max_steps=6), 6)
        rates = []
        for _ in range(6):
            rates.append(reference.get_last_lr()[0])
            reference.optimizer.step()
            reference.step()
        assert [r["lr"] for r in records(run)][4:] == pytest.approx(rates[4:], rel=1e-12)
    low, high = (records(runs[lr]) for lr in (3e-3, 3e-2))
    assert low[4]["loss"] == high[4]["loss"] and low[5]["loss"] != high[5]["loss"]
