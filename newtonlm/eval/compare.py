"""Scaling comparison: train and evaluate every architecture at several sizes on the same data and
token budget, then write a markdown table and PNG plots.

    python -m newtonlm.eval.compare                      # scale=cpu: the CPU-sized default
    python -m newtonlm.eval.compare scale=cluster        # the same with cluster presets
    python -m newtonlm.eval.compare scale=smoke name=x   # a few steps (the test)

For each architecture x size the trainer runs as a subprocess (``launcher`` + Hydra overrides: the
size's preset and model overrides, then the shared ``trainer`` overrides, run directory
``<runs_dir>/<arch>_<size>``); a run whose metrics already hold the final validation is not
retrained (``rerun=true`` retrains), an interrupted one resumes. Each trained model is then
evaluated with the perplexity command's code on its held-out split twice: in sequences of the
training length (perplexity, bits per byte) and of ``eval_factor`` times it (the per-position
curve). Outputs in ``out_dir``: ``results.md`` (table, command, machine), ``results.json`` and the
figures of ``plots``. Configs: ``configs/eval/compare.yaml`` and ``configs/eval/scale/*.yaml``.

The pieces that run and evaluate one trainer run (:func:`run_trainer`, :func:`evaluate_run`,
:func:`finished`, :func:`read_metrics`, :func:`trainer_env`) are shared with ``newtonlm.eval.sweep``
(the sweep: a token-budget rule, Slurm and hostfile backends, locks) and ``newtonlm.eval.scaling``.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..machine import machine_info, machine_line
from ..models import ARCHS, count_parameters
from ..paths import CONFIG_DIR
from . import plots
from .perplexity import run as perplexity
from .sizes import SizeConfig, override_list

SRC = Path(__file__).resolve().parents[2]  # the directory holding the newtonlm package


@dataclass
class CompareConfig:
    """``name``: labels the results (``docs/results/<name>``); ``archs``; ``sizes``: label ->
    SizeConfig (in order: smallest first); ``trainer``: trainer overrides shared by every run (data,
    token budget, schedule...); ``launcher``: command prefix of the trainer (empty: this Python,
    ``-m newtonlm.training.train``); ``threads``: OMP_NUM_THREADS for the runs and the evaluation (0:
    unset); ``eval_factor``: long-evaluation length / training length; ``eval_max_tokens``: cap on
    the held-out targets (0: the whole split); ``eval_data``: data overrides of the evaluation
    (empty: each run's own held-out split); ``rerun``: retrain finished runs."""

    name: str = "cpu"
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    sizes: dict[str, SizeConfig] = field(default_factory=dict)
    trainer: list[str] = field(default_factory=list)  # not `train`: that names the trainer's config group
    launcher: list[str] = field(default_factory=list)
    runs_dir: str = "runs/compare/${name}"
    out_dir: str = "docs/results/${name}"
    threads: int = 1
    eval_factor: float = 4.0
    eval_batch_size: int = 8
    eval_max_tokens: int = 0
    eval_data: list[str] = field(default_factory=list)
    rerun: bool = False


ConfigStore.instance().store(name="compare_schema", node=CompareConfig)


def run_overrides(cfg: CompareConfig, arch: str, size: str, run_dir: Path) -> list[str]:
    """The trainer's Hydra overrides for one run."""
    spec = cfg.sizes[size]
    model = [f"model.{o}" for o in override_list(spec, arch)]
    return [f"model={arch}_{spec.preset}", *model, *cfg.trainer, f"hydra.run.dir={run_dir}"]


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (empty if there is none yet); a line cut short by a
    crash is skipped, as the trainer itself does on resume."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def finished(run_dir: Path) -> bool:
    """The run's metrics hold its final validation (the trainer writes it last)."""
    return any(r.get("kind") == "val" and r.get("final") for r in read_metrics(run_dir))


def trainer_env(threads: int) -> dict:
    """Environment of the trainer subprocesses: this checkout first on PYTHONPATH, and
    ``OMP_NUM_THREADS=threads`` (0: inherited). Also sets this process's torch threads (evaluation)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    return env


def run_trainer(cmd: list[str], run_dir: Path, env: dict, label: str,
                pass_fds: tuple[int, ...] = ()) -> float:
    """Run the trainer command ``cmd`` with stdout and stderr appended to ``run_dir/train.log`` (a
    resumed run keeps the earlier attempts' output); returns seconds. A non-zero exit raises
    RuntimeError with the log's tail. ``pass_fds``: descriptors the trainer inherits (the sweep's
    run lock)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{label}] {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=pass_fds)
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training {label} failed (exit {proc.returncode}); log "
                           f"{run_dir / 'train.log'}:\n{tail}")
    return time.perf_counter() - t0


def train_run(cfg: CompareConfig, arch: str, size: str, run_dir: Path, env: dict) -> float:
    """Run the trainer for one (arch, size); returns seconds. With ``rerun`` an existing run starts
    over, else it resumes."""
    launcher = list(cfg.launcher) or [sys.executable, "-m", "newtonlm.training.train"]
    fresh = ["train.resume=none", "train.overwrite=true"] if cfg.rerun else []
    cmd = [*launcher, *run_overrides(cfg, arch, size, run_dir), *fresh]
    return run_trainer(cmd, run_dir, env, f"{arch} {size}")


