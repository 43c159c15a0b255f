"""A sweep: every architecture x size of a config, trained on a token-budget rule and evaluated, on
this machine, through Slurm or through a DeepSpeed hostfile; re-running it is always safe.

    python -m newtonlm.eval.sweep sweep=cpu --dry-run          # the plan (same as dry_run=true)
    python -m newtonlm.eval.sweep sweep=cpu                    # train + evaluate, one run after another
    python -m newtonlm.eval.sweep sweep=pararnn_paper backend=slurm   # one Slurm job per run
    python -m newtonlm.eval.scaling runs/sweep/cpu             # then: fits, table, plots

Configs: ``configs/sweep/<name>.yaml`` (fields: :class:`SweepConfig`), composed through
``configs/eval/sweep.yaml``. Each run ``<arch>_<size>`` is the trainer (``newtonlm.training.train``,
a subprocess or a batch job) with the overrides of :func:`trainer_overrides` into
``<sweep_dir>/<arch>_<size>/``; its token budget is ``budget.tokens_per_param`` x its exact parameter
count (meta device) or ``budget.tokens``, rounded up to whole steps as the trainer does.

Idempotence. ``<sweep_dir>/sweep.json`` records the configuration and every run's overrides; a
later invocation with another configuration is refused with the differences named (``extend=true``
adds runs, and still refuses to change a run that exists). ``<sweep_dir>/state/<run>.json`` records
each attempt (local pid or Slurm job id). A local run holds an exclusive ``flock`` on
``state/<run>.lock`` while any of its processes lives (the trainer inherits the descriptor), so a
second sweep process, on this machine or another one sharing the filesystem, skips it instead of
starting it twice; a Slurm run is skipped while ``squeue`` still lists its job. A finished run
(final validation in its metrics) is never retrained; an interrupted one resumes (the trainer's
``train.resume=auto``).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ..models import ARCHS, flops_per_token
from ..paths import CONFIG_DIR
from .compare import SRC, evaluate_run, finished, read_metrics, run_trainer, trainer_env
from .sizes import SizeConfig, model_fields, override_list, parameter_count

BACKENDS = ("local", "slurm", "hostfile")
# trainer keys each run gets from the sweep's own fields (train overrides may not set them)
SET_BY_SWEEP = ("train.seq_len", "train.lr", "train.micro_batch_size", "train.grad_accum", "train.max_tokens",
                "train.max_steps", "hydra.run.dir")
STAGES = ("all", "train", "eval")
# Fields that say how and where runs execute, not what they compute: a sweep directory accepts
# changes to these (e.g. local first, then slurm).
EXECUTION = ("name", "sweep_dir", "report_dir", "backend", "launcher", "hostfile", "slurm", "threads",
             "stage", "only", "dry_run", "extend", "hardware")


@dataclass
class SweepSize(SizeConfig):
    """A size: ``preset`` + ``overrides`` (SizeConfig), its learning rate and batch
    (``micro_batch_size`` sequences per rank and micro-step, ``grad_accum`` micro-steps), its
    resources (``nodes`` x ``ranks_per_node`` processes, one per GPU) and more trainer overrides
    (``trainer``, applied after the sweep's)."""

    lr: float = 3e-3
    micro_batch_size: int = 8
    grad_accum: int = 1
    nodes: int = 1
    ranks_per_node: int = 1
    trainer: list[str] = field(default_factory=list)


@dataclass
class Budget:
    """Tokens per run: ``tokens_per_param`` x parameters (``params``: ``total`` or
    ``non_embedding``), or a fixed ``tokens``; exactly one of the two > 0."""

    tokens_per_param: float = 20.0
    tokens: int = 0
    params: str = "total"


@dataclass
class Hardware:
    """For the plan's time estimate only: ``peak_flops`` of one device (``name``) and the model-FLOPs
    utilization assumed (``mfu``, or ``mfu_by_arch``)."""

    name: str = "H100 SXM, bf16 dense"
    peak_flops: float = 989e12
    mfu: float = 0.35
    mfu_by_arch: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalSettings:
    """Evaluation of each finished run (``newtonlm.eval.perplexity``, as the comparison): sequences of
    the training length and ``factor`` times it, ``batch_size``, ``max_tokens`` (0: the whole split),
    ``data`` overrides (empty: each run's own held-out split). ``enabled=false`` skips it."""

    enabled: bool = True
    factor: float = 4.0
    batch_size: int = 8
    max_tokens: int = 0
    data: list[str] = field(default_factory=list)


@dataclass
class SlurmSettings:
    """``backend=slurm``: ``script`` (the batch script, relative to the checkout), ``time`` limit of a
    training job (the script requeues itself at the limit), ``gpus`` (ask --gpus-per-node=ranks),
    more sbatch ``options`` (--partition=..., --account=...), and the ``eval_options`` of the
    evaluation job submitted after each training job (``--dependency=afterok``)."""

    script: str = "launch/slurm.sbatch"
    time: str = "24:00:00"
    gpus: bool = True
    options: list[str] = field(default_factory=list)
    eval_options: list[str] = field(default_factory=lambda: ["--nodes=1", "--ntasks=1", "--time=4:00:00"])


@dataclass
class SweepConfig:
    """``archs`` x ``sizes`` (label -> SweepSize, smallest first); ``seq_len``; ``vocab_size`` of the
    plan (0: the data config's trained BPE size, rounded up to 64 as the trainer does); ``budget``;
    ``trainer``: Hydra overrides of the trainer shared by every run (data, schedule, precision, ...,
    e.g. ``data=slimpajama``, ``train=cluster``); ``evaluation``; ``hardware`` (the estimate).
    (``trainer`` and ``evaluation`` are not called ``train`` / ``eval``: those name config groups,
    which Hydra would take a list override of for a group choice.) Execution: ``sweep_dir``,
    ``report_dir`` (where ``newtonlm.eval.scaling`` writes its report when a local sweep ends with
    every run finished; empty: no report),
    ``backend`` (local | slurm | hostfile), ``launcher`` (local: command prefix of the trainer; empty:
    this Python, or launch/torchrun.sh for several ranks), ``hostfile`` (a DeepSpeed hostfile, or
    ``local``), ``slurm``, ``threads`` (OMP_NUM_THREADS of local runs; 0: unset), ``stage`` (all |
    train | eval), ``only`` (run names), ``dry_run``, ``extend``."""

    name: str = "sweep"
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    sizes: dict[str, SweepSize] = field(default_factory=dict)
    seq_len: int = 256
    vocab_size: int = 0
    budget: Budget = field(default_factory=Budget)
    trainer: list[str] = field(default_factory=lambda: ["data=shakespeare"])
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    hardware: Hardware = field(default_factory=Hardware)
    sweep_dir: str = "runs/sweep/${name}"
    report_dir: str = "${sweep_dir}/scaling"
    backend: str = "local"
    launcher: list[str] = field(default_factory=list)
    hostfile: str = ""
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    threads: int = 1
    stage: str = "all"
    only: list[str] = field(default_factory=list)
    dry_run: bool = False
    extend: bool = False


ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)


