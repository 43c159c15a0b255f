"""The training job end to end, in subprocesses (as users run it): DeepSpeed on CPU (gloo)."""

import json
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, run_trainer, start_process, wait_process

TINY = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.intermediate_size=64",
        "model.num_heads=2", "train.seq_len=32", "train.micro_batch_size=2", "train.eval_every=3",
        "train.log_every=1", "train.sample_tokens=0", "train.progress=false", "data.val_sequences=4",
        "data.num_workers=1", "data.tokenizer.vocab_size=512", "wandb=disabled"]


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizers")


def train(run_dir, *overrides, nproc=1, faults="", tok_cache=None, check=True, timeout=600):
    args = [*TINY, f"hydra.run.dir={run_dir}", *overrides]
    if tok_cache is not None:
        args.append(f"data.tokenizer.cache_dir={tok_cache}")
    return run_trainer(args, nproc=nproc, faults=faults, check=check, timeout=timeout)


def records(run_dir, kind="train"):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run_dir):
    return [(r["step"], r["loss"], r["tokens_seen"]) for r in records(run_dir)]


COMMON = ["train.max_steps=4", "train.save_every=2"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tok_cache):
    """An uninterrupted single-process run that the resume tests compare against (validated every
    2 steps, which they are not: evaluation leaves training untouched; progress line on)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = train(run, *COMMON, "train.eval_every=2", "train.progress=true", tok_cache=tok_cache)
    return run, proc


@pytest.mark.slow
def test_single_process_run_writes_config_metrics_and_checkpoints(reference_run):
    run, proc = reference_run
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    recs = records(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "mfu"):
            assert isinstance(r[key], float | int), (key, r)
        assert 0 <= r["data_wait_s"] < r["step_time_s"]
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_time_s"])
        assert "newton/layer0/iterations" in r and "newton/fallbacks" in r
    assert recs[-1]["tokens_seen"] == 4 * 2 * 32
    assert recs[0]["loss"] > recs[-1]["loss"]
    val = records(run, "val")
    assert [(v["step"], v.get("final", False)) for v in val] == [(2, False), (4, True)]  # step 4: once
    assert all(abs(v["val_ppl"] - 2.718281828459045 ** v["val_loss"]) < 1e-6 * v["val_ppl"] for v in val)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000002", "step_00000004"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert "validation: loss" in proc.stdout
    # stderr is not a terminal: plain progress lines (one per step here: each step is 25 % of the run;
    # CPU auto: the sequential path)
    assert "step 4/4 (100%), loss " in proc.stderr and " tok/s, sequential, elapsed " in proc.stderr


@pytest.mark.slow
def test_preemption_then_resume_is_exact(tmp_path, tok_cache, reference_run):
    run = tmp_path / "run"
    interrupted = train(run, *COMMON, faults="sigterm@3", tok_cache=tok_cache)
    assert "preempted (SIGTERM)" in interrupted.stdout
    assert [r["step"] for r in records(run)][-1] == 3
    assert (run / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    resumed = train(run, *COMMON, tok_cache=tok_cache)
    assert "resumed from step_00000003" in resumed.stderr
    assert losses(reference_run[0]) == losses(run)  # bit for bit (floats from JSON)


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint(tmp_path, tok_cache, reference_run):
    run = tmp_path / "run"
    proc = train(run, *COMMON, faults="kill_in_save@4", tok_cache=tok_cache, check=False)
    assert proc.returncode == -signal.SIGKILL
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert (ck / "step_00000004").is_dir() and not (ck / "step_00000004" / "COMPLETE").exists()
    resumed = train(run, *COMMON, tok_cache=tok_cache)
    assert "resumed from step_00000002" in resumed.stderr
    assert (ck / "step_00000004" / "COMPLETE").is_file()
    assert losses(reference_run[0]) == losses(run)


def launch_env(**extra) -> dict:
    """Environment for the scripts in launch/: this interpreter, one thread per rank, a free port."""
    import os
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PY": sys.executable, "DS": str(Path(sys.executable).parent / "deepspeed"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_PORT": str(port), **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def start_launch(script, run_dir, *overrides, tok_cache, env):
    """``bash launch/<script[0]> <script[1:]> <tiny settings> <overrides>``, started."""
    args = [*TINY, f"data.tokenizer.cache_dir={tok_cache}", *overrides]
    if run_dir is not None:  # (launch/slurm.sbatch sets it from RUN_DIR)
        args.append(f"hydra.run.dir={run_dir}")
    return start_process(["bash", f"launch/{script[0]}", *script[1:], *args], env)


def launch(script, run_dir, *overrides, tok_cache, env, timeout=600):
    """``start_launch`` run to the end -> CompletedProcess."""
    return wait_process(start_launch(script, run_dir, *overrides, tok_cache=tok_cache, env=env), timeout)


@pytest.mark.slow
def test_resume_is_exact_two_processes_zero2_across_launchers(tmp_path, tok_cache):
    """torchrun (launch/torchrun.sh) uninterrupted vs the deepspeed launcher (launch/
    deepspeed_hostfile.sh local) preempted at step 3 and resumed under torchrun: same losses."""
    common = ["train.max_steps=4", "train.save_every=2", "train.zero_stage=2"]
    launch(["torchrun.sh", "2"], tmp_path / "a", *common, tok_cache=tok_cache, env=launch_env())
    ds = launch(["deepspeed_hostfile.sh", "local"], tmp_path / "b", *common, tok_cache=tok_cache,
                env=launch_env(NEWTONLM_FAULTS="sigterm@3", GPUS_PER_NODE="2"))
    assert "preempted (SIGTERM)" in ds.stdout
    train(tmp_path / "b", *common, nproc=2, tok_cache=tok_cache)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 4 and a == b
    assert a[-1][2] == 4 * 2 * 2 * 32  # tokens: steps x ranks x micro-batch x seq_len


@pytest.mark.slow
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, tok_cache):
    run = tmp_path / "run"
    proc = train(run, "train.max_steps=8", "train.inject_nan_steps=[2,4,5]",
                 "train.max_consecutive_skips=2", tok_cache=tok_cache, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "2 consecutive non-finite steps" in proc.stderr
    recs = records(run)
    assert [r["skipped"] for r in recs] == [False, True, False, True, True]
    assert recs[1]["loss"] is None and recs[-1]["skipped_total"] == 3
    assert all(r["loss"] is not None for r in recs if not r["skipped"])
    # the stop checkpoint holds the last good state (skipped steps change nothing)
    assert (run / "checkpoints" / "step_00000005" / "COMPLETE").is_file()


@pytest.mark.slow
def test_dead_rank_does_not_hang(tmp_path, tok_cache):
    proc = train(tmp_path / "run", "train.max_steps=6", "train.dist_timeout_s=60", nproc=2,
                 faults="exit@1:2", tok_cache=tok_cache, check=False, timeout=300)
    assert proc.returncode != 0


@pytest.mark.slow
def test_bad_override_on_the_command_line(tmp_path, tok_cache):
    proc = train(tmp_path / "run", "train.max_step=5", tok_cache=tok_cache, check=False, timeout=120)
    assert proc.returncode != 0 and "max_step" in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("train.max_step=5", "Could not override 'train.max_step'"),
    ("+train.max_step=5", r"unknown setting\(s\) train.max_step \(did you mean train.max_steps\?\)"),
    ("train.lr=-1", "train.lr=-1.0; expected > 0"),
    ("train.zero_stage=5", "train.zero_stage=5; expected 0, 1, 2 or 3"),
    ("train.precision=fp16", "train.precision='fp16'"),
    ("wandb.mode=cloud", "wandb.mode='cloud'"),
    ("train.micro_batch_size=abc", "micro_batch_size"),
    ("model.hidden_size=-8", "hidden_size"),
])
def test_bad_override_is_a_clear_error(override, message):
    from hydra import compose, initialize_config_dir

    from newtonlm.models import build_model
    from newtonlm.training.config import load_settings, register_schemas, validate

    register_schemas()
    with pytest.raises(Exception, match=message):
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[override])
            validate(*load_settings(cfg), 1)
            build_model(cfg.model, 512)


@pytest.mark.slow
def test_bf16_autocast_activation_checkpointing_and_zero1(tmp_path, tok_cache):
    run = tmp_path / "run"
    train(run, "train.max_steps=3", "train.precision=bf16", "train.activation_checkpointing=true",
          "train.zero_stage=1", "train.eval_every=0", tok_cache=tok_cache)
    recs = records(run)
    assert len(recs) == 3 and all(r["loss"] is not None and not r["skipped"] for r in recs)
    # the reference: the same run in fp32 (same weights and batches); bf16 autocast rounds the
    # matmul inputs to 8 bits of mantissa, so the losses agree to about 1e-2 (not 1e-6), and a
    # broken autocast/checkpointing path (wrong weights, no update) would be far off
    ref_run = tmp_path / "fp32"
    train(ref_run, "train.max_steps=3", "train.zero_stage=1", "train.eval_every=0", tok_cache=tok_cache)
    ref = records(ref_run)
    for got, want in zip(recs, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-2), (got, want)
    # steps 2 and 3 updated the model (lr > 0, a gradient), so their losses test the updates too
    assert all(r["lr"] > 0 and r["grad_norm"] > 0 for r in recs[1:])
    import torch

    states = torch.load(run / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    assert all(t.dtype == torch.float32 for t in states["module"].values())  # fp32 weights kept


def _records_so_far(run):
    """metrics.jsonl of a running job (a line being written is skipped)."""
    path = Path(run) / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


@pytest.mark.slow
def test_slurm_template_checkpoints_requeues_and_resumes(tmp_path, tok_cache):
    """launch/slurm.sbatch under test doubles of srun and scontrol (tests/fake_slurm; the srun double
    handles signals like srun: SIGTERM kills the tasks, SIGUSR1 is forwarded). 2 tasks. The
    time-limit notice (SIGUSR1 to the batch shell) reaches every rank through srun, they checkpoint
    and exit 0, the shell requeues the job, and the requeued job resumes from that checkpoint.
    Then a plain SIGTERM to srun (scancel) kills the ranks: no new checkpoint, no requeue."""
    import os
    import time

    run, log = tmp_path / "run", tmp_path / "slurm.log"
    env = launch_env(PATH=f"{REPO / 'tests' / 'fake_slurm'}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
                     SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[1]", SLURM_SUBMIT_DIR=str(REPO),
                     RUN_DIR=str(run), FAKE_SLURM_LOG=str(log))

    def start_and_wait_for_steps(*overrides, after_step=0):
        job = start_launch(["slurm.sbatch"], None, *overrides, "train.eval_every=0",
                           tok_cache=tok_cache, env=env)
        deadline = time.monotonic() + 300
        while not any(r.get("step", 0) > after_step for r in _records_so_far(run)):
            assert job.poll() is None and time.monotonic() < deadline, wait_process(job, 1, check=False)
            time.sleep(0.2)
        return job

    job = start_and_wait_for_steps("train.max_steps=100000")
    os.kill(job.pid, signal.SIGUSR1)  # what --signal=B:USR1@180 does: the batch shell only
    out = wait_process(job, 300)
    assert "rendezvous 127.0.0.1:" in out.stderr and "requeueing job 4242" in out.stderr
    assert "SIGUSR1 received" in out.stderr and "preempted (SIGUSR1)" in out.stdout
    assert log.read_text() == "scontrol requeue 4242\n"
    step = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 1 <= step < 100000 and records(run)[-1]["step"] == step
    assert (run / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    # the requeued job: same run dir, resumes, finishes two steps later, no requeue
    again = launch(["slurm.sbatch"], None, f"train.max_steps={step + 2}", "train.eval_every=0",
                   tok_cache=tok_cache, env=env)
    assert f"resumed from step_{step:08d}" in again.stderr and "status: finished" in again.stdout
    assert [r["step"] for r in records(run)][-2:] == [step + 1, step + 2]
    assert records(run)[-1]["tokens_seen"] == (step + 2) * 2 * 2 * 32
    # scancel without --signal: srun gets SIGTERM and kills the ranks (so the notice must be USR1)
    job = start_and_wait_for_steps("train.max_steps=100000", "train.save_every=1000000",
                                   after_step=step + 2)
    srun = int(subprocess.run(["pgrep", "-P", str(job.pid), "-f", "srun"], capture_output=True,
                              text=True, check=True).stdout.split()[0])
    os.kill(srun, signal.SIGTERM)
    out = wait_process(job, 120, check=False)
    assert out.returncode == 128 + signal.SIGKILL and "forcing job termination" in out.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step + 2:08d}"
    assert log.read_text() == "scontrol requeue 4242\n"


def _close_losses(a, b, rtol):
    assert [s for s, _, _ in a] == [s for s, _, _ in b] and [t for *_, t in a] == [t for *_, t in b]
    for (_, la, _), (_, lb, _) in zip(a, b):
        assert abs(la - lb) <= rtol * abs(la), (a, b)


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path, tok_cache, reference_run):
    """train.compile=true (torch.compile through the DeepSpeed engine, inductor on CPU; the Newton
    solver is a graph break): the same losses as the eager reference run, to float32 round-off."""
    run = tmp_path / "run"
    proc = train(run, *COMMON, "train.compile=true", tok_cache=tok_cache)
    assert "DeepSpeed ZeRO-0, SkippingAdamW, fp32, torch.compile" in proc.stderr
    _close_losses(losses(reference_run[0]), losses(run), 1e-5)


@pytest.mark.slow
def test_optimizer_offload_zero2_matches_zero0(tmp_path, tok_cache, reference_run):
    """train.offload_optimizer=true with ZeRO-2: DeepSpeed's CPU Adam (compiled by DeepSpeed on
    first use, then cached) gives the losses of the ZeRO-0 torch AdamW reference run."""
    run = tmp_path / "run"
    proc = train(run, *COMMON, "train.zero_stage=2", "train.offload_optimizer=true", tok_cache=tok_cache)
    assert "DeepSpeed ZeRO-2, DeepSpeedCPUAdam (optimizer offloaded to CPU), fp32" in proc.stderr
    _close_losses(losses(reference_run[0]), losses(run), 1e-5)


def test_training_bench_summary_arithmetic():
    """newtonlm.training.bench: overhead per back-to-back pair, medians over the rounds."""
    from newtonlm.training.bench import summarize

    trainer = [{"tokens_per_s": t, "mfu": m, "peak_rss_mb": r}
               for t, m, r in ((90.0, 0.1, 500.0), (110.0, 0.3, 700.0), (99.0, 0.2, None))]
    row = summarize("paragru", [100.0, 100.0, 90.0], trainer)
    assert row["trainer_overhead_rounds"] == pytest.approx([0.1, -0.1, -0.1])
    assert row["trainer_overhead"] == pytest.approx(-0.1)
    assert (row["trainer_overhead_min"], row["trainer_overhead_max"]) == pytest.approx((-0.1, 0.1))
    assert row["tokens_per_s"] == 99.0 and row["bare_tokens_per_s"] == 100.0 and row["mfu"] == 0.2
    assert row["peak_rss_mb"] == 700.0 and row["rounds"] == 3


def test_cuda_device_index_for_local_rank():
    from newtonlm.training.distributed import cuda_device_index

    assert [cuda_device_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]
    assert cuda_device_index(5, 1) == 0  # one GPU bound per process (e.g. --gpus-per-task=1)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=4 but this process sees 2 GPUs"):
        cuda_device_index(4, 2)


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_needs_overwrite_for_the_later_ones(tmp_path, tok_cache,
                                                                            reference_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run[0], run)
    refused = train(run, *COMMON, "train.resume=step_00000002", tok_cache=tok_cache, check=False,
                    timeout=300)
    assert refused.returncode != 0
    assert ("train.resume=step_00000002 but" in refused.stderr and "step_00000004" in refused.stderr
            and "train.overwrite=true" in refused.stderr)
    assert (run / "checkpoints" / "step_00000004" / "COMPLETE").is_file()  # nothing was touched
    again = train(run, *COMMON, "train.resume=step_00000002", "train.overwrite=true", tok_cache=tok_cache)
    assert "resumed from step_00000002" in again.stderr
    assert losses(reference_run[0]) == losses(run)  # step 4 written again, from scratch
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"


@pytest.mark.slow
def test_stop_request_ignores_a_second_notice_but_not_a_late_ctrl_c():
    """Launchers send two notices at once (SIGINT then SIGTERM): one checkpoint, no abrupt exit.
    A second Ctrl-C after the grace period ends the process."""
    import sys

    code = ("import os, signal, time\n"
            "from newtonlm.training.loop import _StopRequest\n"
            "s = _StopRequest()\n"
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM)\n"
            "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.1)\n"
            "print('alive', s.signal, flush=True)\n"
            "s.since -= 10\n"
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
            "print('still alive', flush=True)\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.stdout.splitlines() == ["alive SIGINT"]
    assert proc.returncode == -signal.SIGINT
    assert proc.stderr.count("SIGINT received: checkpointing at the next step boundary") == 1


def test_metrics_log_resume_drops_later_records_and_a_torn_line(tmp_path):
    from newtonlm.training.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": float(s)}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "st')
    log = MetricsLog(path, True, resume_step=2)
    log.write({"kind": "train", "step": 3, "loss": float("nan")})
    log.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"kind": "train", "step": 1, "loss": 1.0}, {"kind": "train", "step": 2, "loss": 2.0},
        {"kind": "train", "step": 3, "loss": None}]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_notice_to_the_whole_process_group_checkpoints(tmp_path, tok_cache, sig):
    """Ctrl-C in a terminal, Kubernetes or Slurm signal every process of the job, the data-loader
    worker included: the trainer still checkpoints and exits 0."""
    import os
    import time

    from helpers import start_trainer

    run = tmp_path / "run"
    proc = start_trainer([*TINY, f"hydra.run.dir={run}", f"data.tokenizer.cache_dir={tok_cache}",
                          "train.max_steps=100000", "train.save_every=1000000", "train.eval_every=0"])
    deadline = time.monotonic() + 300
    while not _records_so_far(run):
        assert proc.poll() is None and time.monotonic() < deadline, wait_process(proc, 1, check=False)
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    out = wait_process(proc, 120)
    name = signal.Signals(sig).name
    assert f"preempted ({name})" in out.stdout and out.stderr.count(f"{name} received") == 1
    step = records(run)[-1]["step"]
    assert (run / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()


def _wandb_records(path):
    """The records of a wandb run file: a LevelDB-style log (a 7-byte ':W&B' header, then 32 KiB
    blocks of chunks with a 7-byte header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 /
    LAST=4). The reader lives in wandb's Go core nowadays, so the tests read the format directly."""
    import struct

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, parts = 7, 32768, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            out.append(b"".join(parts))
            parts = []
    return out


def _wandb_history(run_dir) -> list[dict]:
    """The history rows of every offline wandb run under run_dir/wandb, in the order logged."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")):
        for data in _wandb_records(path):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                             for i in rec.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_logs_every_step_also_after_a_resume(tmp_path, tok_cache):
    """wandb=offline: one wandb run id across a preemption, every step logged with the trainer's
    step as its x-axis (read back from wandb's run files)."""
    run = tmp_path / "run"
    train(run, *COMMON, "wandb=offline", faults="sigterm@3", tok_cache=tok_cache)
    train(run, *COMMON, "wandb=offline", tok_cache=tok_cache)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2  # one per process, one run id
    rows = [r for r in _wandb_history(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the trainer's step is the x-axis
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in records(run)], rel=1e-6)
    assert rows[-1]["loss"] == pytest.approx(records(run)[-1]["loss"], rel=1e-6)
    val = [(r["step"], r["val_loss"]) for r in _wandb_history(run) if "val_loss" in r]
    assert val[-1] == (4, pytest.approx(records(run, "val")[-1]["val_loss"], rel=1e-6))
