"""The sweep (newtonlm.eval.sweep): the paper preset's plan against a direct computation, configuration
errors, the sweep directory's identity (refusal with the differences named, extend), the local
backend's idempotence (finished, interrupted, locked by another process, failed) with a stand-in
trainer, the Slurm backend against the sbatch / squeue stand-ins (tests/fake_slurm), the hostfile
and multi-rank commands, and one tiny end-to-end sweep through launch/slurm.sbatch (slow)."""

import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from newtonlm.eval import sweep
from newtonlm.eval.compare import finished
from newtonlm.models import build_model, count_parameters, flops_per_token

REPO = Path(__file__).resolve().parents[1]
FAKE_SLURM = REPO / "tests" / "fake_slurm"


def compose(tmp_path, *overrides) -> sweep.SweepConfig:
    return sweep.compose(["sweep=smoke", f"sweep_dir={tmp_path / 'sw'}", "archs=[paragru,llama]", *overrides])


def test_paper_preset_dry_run_against_direct_computation(capsys, monkeypatch, tmp_path):
    """``--dry-run`` of configs/sweep/pararnn_paper.yaml (the command, in-process): every number of the
    printed plan from the presets built on the meta device, the 20-tokens-per-parameter rule and the
    stated peak and MFU."""
    monkeypatch.chdir(tmp_path)  # the default sweep_dir is relative: a dry run must not create it
    sweep.main(["sweep=pararnn_paper", "--dry-run"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if re.match(r"(paragru|paralstm|llama|mamba2)_\w+ ", line)}
    assert len(rows) == 16 and "vocabulary 32000" in out and "T = 2048" in out
    paper = OmegaConf.load(REPO / "configs" / "sweep" / "pararnn_paper.yaml")
    total_flops = 0.0
    for size, spec in paper.sizes.items():
        world = spec.nodes * spec.ranks_per_node
        per_step = spec.micro_batch_size * 2048 * spec.grad_accum * world
        for arch in ("paragru", "paralstm", "llama", "mamba2"):
            preset = OmegaConf.to_container(OmegaConf.load(REPO / "configs/model" / f"{arch}_{size}.yaml"))
            with torch.device("meta"):
                params = count_parameters(build_model(preset, 32000))
            steps = math.ceil(20 * params["total"] / per_step)
            tokens = steps * per_step
            flops = flops_per_token(preset, 32000, 2048) * tokens
            device_hours = flops / (0.35 * 989e12) / 3600
            total_flops += flops
            name, total, non_emb, dev, tps, n_steps, n_tokens, ratio, c, dh, h = rows[f"{arch}_{size}"]
            assert [total, non_emb, dev, tps, n_steps, n_tokens] == [
                f"{params['total']:,}", f"{params['non_embedding']:,}", str(world), f"{per_step:,}",
                f"{steps:,}", f"{tokens:,}"]
            assert 20 <= float(ratio) < 20 + per_step / params["total"] + 0.01
            assert float(c) == pytest.approx(flops, rel=1e-3)
            assert float(dh) == pytest.approx(device_hours, rel=1e-3)
            assert float(h) == pytest.approx(device_hours / world, rel=1e-3)
            # the per-architecture formula against the 6 N D rule: attention adds at T = 2048
            assert 0.97 < flops / (6 * params["total"] * tokens) < 1.3
    assert out.splitlines()[-1].split()[-3] == f"{total_flops:.3e}"
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


@pytest.mark.parametrize("override, message", [
    ("budget.tokens_per_param=20", "budget.tokens_per_param=20.0, budget.tokens=128; expected exactly one"),
    ("archs=[paragru,gpt]", "archs=['paragru', 'gpt']; expected names from"),
    ("trainer=['train.lr=1']", "trainer contains 'train.lr=1'; expected key=value trainer overrides without"),
    ("trainer=['model.hidden_size=8']", "trainer contains 'model.hidden_size=8'"),
    ("sizes.xs.trainer=['data=bible']", "sizes.xs.trainer contains 'data=bible'; expected the data in the"),
    ("sizes.xs.micro_batch_size=0", "sizes.xs.micro_batch_size=0; expected a positive integer"),
    ("backend=kubernetes", "backend='kubernetes'; expected one of ('local', 'slurm', 'hostfile')"),
    ("backend=hostfile", "backend=hostfile without hostfile; expected hostfile=<a DeepSpeed hostfile>"),
    ("hardware.mfu=1.5", "hardware.mfu of (all) = 1.5; expected in (0, 1]"),
])
def test_bad_configurations_are_named(tmp_path, override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compose(tmp_path, override)  # checked when composed


def test_command_line_errors_exit_2(tmp_path, capsys):
    for args, message in ((["sweep=nope"], "sweep/nope"), (["--dryrun"], "unknown option(s) ['--dryrun']"),
                          (["sweep=smoke", f"sweep_dir={tmp_path}", "only=[gpt_xs]"],
                           "only=['gpt_xs'] names ['gpt_xs']; expected runs of the plan")):
        with pytest.raises(SystemExit) as exc:
            sweep.main(args)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def register(tmp_path, *overrides) -> dict:
    cfg = compose(tmp_path, *overrides)
    vocab, _ = sweep.plan_vocab(cfg)
    sweep.SweepDir(Path(cfg.sweep_dir)).register(cfg, sweep.make_plan(cfg, vocab), vocab)
    return json.loads((Path(cfg.sweep_dir) / "sweep.json").read_text())


def test_sweep_dir_refuses_another_configuration_and_extends(tmp_path):
    rec = register(tmp_path)
    assert sorted(rec["runs"]) == ["llama_s", "llama_xs", "paragru_s", "paragru_xs"]
    assert rec["runs"]["llama_xs"]["plan"]["vocab_size"] == 512
    with pytest.raises(ValueError) as exc:
        register(tmp_path, "budget.tokens=256", "sizes.xs.lr=0.002")
    assert str(exc.value).splitlines()[:3] == [
        f"sweep directory {tmp_path / 'sw'} was made with another configuration:",
        "  budget.tokens: 128 -> 256", "  sizes.xs.lr: 0.001 -> 0.002"]
    register(tmp_path, "backend=slurm", "threads=2", "hardware.mfu=0.5", "name=other")  # execution only
    with pytest.raises(ValueError, match=re.escape("archs: removed [], added ['mamba2']")):
        register(tmp_path, "archs=[paragru,llama,mamba2]")
    rec = register(tmp_path, "archs=[paragru,llama,mamba2]", "extend=true")
    assert len(rec["runs"]) == 6 and rec["config"]["archs"] == ["paragru", "llama", "mamba2"]
    with pytest.raises(ValueError) as exc:  # extend adds runs; it cannot change one
        register(tmp_path, "archs=[paragru,mamba2]", "sizes.xs.lr=0.002", "extend=true")
    msg = str(exc.value)
    assert "cannot change the runs it has" in msg and "llama" not in msg  # llama_* are not in this config
    assert ("paragru_xs: overrides: removed ['train.lr=0.001'], added ['train.lr=0.002']" in msg
            and "mamba2_xs: overrides:" in msg and "paragru_s" not in msg)


def test_commands_of_the_backends(tmp_path):
    cfg = compose(tmp_path)
    run = sweep.make_plan(cfg, 512)[0]
    run_dir = tmp_path / "sw" / run.name
    cmd, env = sweep.local_command(cfg, run, run_dir)
    assert cmd == [sys.executable, "-m", "newtonlm.training.train", *run.overrides,
                   f"hydra.run.dir={run_dir}"]
    assert run.overrides == ["model=paragru_demo", "model.hidden_size=32", "model.num_hidden_layers=1",
                             "model.intermediate_size=64", "model.num_heads=2", "train.seq_len=32",
                             "train.lr=0.001", "train.micro_batch_size=2", "train.grad_accum=1",
                             "train.max_tokens=128", *cfg.trainer]
    cfg.sizes["xs"].ranks_per_node = 2
    cmd, env = sweep.local_command(cfg, run, run_dir)
    assert cmd[:2] == [str(REPO / "launch" / "torchrun.sh"), "2"] and env["PY"] == sys.executable
    cfg.sizes["xs"].nodes = 2
    with pytest.raises(ValueError, match="the local backend runs on this machine only"):
        sweep.local_command(cfg, run, run_dir)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode001 slots=2\nnode002 slots=2  # the second\n\n")
    cfg.backend, cfg.hostfile = "hostfile", str(hostfile)
    cmd, env = sweep.local_command(cfg, run, run_dir)
    assert cmd[:2] == [str(REPO / "launch" / "deepspeed_hostfile.sh"), str(hostfile)]
    assert cmd[2:] == [*run.overrides, f"hydra.run.dir={run_dir}"] and env["GPUS_PER_NODE"] == "2"
    cfg.sizes["xs"].nodes = 1
    with pytest.raises(ValueError, match="sizes.xs.nodes=1 but hostfile .* lists 2 host"):
        sweep.local_command(cfg, run, run_dir)


# ---- the local backend with a stand-in trainer --------------------------------------------------

FAKE_TRAINER = r'''
import fcntl, json, os, sys
from pathlib import Path
args = sys.argv[1:]
run = Path(next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")))
fd = os.open(run.parent / "state" / f"{run.name}.lock", os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held = False
except BlockingIOError:
    held = True
with open(run.parent / "calls.jsonl", "a") as fh:
    fh.write(json.dumps({"run": run.name, "args": args, "lock_held": held,
                         "threads": os.environ.get("OMP_NUM_THREADS")}) + "\n")
if os.environ.get("FAIL_RUN") == run.name:
    sys.exit(3)
with open(run / "metrics.jsonl", "a") as fh:
    fh.write(json.dumps({"kind": "train", "step": 2, "tokens_seen": 128, "loss": 5.0}) + "\n")
    fh.write(json.dumps({"kind": "val", "step": 2, "tokens_seen": 128, "final": True, "val_loss": 5.0,
                         "val_ppl": 148.4}) + "\n")
'''


def write_metrics(run_dir: Path, final: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    recs = [{"kind": "train", "step": 1, "tokens_seen": 64, "loss": 6.0}]
    if final:
        recs += [{"kind": "train", "step": 2, "tokens_seen": 128, "loss": 5.5},
                 {"kind": "val", "step": 2, "tokens_seen": 128, "final": True, "val_loss": 5.5,
                  "val_ppl": 245.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_local_backend_trains_each_run_once(tmp_path, monkeypatch, one_thread):
    trainer = tmp_path / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    cfg = compose(tmp_path, f"launcher=['{sys.executable}','{trainer}']")
    sw = Path(cfg.sweep_dir)
    write_metrics(sw / "paragru_xs", final=True)                   # finished before
    write_metrics(sw / "paragru_s", final=False)                   # interrupted: a checkpoint, no final
    (sw / "paragru_s" / "checkpoints").mkdir()
    (sw / "state").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (     # another sweep process, busy with llama_xs
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(sw / 'state' / 'llama_xs.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        evaluated = []

        def fake_eval(run_dir, data, batch_size, max_tokens, factor):
            evaluated.append(run_dir.name)
            result = {"short": {"ppl": 1.5}, "long": {}, "step": 2}
            (run_dir / "eval.json").write_text(json.dumps(result))
            return result

        monkeypatch.setattr(sweep, "evaluate_run", fake_eval)
        out = sweep.sweep(cfg, [])
        assert out["paragru_xs"] == "finished before; evaluated: ppl 1.50"
        assert re.fullmatch(r"resumed in \d+ s; evaluated: ppl 1.50", out["paragru_s"])
        assert out["llama_xs"] == "skipped: another process holds its lock (running)"
        assert re.fullmatch(r"trained in \d+ s; evaluated: ppl 1.50", out["llama_s"])
        calls = [json.loads(line) for line in (sw / "calls.jsonl").read_text().splitlines()]
        plan = {r.name: r for r in sweep.make_plan(cfg, 512)}
        assert [c["run"] for c in calls] == ["paragru_s", "llama_s"]
        for c in calls:  # the trainer ran under the run's lock, with the run's overrides, 1 thread
            assert c["lock_held"] and c["threads"] == "1"
            assert c["args"] == [*plan[c["run"]].overrides, f"hydra.run.dir={sw / c['run']}"]
        attempt = json.loads((sw / "state" / "llama_s.json").read_text())["attempts"][-1]
        assert attempt["result"] == "finished" and attempt["pid"] == os.getpid()
        assert evaluated == ["paragru_xs", "paragru_s", "llama_s"]

        again = sweep.sweep(cfg, [])  # nothing to do: no training, no evaluation
        assert len((sw / "calls.jsonl").read_text().splitlines()) == 2 and len(evaluated) == 3
        assert again["llama_s"] == "finished before" and again["llama_xs"].startswith("skipped")
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setenv("FAIL_RUN", "llama_xs")  # the lock is free now; the trainer fails
    failed = sweep.sweep(cfg, [])
    assert failed["llama_xs"] == f"failed (log: {sw / 'llama_xs' / 'train.log'})"
    assert json.loads((sw / "state" / "llama_xs.json").read_text())["attempts"][-1]["result"] == "failed"
    monkeypatch.delenv("FAIL_RUN")
    assert re.fullmatch(r"trained in \d+ s; evaluated: ppl 1.50", sweep.sweep(cfg, [])["llama_xs"])
    assert len(json.loads((sw / "state" / "llama_xs.json").read_text())["attempts"]) == 2
    # every run finished: the scaling report (report_dir, default <sweep_dir>/scaling) with the command
    assert "python -m newtonlm.eval.sweep\n" in (sw / "scaling" / "scaling.md").read_text()


def test_a_run_lock_lives_as_long_as_a_process_of_the_run(tmp_path):
    """The lock a trainer inherits stays held after the sweep's own context ends (the sweep process
    killed, a rank still running), and is free once the last holder has ended."""
    sd = sweep.SweepDir(tmp_path)
    (tmp_path / "state").mkdir()
    with sd.lock("run") as fd:
        assert fd is not None and sd.busy("run")
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], pass_fds=(fd,))
    try:
        assert sd.busy("run")
    finally:
        child.kill()
        child.wait()
    assert not sd.busy("run")


# ---- the Slurm backend against the stand-ins ------------------------------------------------------

def submissions(slurm_dir: Path) -> list[dict]:
    path = slurm_dir / "sbatch.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_slurm_backend_submits_each_run_once(tmp_path, monkeypatch):
    slurm = tmp_path / "slurm"
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(slurm))
    argv = ["sweep=smoke", f"sweep_dir={tmp_path / 'sw'}", "archs=[paragru,llama]", "backend=slurm",
            "slurm.options=['--partition=gpu']"]
    cfg = sweep.compose(argv)
    sw, plan = Path(cfg.sweep_dir), {r.name: r for r in sweep.make_plan(cfg, 512)}
    out = sweep.sweep(cfg, argv)
    subs = submissions(slurm)
    train = {s["options"]["job-name"].removeprefix("smoke-"): s for s in subs if s["script"]}
    evals = {s["options"]["job-name"].removeprefix("smoke-").removesuffix("-eval"): s for s in subs
             if "wrap" in s["options"]}
    assert sorted(train) == sorted(evals) == sorted(plan) and len(subs) == 8
    for name, s in train.items():
        assert s["script"] == [str(REPO / "launch" / "slurm.sbatch")] and s["args"] == plan[name].overrides
        assert s["options"] == {
            "parsable": "", "job-name": f"smoke-{name}", "nodes": "1", "ntasks-per-node": "1",
            "time": "24:00:00", "output": f"{sw / name}/slurm-%j.out",
            "export": f"ALL,RUN_DIR={sw / name},PY={sys.executable},OMP_NUM_THREADS=1",
            "gpus-per-node": "1", "partition": "gpu"}
        e = evals[name]["options"]
        assert e["dependency"] == f"afterok:{s['job_id']}" and e["kill-on-invalid-dep"] == "yes"
        assert shlex.split(e["wrap"]) == [
            sys.executable, "-m", "newtonlm.eval.sweep", "sweep=smoke", "archs=[paragru,llama]",
            "slurm.options=['--partition=gpu']", "backend=local", "stage=eval", f"only=[{name}]",
            f"sweep_dir={sw}"]
        assert out[name] == f"submitted job {s['job_id']}, evaluation job {evals[name]['job_id']}"
        attempts = json.loads((sw / "state" / f"{name}.json").read_text())["attempts"]
        assert [(a["kind"], a["job_id"]) for a in attempts] == [("train", s["job_id"]),
                                                                ("eval", evals[name]["job_id"])]

    again = sweep.sweep(cfg, argv)  # every job is still queued: nothing is submitted twice
    assert len(submissions(slurm)) == 8
    assert again["llama_s"] == f"skipped: Slurm job {train['llama_s']['job_id']} is PENDING"

    # paragru_xs's job ended without finishing the run (and its evaluation job went with it); llama_s
    # finished but its evaluation job is gone: resubmit the one, evaluate the other
    ended = {train["paragru_xs"]["job_id"], evals["paragru_xs"]["job_id"], train["llama_s"]["job_id"],
             evals["llama_s"]["job_id"]}
    queue = slurm / "queue"
    queue.write_text("".join(line + "\n" for line in queue.read_text().splitlines()
                             if line.split()[0] not in ended))
    write_metrics(sw / "llama_s", final=True)
    third = sweep.sweep(cfg, argv)
    new = submissions(slurm)[8:]
    assert [(s["options"]["job-name"], s["options"].get("dependency")) for s in new] == [
        ("smoke-paragru_xs", None), ("smoke-paragru_xs-eval", f"afterok:{new[0]['job_id']}"),
        ("smoke-llama_s-eval", None)]
    assert third["llama_s"] == f"finished; evaluation job {new[2]['job_id']} submitted"
    assert third["paragru_s"].startswith("skipped: Slurm job")


# ---- one tiny sweep end to end ----------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_sweep_end_to_end_through_slurm_template(tmp_path):
    """backend=slurm with the sbatch stand-in running each job at once: the training jobs run
    launch/slurm.sbatch (srun / scontrol stand-ins, one task) and the real trainer, the evaluation
    jobs this command with stage=eval. Then the scaling reader on the result, and re-running the sweep
    (either backend) trains and submits nothing."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slurm, sw = tmp_path / "slurm", tmp_path / "sw"
    env = {**os.environ, "PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}",
           "FAKE_SLURM_DIR": str(slurm), "FAKE_SBATCH_RUN": "1", "MASTER_PORT": str(port),
           "FAKE_SLURM_LOG": str(tmp_path / "scontrol.log"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    smoke = OmegaConf.load(REPO / "configs" / "sweep" / "smoke.yaml")
    trainer = [*smoke.trainer, f"data.tokenizer.cache_dir={tmp_path / 'tok'}"]
    args = ["sweep=smoke", f"sweep_dir={sw}", "archs=[paragru,llama]", "~sizes.s", "backend=slurm",
            "slurm.gpus=false", "trainer=[" + ",".join(f"'{o}'" for o in trainer) + "]"]  # quoted: '=' inside
    proc = subprocess.run([sys.executable, "-m", "newtonlm.eval.sweep", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    codes = json.loads((slurm / "exit_codes.json").read_text())
    assert len(codes) == 4 and set(codes.values()) == {0}, codes
    for name in ("paragru_xs", "llama_xs"):
        run = sw / name
        assert finished(run) and next(run.glob("slurm-*.out")).stat().st_size > 0
        ev = json.loads((run / "eval.json").read_text())
        assert ev["step"] == 2 and ev["short"]["eval_len"] == 32 and ev["long"]["eval_len"] == 64

    from newtonlm.eval import scaling

    runs, budget_params = scaling.read_sweep(sw)
    assert budget_params == "total"
    assert [r.name for r in runs] == ["paragru_xs", "llama_xs"]
    for r in runs:
        assert r.status == "finished" and r.tokens == 128 and r.step == 2 and r.vocab_size == 512
        assert r.bits_per_byte > 0 and math.isfinite(r.val_loss) and r.flops == r.flops_per_token * 128
        planned = json.loads((sw / "sweep.json").read_text())["runs"][r.name]["plan"]
        assert r.parameters == planned["parameters"]

    again = subprocess.run([sys.executable, "-m", "newtonlm.eval.sweep", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and len(submissions(slurm)) == 4, again.stdout[-2000:]
    assert again.stdout.count(": finished\n") == 2
    local = subprocess.run([sys.executable, "-m", "newtonlm.eval.sweep", *args[:4], args[-1]], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0 and local.stdout.count(": finished before\n") == 2, local.stdout[-2000:]