@dataclass
class Run:
    """One planned run. ``budget_tokens``: what the trainer gets (``train.max_tokens``); ``tokens``:
    what it trains on (whole steps); ``flops = flops_per_token x tokens``; ``device_hours = flops /
    (mfu x peak) / 3600``; ``hours = device_hours / world``."""

    name: str
    arch: str
    size: str
    overrides: list[str]
    parameters: dict
    world: int
    tokens_per_step: int
    budget_tokens: int
    steps: int
    tokens: int
    flops_per_token: float
    flops: float
    device_hours: float
    hours: float


# ---- the plan -------------------------------------------------------------------------------------

def _key(override: str) -> str:
    """The key of a Hydra override (``+a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def check(cfg: SweepConfig) -> None:
    """Value checks before anything runs: ValueError naming the field and what is expected."""
    def need(cond, what, expected):
        if not cond:
            raise ValueError(f"{what}; expected {expected}")

    need(cfg.archs and all(a in ARCHS for a in cfg.archs), f"archs={cfg.archs}", f"names from {ARCHS}")
    need(len(set(cfg.archs)) == len(cfg.archs), f"archs={cfg.archs} repeats a name", "each once")
    need(bool(cfg.sizes), "sizes is empty", "at least one size (label: {preset, lr, ...})")
    need(cfg.seq_len > 0, f"seq_len={cfg.seq_len}", "a positive integer")
    need(cfg.vocab_size >= 0, f"vocab_size={cfg.vocab_size}", ">= 0 (0: from the data config)")
    b = cfg.budget
    need((b.tokens_per_param > 0) != (b.tokens > 0),
         f"budget.tokens_per_param={b.tokens_per_param}, budget.tokens={b.tokens}", "exactly one of them > 0")
    need(b.params in ("total", "non_embedding"), f"budget.params={b.params!r}", "total or non_embedding")
    for label, s in cfg.sizes.items():
        for key in ("micro_batch_size", "grad_accum", "nodes", "ranks_per_node"):
            need(getattr(s, key) >= 1, f"sizes.{label}.{key}={getattr(s, key)}", "a positive integer")
        need(s.lr > 0, f"sizes.{label}.lr={s.lr}", "> 0")
    lists = [("trainer", cfg.trainer), *((f"sizes.{k}.trainer", s.trainer) for k, s in cfg.sizes.items())]
    for where, overrides in lists:
        for o in overrides:
            key = _key(o)
            need("=" in o and key not in SET_BY_SWEEP and key.split(".")[0] != "model",
                 f"{where} contains {o!r}", "key=value trainer overrides without the keys the sweep sets "
                 "itself (seq_len; sizes.<size>.lr, micro_batch_size, grad_accum; budget; sweep_dir) and "
                 "without model overrides (they go in sizes.<size>.overrides)")
            need(where == "trainer" or key.split(".")[0] != "data", f"{where} contains {o!r}",
                 "the data in the sweep's trainer list (every run reads the same data)")
    need(cfg.backend in BACKENDS, f"backend={cfg.backend!r}", f"one of {BACKENDS}")
    need(cfg.stage in STAGES, f"stage={cfg.stage!r}", f"one of {STAGES}")
    need(cfg.backend != "hostfile" or bool(cfg.hostfile), "backend=hostfile without hostfile",
         "hostfile=<a DeepSpeed hostfile> or hostfile=local")
    need(cfg.evaluation.factor >= 1, f"evaluation.factor={cfg.evaluation.factor}",
         ">= 1 (a multiple of the training length)")
    h = cfg.hardware
    need(h.peak_flops > 0, f"hardware.peak_flops={h.peak_flops}", "> 0 (FLOP/s of one device)")
    for arch, m in {"(all)": h.mfu, **h.mfu_by_arch}.items():
        need(0 < m <= 1, f"hardware.mfu of {arch} = {m}", "in (0, 1]")


def plan_vocab(cfg: SweepConfig) -> tuple[int, str]:
    """(vocabulary of the plan, where it comes from). A trained BPE is assumed to reach its
    ``vocab_size`` (the model's is that rounded up to 64); a pretrained tokenizer needs ``vocab_size``."""
    if cfg.vocab_size > 0:
        return cfg.vocab_size, "vocab_size of the sweep config"
    from newtonlm.data import compose_data_config

    tok = compose_data_config([o for o in cfg.trainer if _key(o).split(".")[0] == "data"]).tokenizer
    if tok.pretrained:
        raise ValueError(f"the data config uses the pretrained tokenizer {tok.pretrained!r}; set vocab_size="
                         "<its size rounded up to 64> in the sweep config (the plan does not download it)")
    return -(-tok.vocab_size // 64) * 64, f"the data config's BPE size {tok.vocab_size}, rounded up to 64"


def trainer_overrides(cfg: SweepConfig, arch: str, size: str, budget_tokens: int) -> list[str]:
    """The trainer's Hydra overrides of one run, without its run directory."""
    s = cfg.sizes[size]
    return [f"model={arch}_{s.preset}", *(f"model.{o}" for o in override_list(s, arch)),
            f"train.seq_len={cfg.seq_len}", f"train.lr={s.lr}",
            f"train.micro_batch_size={s.micro_batch_size}", f"train.grad_accum={s.grad_accum}",
            f"train.max_tokens={budget_tokens}", *cfg.trainer, *s.trainer]


def make_plan(cfg: SweepConfig, vocab: int) -> list[Run]:
    """Every run, sizes in config order then architectures, with its exact numbers."""
    check(cfg)
    runs = []
    for size, s in cfg.sizes.items():
        for arch in cfg.archs:
            fields = model_fields(s, arch)
            params = parameter_count(fields, vocab)
            world = s.nodes * s.ranks_per_node
            per_step = s.micro_batch_size * cfg.seq_len * s.grad_accum * world
            budget = cfg.budget.tokens or math.ceil(cfg.budget.tokens_per_param * params[cfg.budget.params])
            steps = math.ceil(budget / per_step)  # as the trainer turns train.max_tokens into steps
            fpt = flops_per_token(fields, vocab, cfg.seq_len)
            flops = fpt * steps * per_step
            mfu = cfg.hardware.mfu_by_arch.get(arch, cfg.hardware.mfu)
            device_hours = flops / (mfu * cfg.hardware.peak_flops) / 3600
            runs.append(Run(f"{arch}_{size}", arch, size, trainer_overrides(cfg, arch, size, budget), params,
                            world, per_step, budget, steps, steps * per_step, fpt, flops, device_hours,
                            device_hours / world))
    return runs


def format_plan(cfg: SweepConfig, runs: list[Run], vocab: int, vocab_note: str) -> str:
    h = cfg.hardware
    mfu = f"MFU {h.mfu}" + (f" ({', '.join(f'{a} {m}' for a, m in h.mfu_by_arch.items())})"
                            if h.mfu_by_arch else "")
    rule = (f"{cfg.budget.tokens_per_param:g} tokens per {cfg.budget.params.replace('_', '-')} parameter"
            if cfg.budget.tokens_per_param > 0 else f"a fixed {cfg.budget.tokens:,} tokens")
    lines = [
        f"sweep {cfg.name}: {len(runs)} runs into {Path(cfg.sweep_dir).resolve()} (backend {cfg.backend})",
        f"budget: {rule}, rounded up to whole steps; T = {cfg.seq_len}; vocabulary {vocab} ({vocab_note})",
        "parameters: exact, the model built on the meta device (total: tied head counted once)",
        "FLOPs = newtonlm.models.flops_per_token(model, V, T) x tokens (3 x forward; a multiply-add is 2 "
        "FLOPs; embedding, norms and solver iterations not counted)",
        f"device-hours = FLOPs / ({mfu} x {h.peak_flops:.3g} FLOP/s, {h.name}) / 3600; hours = device-hours "
        "/ devices. A simple estimate, not a memory or throughput plan.",
        "",
        f"{'run':<18} {'params':>15} {'non-emb':>15} {'dev':>4} {'tokens/step':>11} {'steps':>8} "
        f"{'tokens':>17} {'tok/param':>9} {'FLOPs':>10} {'dev-hours':>10} {'hours':>8}",
    ]
    for r in runs:
        ratio = r.tokens / r.parameters[cfg.budget.params]
        lines.append(f"{r.name:<18} {r.parameters['total']:>15,} {r.parameters['non_embedding']:>15,} "
                     f"{r.world:>4} {r.tokens_per_step:>11,} {r.steps:>8,} {r.tokens:>17,} {ratio:>9.2f} "
                     f"{r.flops:>10.3e} {r.device_hours:>10.4g} {r.hours:>8.4g}")
    lines.append(f"{'total':<18} {'':>15} {'':>15} {'':>4} {'':>11} {sum(r.steps for r in runs):>8,} "
                 f"{sum(r.tokens for r in runs):>17,} {'':>9} {sum(r.flops for r in runs):>10.3e} "
                 f"{sum(r.device_hours for r in runs):>10.4g} {sum(r.hours for r in runs):>8.4g}")
    return "\n".join(lines)


# ---- the sweep directory: identity, per-run state and locks ---------------------------------------

def identity(cfg: SweepConfig) -> dict:
    """What a sweep computes: the config without the execution fields (:data:`EXECUTION`)."""
    return {k: v for k, v in asdict(cfg).items() if k not in EXECUTION}


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def differences(old: dict, new: dict) -> list[str]:
    """One line per dotted key whose value differs: ``key: old -> new`` (``(absent)`` when missing),
    for lists the items removed and added."""
    a, b, out = _flat(old), _flat(new), []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, "(absent)"), b.get(k, "(absent)")
        if x == y:
            continue
        if isinstance(x, list) and isinstance(y, list):
            out.append(f"{k}: removed {[v for v in x if v not in y]}, added {[v for v in y if v not in x]}")
        else:
            out.append(f"{k}: {x!r} -> {y!r}")
    return out


def run_spec(cfg: SweepConfig, run: Run) -> dict:
    """What identifies a run's results: its trainer overrides and evaluation settings."""
    return {"overrides": run.overrides, "evaluation": asdict(cfg.evaluation)}


class SweepDir:
    """``<sweep_dir>``: ``sweep.json`` (the configuration, and every run's spec and plan), the run
    directories ``<run>/`` (the trainer's), ``state/<run>.json`` (its attempts) and
    ``state/<run>.lock``."""

    def __init__(self, path: Path):
        self.path = path
        self.record_path = path / "sweep.json"

    def run_dir(self, name: str) -> Path:
        return self.path / name

    def register(self, cfg: SweepConfig, runs: list[Run], vocab: int) -> None:
        """Create ``sweep.json``, or check it: the same configuration, or with ``extend`` new runs
        only. A refusal (ValueError) names every difference."""
        new = {r.name: {**run_spec(cfg, r), "plan": {**asdict(r), "vocab_size": vocab}} for r in runs}
        merged = new
        if self.record_path.is_file():
            rec = json.loads(self.record_path.read_text())
            diffs = differences(rec["config"], identity(cfg))
            if diffs and not cfg.extend:
                raise ValueError(f"sweep directory {self.path} was made with another configuration:\n  "
                                 + "\n  ".join(diffs) + "\nUse another sweep_dir, or extend=true to add runs "
                                 "to this one (runs it already has cannot change).")
            changed = {name: differences(run_spec_of(rec["runs"][name]), run_spec_of(entry))
                       for name, entry in new.items() if name in rec["runs"]}
            changed = {name: d for name, d in changed.items() if d}
            if changed:
                raise ValueError(f"extend=true adds runs to {self.path} but cannot change the runs it has; "
                                 "these differ:\n  " + "\n  ".join(f"{n}: {'; '.join(d)}" for n, d in
                                                                   changed.items()))
            merged = {**rec["runs"], **new}
        (self.path / "state").mkdir(parents=True, exist_ok=True)
        _write_json(self.record_path, {"config": identity(cfg), "budget_params": cfg.budget.params,
                                       "runs": merged})

    def state(self, name: str) -> dict:
        p = self.path / "state" / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else {"attempts": []}

    def add_attempt(self, name: str, **attempt) -> None:
        st = self.state(name)
        st["attempts"].append({"started": time.time(), **attempt})
        _write_json(self.path / "state" / f"{name}.json", st)

    def end_attempt(self, name: str, **fields) -> None:
        st = self.state(name)
        st["attempts"][-1].update(ended=time.time(), **fields)
        _write_json(self.path / "state" / f"{name}.json", st)

    @contextmanager
    def lock(self, name: str):
        """Yields the descriptor of ``state/<name>.lock`` locked exclusively (flock), or None when
        another process holds it. Processes that inherit the descriptor keep the lock held, also
        after this context ends (a trainer's rank or worker that outlives the sweep process)."""
        fd = os.open(self.path / "state" / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            yield None
            return
        try:
            yield fd
        finally:  # no LOCK_UN: that would release it for the run's processes too; closing our
            os.close(fd)  # descriptor releases it when the last process holding one has ended

    def busy(self, name: str) -> bool:
        """Another process holds the run's lock (it is training or evaluating it)."""
        with self.lock(name) as fd:
            return fd is None


def run_spec_of(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "plan"}


def _write_json(path: Path, obj) -> None:
    """Write whole or not at all (a crash leaves the previous file); a temporary file per process,
    so that two sweep processes writing the same file do not collide."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def queued_job(attempts: list[dict], kind: str) -> tuple[str, str] | None:
    """(job id, state) of the last Slurm job of ``kind`` (train | eval) if ``squeue`` still lists it
    (PENDING, RUNNING, REQUEUED, ...); None when it ended, or without a Slurm job or squeue."""
    jobs = [a for a in attempts if a.get("job_id") and a.get("kind") == kind]
    if not jobs or shutil.which("squeue") is None:
        return None
    job = jobs[-1]["job_id"]
    proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    # a job squeue no longer knows: exit 1, "Invalid job id specified"
    state = proc.stdout.strip() if proc.returncode == 0 else ""
    return (job, state) if state else None


# ---- backends -------------------------------------------------------------------------------------

def local_command(cfg: SweepConfig, run: Run, run_dir: Path) -> tuple[list[str], dict]:
    """(command, extra environment) of a run on this machine (``local``) or through the DeepSpeed
    hostfile launcher (``hostfile``)."""
    s = cfg.sizes[run.size]
    args = [*run.overrides, f"hydra.run.dir={run_dir}"]
    env = {"PY": sys.executable}
    if cfg.backend == "hostfile":
        if cfg.hostfile != "local" and not Path(cfg.hostfile).is_file():
            raise ValueError(f"hostfile={cfg.hostfile!r} does not exist; expected a DeepSpeed hostfile "
                             "(lines '<host> slots=<GPUs>', see launch/hostfile.example) or 'local'")
        hosts = 1 if cfg.hostfile == "local" else len(
            [ln for ln in Path(cfg.hostfile).read_text().splitlines() if ln.split("#")[0].strip()])
        if hosts != s.nodes:
            raise ValueError(f"sizes.{run.size}.nodes={s.nodes} but hostfile {cfg.hostfile!r} lists {hosts} "
                             "host(s); expected one host per node (the launcher uses every host of the file)")
        ds = Path(sys.executable).parent / "deepspeed"
        env.update(GPUS_PER_NODE=str(s.ranks_per_node), **({"DS": str(ds)} if ds.exists() else {}))
        return [str(SRC / "launch" / "deepspeed_hostfile.sh"), cfg.hostfile, *args], env
    if cfg.launcher:
        return [*cfg.launcher, *args], env
    if s.nodes > 1:
        raise ValueError(f"sizes.{run.size}.nodes={s.nodes}; the local backend runs on this machine only: "
                         "expected 1, or backend=slurm / backend=hostfile")
    if s.ranks_per_node > 1:
        return [str(SRC / "launch" / "torchrun.sh"), str(s.ranks_per_node), *args], env
    return [sys.executable, "-m", "newtonlm.training.train", *args], env


def needs_eval(cfg: SweepConfig, run_dir: Path) -> bool:
    """A finished run whose ``eval.json`` is missing or scored another step."""
    if not cfg.evaluation.enabled or not finished(run_dir):
        return False
    steps = [r["step"] for r in read_metrics(run_dir) if r.get("kind") == "train"]
    path = run_dir / "eval.json"
    return not path.is_file() or json.loads(path.read_text()).get("step") != (steps[-1] if steps else None)


def run_local(cfg: SweepConfig, runs: list[Run], sd: SweepDir) -> dict[str, str]:
    """Train (stage all / train) and evaluate (all / eval) the runs one after another, each under its
    lock; a failed run is reported and the others go on. Returns run -> outcome."""
    env = trainer_env(cfg.threads)
    outcome = {}
    for run in runs:
        run_dir = sd.run_dir(run.name)
        with sd.lock(run.name) as fd:
            if fd is None:
                outcome[run.name] = "skipped: another process holds its lock (running)"
                continue
            if (job := queued_job(sd.state(run.name)["attempts"], "train")) is not None:
                outcome[run.name] = f"skipped: Slurm job {job[0]} is {job[1]}"
                continue
            if finished(run_dir):
                outcome[run.name] = "finished before"
            elif cfg.stage == "eval":
                outcome[run.name] = "not finished (stage=eval trains nothing)"
                continue
            else:
                cmd, extra = local_command(cfg, run, run_dir)
                how = "resumed" if (run_dir / "checkpoints").is_dir() else "trained"
                sd.add_attempt(run.name, kind="train", backend=cfg.backend, pid=os.getpid(),
                               host=socket.gethostname(), command=cmd)
                try:  # the trainer inherits the lock: it stays held while any of its processes lives
                    seconds = run_trainer(cmd, run_dir, {**env, **extra}, run.name, pass_fds=(fd,))
                except RuntimeError as err:
                    sd.end_attempt(run.name, result="failed")
                    print(err, file=sys.stderr, flush=True)
                    outcome[run.name] = f"failed (log: {run_dir / 'train.log'})"
                    continue
                sd.end_attempt(run.name, result="finished", seconds=seconds)
                outcome[run.name] = f"{how} in {seconds:.0f} s"
            if cfg.stage != "train" and needs_eval(cfg, run_dir):
                e = cfg.evaluation
                try:  # a run that cannot be evaluated is reported; the others go on
                    ev = evaluate_run(run_dir, e.data, e.batch_size, e.max_tokens, e.factor)
                except Exception as err:  # any error of loading or scoring
                    outcome[run.name] += f"; evaluation failed: {type(err).__name__}: {err}"
                    continue
                outcome[run.name] += f"; evaluated: ppl {ev['short']['ppl']:.2f}"
    return outcome


def _sbatch(args: list[str]) -> str:
    """Submit; returns the job id (``--parsable`` prints ``id`` or ``id;cluster``)."""
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {shlex.join(args)} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def eval_command(argv: list[str], sd: SweepDir, name: str) -> list[str]:
    """This command line turned into the evaluation of run ``name`` alone, on this machine."""
    own = ("backend", "stage", "only", "dry_run", "extend", "sweep_dir")
    keep = [a for a in argv if _key(a) not in own]
    return [sys.executable, "-m", "newtonlm.eval.sweep", *keep, "backend=local", "stage=eval",
            f"only=[{name}]", f"sweep_dir={sd.path}"]


def submit_eval(cfg: SweepConfig, sd: SweepDir, name: str, argv: list[str], *, after: str | None) -> str:
    """Submit the evaluation job of run ``name``, after training job ``after`` succeeds if given."""
    dep = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    job = _sbatch([f"--job-name={cfg.name}-{name}-eval", f"--output={sd.run_dir(name)}/eval-%j.out", *dep,
                   *cfg.slurm.eval_options, f"--wrap={shlex.join(eval_command(argv, sd, name))}"])
    sd.add_attempt(name, kind="eval", backend="slurm", job_id=job, after=after)
    return job


def submit_slurm(cfg: SweepConfig, runs: list[Run], sd: SweepDir, argv: list[str]) -> dict[str, str]:
    """One batch job per run (``slurm.script`` with the run's overrides, RUN_DIR in its environment)
    and its evaluation job (``--dependency=afterok``). A run that is finished, whose job squeue still
    lists, or that a local process holds is not submitted again. Submissions into one sweep
    directory are serialized (``state/submit.lock``). Returns run -> outcome."""
    for tool in ("sbatch", "squeue"):
        if shutil.which(tool) is None:
            raise ValueError(f"backend=slurm needs {tool} on PATH and it is not (a Slurm login node has it)")
    script = (SRC / cfg.slurm.script).resolve()
    if not script.is_file():
        raise ValueError(f"slurm.script={cfg.slurm.script!r}: {script} does not exist")
    want_eval = cfg.stage != "train" and cfg.evaluation.enabled
    outcome = {}
    with sd.lock("submit") as held:
        if held is None:
            raise ValueError(f"another sweep process is submitting into {sd.path} (state/submit.lock)")
        for run in runs:
            run_dir, s = sd.run_dir(run.name), cfg.sizes[run.size]
            attempts = sd.state(run.name)["attempts"]
            train_job, eval_job = queued_job(attempts, "train"), queued_job(attempts, "eval")
            if sd.busy(run.name):
                outcome[run.name] = "skipped: another process holds its lock (running)"
            elif train_job is not None:
                outcome[run.name] = f"skipped: Slurm job {train_job[0]} is {train_job[1]}"
                if want_eval and eval_job is None:
                    job = submit_eval(cfg, sd, run.name, argv, after=train_job[0])
                    outcome[run.name] += f"; evaluation job {job} submitted"
            elif finished(run_dir) or cfg.stage == "eval":
                outcome[run.name] = "finished" if finished(run_dir) else "not finished (stage=eval)"
                if want_eval and eval_job is None and needs_eval(cfg, run_dir):
                    job = submit_eval(cfg, sd, run.name, argv, after=None)
                    outcome[run.name] += f"; evaluation job {job} submitted"
            else:
                if "," in str(run_dir) or "," in sys.executable:
                    raise ValueError(f"{run_dir} or {sys.executable} contains ','; sbatch --export cannot "
                                     "pass it: choose a sweep_dir without commas")
                export = f"--export=ALL,RUN_DIR={run_dir},PY={sys.executable}"
                opts = [f"--job-name={cfg.name}-{run.name}", f"--nodes={s.nodes}",
                        f"--ntasks-per-node={s.ranks_per_node}", f"--time={cfg.slurm.time}",
                        f"--output={run_dir}/slurm-%j.out",
                        export + (f",OMP_NUM_THREADS={cfg.threads}" if cfg.threads > 0 else "")]
                if cfg.slurm.gpus:
                    opts.append(f"--gpus-per-node={s.ranks_per_node}")
                run_dir.mkdir(parents=True, exist_ok=True)
                job = _sbatch([*opts, *cfg.slurm.options, str(script), *run.overrides])
                sd.add_attempt(run.name, kind="train", backend="slurm", job_id=job)
                outcome[run.name] = f"submitted job {job}"
                if cfg.stage == "all" and cfg.evaluation.enabled:
                    outcome[run.name] += f", evaluation job {submit_eval(cfg, sd, run.name, argv, after=job)}"
    return outcome


# ---- the command ----------------------------------------------------------------------------------

def sweep(cfg: SweepConfig, argv: list[str] = ()) -> dict[str, str]:
    """Print the plan; unless ``dry_run``, register the sweep directory and run the backend.
    ``argv``: the command line's overrides (repeated by the Slurm evaluation jobs). Returns run ->
    outcome (empty for a dry run)."""
    check(cfg)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    vocab, note = plan_vocab(cfg)
    runs = make_plan(cfg, vocab)
    print(format_plan(cfg, runs, vocab, note), flush=True)
    if cfg.dry_run:
        return {}
    unknown = sorted(set(cfg.only) - {r.name for r in runs})
    if unknown:
        raise ValueError(f"only={cfg.only} names {unknown}; expected runs of the plan: "
                         f"{[r.name for r in runs]}")
    sd = SweepDir(Path(cfg.sweep_dir).resolve())
    sd.register(cfg, runs, vocab)
    chosen = [r for r in runs if not cfg.only or r.name in cfg.only]
    backend = submit_slurm if cfg.backend == "slurm" else lambda c, r, d, a: run_local(c, r, d)
    outcome = backend(cfg, chosen, sd, list(argv))
    print("\n" + "\n".join(f"{name}: {what}" for name, what in outcome.items()), flush=True)
    if cfg.backend != "slurm" and cfg.stage != "train" and cfg.report_dir and all(
            finished(sd.run_dir(r.name)) for r in runs):
        report(cfg, sd, argv, t0, load0)
    else:
        print(f"\nresults: python -m newtonlm.eval.scaling {sd.path}", flush=True)
    return outcome


def report(cfg: SweepConfig, sd: SweepDir, argv: list[str], t0: float, load0: float) -> None:
    """The scaling analysis of a completed local sweep into ``report_dir``, with this command, the
    machine and the invocation's run time; a failure is printed, not raised (the runs are done)."""
    from ..machine import machine_info, machine_line
    from . import scaling

    command = shlex.join(["python", "-m", "newtonlm.eval.sweep", *argv])
    note = (f"Machine: {machine_line(machine_info(), load_at_start=load0)}. This command took "
            f"{(time.perf_counter() - t0) / 60:.1f} min (training and evaluating the runs it ran, then "
            "this analysis).")
    try:
        scaling.write(sd.path, Path(cfg.report_dir).resolve(), command, note=note)
    except (ValueError, RuntimeError) as err:
        print(f"scaling report not written: {err}", file=sys.stderr, flush=True)


def compose(overrides: list[str]) -> SweepConfig:
    """``configs/eval/sweep.yaml`` (``sweep=<name>`` picks ``configs/sweep/<name>.yaml``) with Hydra
    overrides, as a checked SweepConfig. Composed and released before anything runs, so that the
    sweep's own Hydra compositions (data configs, evaluation) can initialize Hydra again."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(hydra_compose("eval/sweep", overrides=list(overrides)))
    check(cfg)
    return cfg


def main(argv: list[str] | None = None) -> None:
    """The command. ``--dry-run`` is the override ``dry_run=true``; ``--cfg`` prints the composed
    config; exit status 1 when a run's training or evaluation failed, 2 for a configuration error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return
    overrides = ["dry_run=true" if a == "--dry-run" else a for a in args if a != "--cfg"]
    bad = [a for a in overrides if a.startswith("-")]
    try:
        if bad:
            raise ValueError(f"unknown option(s) {bad}; expected --dry-run, --cfg, --help or key=value "
                             "overrides")
        cfg = compose(overrides)
        if "--cfg" in args:
            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            return
        outcome = sweep(cfg, overrides)
    except (ValueError, RuntimeError, HydraException, OmegaConfBaseException) as err:  # sbatch: RuntimeError
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if any("failed" in v for v in outcome.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