def evaluate_run(run_dir: Path, data: list[str], batch_size: int, max_tokens: int, factor: float) -> dict:
    """The perplexity code on a run's held-out split (``data``: data overrides; empty: the run's own
    data config), in sequences of the training length (``short``: perplexity, bits per byte) and of
    ``factor`` times it (``long``: the per-position curve); ``max_tokens`` caps the targets (0: all).
    Returns ``{"short", "long", "step"}`` and writes it to ``run_dir/eval.json`` (``step``: the run's
    last training step, i.e. which checkpoint was scored)."""
    common = dict(overrides=list(data), batch_size=batch_size, max_tokens=max_tokens or None)
    short = perplexity(run_dir, eval_factor=1.0, **common)
    long = perplexity(run_dir, eval_factor=factor, **common)
    steps = [r["step"] for r in read_metrics(run_dir) if r.get("kind") == "train"]
    result = {"short": short, "long": long, "step": steps[-1] if steps else None}
    (run_dir / "eval.json").write_text(json.dumps(result))
    return result


def summarize(arch: str, size: str, run_dir: Path, short: dict, long: dict,
              train_seconds: float | None) -> dict:
    """One row: parameters, tokens, throughput and the validation curve from the run's metrics,
    plus the two perplexity evaluations."""
    from newtonlm.eval.loading import load_run

    model = load_run(run_dir)[0]
    recs = read_metrics(run_dir)
    train = [r for r in recs if r.get("kind") == "train"]
    val = [r for r in recs if r.get("kind") == "val"]
    speeds = [r["tokens_per_s"] for r in train[2:] or train if r.get("tokens_per_s")]
    return {
        "arch": arch, "size": size, "run_dir": str(run_dir), "parameters": count_parameters(model),
        "tokens": train[-1]["tokens_seen"] if train else 0,
        "steps": train[-1]["step"] if train else 0,
        "train_tokens_per_s": statistics.median(speeds) if speeds else None,
        "train_seconds": train_seconds,
        # one point per step (older runs repeated the last periodic validation as the final one)
        "val_curve": sorted({r["tokens_seen"]: r["val_loss"] for r in val}.items()),
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "eval": {k: v for k, v in short.items() if not k.startswith("position_")},
        "long": {k: v for k, v in long.items() if not k.startswith("position_")},
    }


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict], cfg: CompareConfig, command: str, machine: str, seconds: float) -> str:
    T = rows[0]["eval"]["context"] if rows else 0
    L = rows[0]["long"]["eval_len"] if rows else 0
    lines = [
        f"# Scaling comparison `{cfg.name}`", "",
        "Produced by (from the repository root):", "", "```bash", command, "```", "",
        f"Machine: {machine}. This invocation took {seconds / 60:.1f} min (training included for the runs "
        "it trained).", "",
        f"Every run: the same data and token budget (trainer overrides `{' '.join(cfg.trainer)}`). "
        f"Perplexity and bits per byte: `newtonlm.eval.perplexity` on each run's held-out split in "
        f"sequences of the training length T = {T}; the last two columns: the same text in sequences "
        f"of {L} tokens, positions below T and from T on (recurrent models carry their state, "
        f"attention uses a sliding window of T). Tokens/s: median training throughput.", "",
        "| arch | size | parameters | non-embedding | tokens | val ppl | bits/byte | "
        f"ppl pos < {T} | ppl pos {T}-{L - 1} | train tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e, lg = r["eval"], r["long"]
        lines.append(
            f"| {r['arch']} | {r['size']} | {r['parameters']['total']:,} | "
            f"{r['parameters']['non_embedding']:,} | {r['tokens']:,} | {e['ppl']:.2f} | "
            f"{e['bits_per_byte']:.4f} | {_fmt(lg['in_context']['ppl'], '.2f')} | "
            f"{_fmt(lg['beyond_context']['ppl'], '.2f')} | {_fmt(r['train_tokens_per_s'], ',.0f')} |")
    lines += ["", "![validation loss against tokens](val_loss_vs_tokens.png)", "",
              "![perplexity against parameters](ppl_vs_params.png)", "",
              "![perplexity against position](ppl_vs_position.png)", ""]
    return "\n".join(lines)


def compare(cfg: CompareConfig, command: str) -> list[dict]:
    for arch in cfg.archs:
        if arch not in ARCHS:
            raise ValueError(f"archs contains {arch!r}; expected names from {ARCHS}")
    if not cfg.sizes:
        raise ValueError("sizes is empty; expected at least one size (label: {preset, overrides})")
    if not cfg.eval_factor >= 1:
        raise ValueError(f"eval_factor={cfg.eval_factor}; expected >= 1 (a multiple of the training length)")
    env = trainer_env(cfg.threads)
    runs_dir, out_dir = Path(cfg.runs_dir).resolve(), Path(cfg.out_dir).resolve()
    t0, load0, rows = time.perf_counter(), os.getloadavg()[0], []
    for size in cfg.sizes:
        for arch in cfg.archs:
            run_dir = runs_dir / f"{arch}_{size}"
            seconds = None
            if cfg.rerun or not finished(run_dir):
                seconds = train_run(cfg, arch, size, run_dir, env)
            ev = evaluate_run(run_dir, cfg.eval_data, cfg.eval_batch_size, cfg.eval_max_tokens,
                              cfg.eval_factor)
            rows.append(summarize(arch, size, run_dir, ev["short"], ev["long"], seconds))
            print(f"[compare] {arch} {size}: val ppl {ev['short']['ppl']:.2f}, bits/byte "
                  f"{ev['short']['bits_per_byte']:.4f}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots.write_all(rows, out_dir)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    # torch threads of this process = those of the runs (both from cfg.threads, or both the default)
    machine = machine_line(machine_info(), load_at_start=load0)
    md = markdown(rows, cfg, command, machine, time.perf_counter() - t0)
    (out_dir / "results.md").write_text(md)
    print(md)
    return rows


@hydra.main(config_path=str(CONFIG_DIR / "eval"), config_name="compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    command = shlex.join(["python", "-m", "newtonlm.eval.compare", *sys.argv[1:]])
    compare(OmegaConf.to_object(cfg), command)


if __name__ == "__main__":
    main()
