"""The synthetic suite: ``python -m newtonlm.eval.synthetic [hydra overrides]``.

Trains one model per task x architecture (``train.py``) at lengths ``train.min_len..max_len`` and
evaluates it at every length of ``eval_lengths`` (those above ``max_len`` measure length
generalization). Writes ``results.json``, ``results.md`` (tables of accuracy by length, with the
command and the machine) and ``accuracy_vs_length.png`` into ``out_dir``. Config:
``configs/eval/synthetic.yaml`` (schema :class:`SyntheticConfig`).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ...machine import machine_info, machine_line
from ...models import ARCHS
from ...paths import CONFIG_DIR
from ..plots import accuracy_vs_length
from ..sizes import SizeConfig
from .tasks import TASKS, TaskConfig
from .train import TrainSettings, evaluate, train_model


@dataclass
class SyntheticConfig:
    """``tasks`` x ``archs`` to run; ``task``: the tasks' parameters; ``model``: the size (preset +
    per-architecture overrides); ``train``: TrainSettings; ``eval_lengths`` and ``eval_samples``
    sequences per length; ``seed``; ``threads`` (torch threads, 0: default); results in ``out_dir``."""

    name: str = "cpu"
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    task: TaskConfig = field(default_factory=TaskConfig)
    model: SizeConfig = field(default_factory=SizeConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval_lengths: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    eval_samples: int = 256
    seed: int = 0
    threads: int = 1
    out_dir: str = "docs/results/synthetic_${name}"


ConfigStore.instance().store(name="synthetic_schema", node=SyntheticConfig)


def run_suite(cfg: SyntheticConfig) -> list[dict]:
    """Train and evaluate every task x architecture; returns one row per pair."""
    for name, values, allowed in (("tasks", cfg.tasks, TASKS), ("archs", cfg.archs, ARCHS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name} contains {bad}; expected names from {allowed}")
    if not cfg.eval_lengths or min(cfg.eval_lengths) < 1 or cfg.eval_samples < 1:
        raise ValueError(f"eval_lengths={cfg.eval_lengths}, eval_samples={cfg.eval_samples}; expected "
                         "positive lengths and samples")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rows = []
    for task in cfg.tasks:
        for arch in cfg.archs:
            model, info = train_model(task, cfg.task, arch, cfg.model, cfg.train, cfg.seed)
            evals = [evaluate(model, task, cfg.task, L, cfg.eval_samples, cfg.seed) for L in cfg.eval_lengths]
            rows.append({"task": task, "arch": arch, **info, "eval": evals})
            accs = "  ".join(f"{e['length']}: {e['acc']:.3f}" for e in evals)
            print(f"[synthetic] {task:<15} {arch:<9} loss {info['final_loss']:.4f}  "
                  f"{info['seconds']:.0f} s  acc  {accs}", flush=True)
    return rows


def markdown(rows: list[dict], cfg: SyntheticConfig, command: str, machine: str, seconds: float) -> str:
    lengths = cfg.eval_lengths
    head = " | ".join(f"{L}" + (" (beyond)" if L > cfg.train.max_len else "") for L in lengths)
    t = cfg.train
    lines = [
        f"# Synthetic suite `{cfg.name}`", "", "Produced by (from the repository root):", "",
        "```bash", command, "```", "",
        f"Machine: {machine}. Total {seconds / 60:.1f} min.", "",
        f"Training: {t.steps} steps of {t.batch_size} sequences, lengths uniform in [{t.min_len}, "
        f"{t.max_len}], AdamW lr {t.lr}. Accuracy over the scored positions of {cfg.eval_samples} fresh "
        "sequences per length; in brackets the whole-sequence accuracy (every scored position right). "
        "Lengths marked beyond were never seen in training.", "",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [f"## {task}", "", f"| arch | parameters | train loss | {head} |",
                  "|---|---:|---:|" + "---:|" * len(lengths)]
        for r in (r for r in rows if r["task"] == task):
            cells = " | ".join(f"{e['acc']:.3f} ({e['seq_acc']:.2f})" for e in r["eval"])
            lines.append(f"| {r['arch']} | {r['parameters']:,} | {r['final_loss']:.4f} | {cells} |")
        lines.append("")
    lines += ["![accuracy against length](accuracy_vs_length.png)", ""]
    return "\n".join(lines)


@hydra.main(config_path=str(CONFIG_DIR / "eval"), config_name="synthetic", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cfg = OmegaConf.to_object(cfg)
    command = shlex.join(["python", "-m", "newtonlm.eval.synthetic", *sys.argv[1:]])
    t0 = time.perf_counter()
    rows = run_suite(cfg)
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    accuracy_vs_length(rows, cfg.train.max_len, out / "accuracy_vs_length.png")
    md = markdown(rows, cfg, command, machine_line(machine_info()), time.perf_counter() - t0)
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
