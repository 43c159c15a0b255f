"""State-tracking probe: ``python -m newtonlm.eval.synthetic.probe [hydra overrides]``.

Trains every task x variant x seed (a variant: an architecture plus model overrides, e.g. ParaGRU
with ``a_max=0.9`` and one block) with the suite's trainer (:func:`train.train_model`, a length
curriculum allowed) and measures the whole-sequence accuracy (every position right) at lengths up
to 8x the longest training length. Writes ``results.json`` (one row per run, rewritten after every
run so an interrupted probe keeps what it finished), ``results.md`` (mean and range over seeds,
seeds that solve the longest length) and ``seq_acc_vs_length.png`` into ``out_dir``. Config:
``configs/eval/state_tracking.yaml`` (schema :class:`ProbeConfig`); the analysis of the results:
``docs/results/state_tracking/README.md``.
"""

from __future__ import annotations

import json
import os
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
from ..sizes import SizeConfig, model_fields, parameter_count
from .tasks import TASKS, TaskConfig, vocab_size
from .train import TrainSettings, evaluate, train_model

SOLVED = 0.99  # whole-sequence accuracy at which a run counts as solving a length


@dataclass
class Variant:
    """``name`` (the row label), ``arch`` (one of ``newtonlm.models.ARCHS``) and ``overrides``
    (``field=value``, applied after the size's own overrides for ``arch``)."""

    name: str = "paragru"
    arch: str = "paragru"
    overrides: list[str] = field(default_factory=list)


@dataclass
class ProbeConfig:
    """``tasks`` x ``variants`` x ``seeds``; ``task``: the tasks' parameters; ``model``: the base size
    (preset + per-architecture overrides) that every variant starts from; ``train``: TrainSettings;
    ``eval_lengths`` and ``eval_samples`` sequences per length; ``threads`` (torch threads, 0:
    default); ``max_minutes`` (0: none): start no run after this much wall time (seeds run in the
    outer loop, so a stopped probe has every task x variant for its first seeds); results in
    ``out_dir``."""

    name: str = "state_tracking"
    tasks: list[str] = field(default_factory=lambda: ["parity", "modcount"])
    variants: list[Variant] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    task: TaskConfig = field(default_factory=TaskConfig)
    model: SizeConfig = field(default_factory=SizeConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval_lengths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    eval_samples: int = 256
    threads: int = 1
    max_minutes: float = 0.0
    out_dir: str = "docs/results/${name}"


ConfigStore.instance().store(name="probe_schema", node=ProbeConfig)


def variant_size(base: SizeConfig, v: Variant) -> SizeConfig:
    """``base`` with the variant's overrides appended to its architecture's."""
    overrides = {k: list(vals) for k, vals in base.overrides.items()}
    overrides[v.arch] = [*overrides.get(v.arch, []), *v.overrides]
    return SizeConfig(preset=base.preset, overrides=overrides)


def check(cfg: ProbeConfig) -> None:
    """Raise ValueError naming the first bad field of ``cfg``; every variant's model is built on the
    meta device first, so a bad override fails before any training."""
    bad = [t for t in cfg.tasks if t not in TASKS]
    if bad or not cfg.tasks:
        raise ValueError(f"tasks={cfg.tasks}; expected a non-empty list of names from {TASKS}")
    if not cfg.variants:
        raise ValueError("variants is empty; expected at least one {name, arch, overrides}")
    for v in cfg.variants:
        if v.arch not in ARCHS:
            raise ValueError(f"variant {v.name!r}: arch={v.arch!r}; expected one of {ARCHS}")
    names = [v.name for v in cfg.variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names {names} repeat; expected distinct names")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds={cfg.seeds}; expected a non-empty list of distinct seeds")
    if not cfg.eval_lengths or min(cfg.eval_lengths) < 1 or cfg.eval_samples < 1:
        raise ValueError(f"eval_lengths={cfg.eval_lengths}, eval_samples={cfg.eval_samples}; expected "
                         "positive lengths and samples")
    for v in cfg.variants:
        try:
            fields = model_fields(variant_size(cfg.model, v), v.arch)
            parameter_count(fields, vocab_size(cfg.tasks[0], cfg.task))
        except ValueError as e:
            raise ValueError(f"variant {v.name!r}: {e}") from e


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (task, variant) over its seeds: per length the mean, min and max of
    ``seq_acc`` and the mean ``acc``; ``solved``: seeds whose whole-sequence accuracy at the longest
    length is at least :data:`SOLVED`; ``seeds``; mean ``final_loss``, ``seconds`` and
    ``parameters``; ``nonfinite``: runs with a NaN or inf training loss (their accuracy is 0, not a
    measurement of the architecture)."""
    out = []
    for key in dict.fromkeys((r["task"], r["variant"]) for r in rows):
        runs = [r for r in rows if (r["task"], r["variant"]) == key]
        lengths = [e["length"] for e in runs[0]["eval"]]
        per_len = []
        for i, L in enumerate(lengths):
            seq = [r["eval"][i]["seq_acc"] for r in runs]
            per_len.append({"length": L, "seq_acc": sum(seq) / len(seq), "seq_min": min(seq),
                            "seq_max": max(seq), "acc": sum(r["eval"][i]["acc"] for r in runs) / len(runs)})
        longest = max(range(len(lengths)), key=lambda i: lengths[i])
        n = len(runs)
        out.append({"task": key[0], "variant": key[1], "arch": runs[0]["arch"], "seeds": n,
                    "parameters": runs[0]["parameters"],
                    "final_loss": sum(r["final_loss"] for r in runs) / n,
                    "seconds": sum(r["seconds"] for r in runs) / n,
                    "solved": sum(r["eval"][longest]["seq_acc"] >= SOLVED for r in runs),
                    "nonfinite": sum(r.get("nonfinite_steps", 0) > 0 for r in runs),
                    "eval": per_len})
    return out


def run_probe(cfg: ProbeConfig, out: Path | None = None) -> list[dict]:
    """Every seed x task x variant (seeds outermost): one row ``{task, variant, arch, seed,
    parameters, final_loss, nonfinite_steps, seconds, eval: [evaluate(...) per length]}``, in the
    order task, variant, seed; with ``out``, ``out/results.json`` is rewritten after every run.
    Stops starting runs after ``cfg.max_minutes`` (when > 0)."""
    check(cfg)
    if cfg.max_minutes < 0:
        raise ValueError(f"max_minutes={cfg.max_minutes}; expected >= 0 (0: no limit)")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rows, t0 = [], time.perf_counter()
    order = {(t, v.name): i for i, (t, v) in enumerate((t, v) for t in cfg.tasks for v in cfg.variants)}
    for seed in cfg.seeds:
        for task in cfg.tasks:
            for v in cfg.variants:
                if cfg.max_minutes and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                    print(f"[probe] max_minutes={cfg.max_minutes} reached: stopping before {task} "
                          f"{v.name} seed {seed}", flush=True)
                    return rows
                model, info = train_model(task, cfg.task, v.arch, variant_size(cfg.model, v), cfg.train, seed)
                evals = [evaluate(model, task, cfg.task, L, cfg.eval_samples, seed) for L in cfg.eval_lengths]
                rows.append({"task": task, "variant": v.name, "arch": v.arch, "seed": seed, **info,
                             "eval": evals})
                rows.sort(key=lambda r: (order[r["task"], r["variant"]], r["seed"]))
                seq = "  ".join(f"{e['length']}: {e['seq_acc']:.2f}" for e in evals)
                print(f"[probe] {task:<9} {v.name:<18} seed {seed}  loss {info['final_loss']:.4f}  "
                      f"{info['seconds']:.0f} s  whole-sequence acc  {seq}", flush=True)
                if out is not None:
                    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def markdown(rows: list[dict], cfg: ProbeConfig, command: str, machine: str, seconds: float) -> str:
    t, lengths = cfg.train, cfg.eval_lengths
    head = " | ".join(f"{L} ({L / t.max_len:g}x)" for L in lengths)
    variants = {v.name: v for v in cfg.variants}
    curriculum = (f", the longest length growing linearly from {t.min_len} to {t.max_len} over the "
                  f"first {t.curriculum_steps} steps" if t.curriculum_steps else "")
    planned = len(cfg.tasks) * len(cfg.variants) * len(cfg.seeds)
    budget = (f" (runs started within max_minutes={cfg.max_minutes:g}: {len(rows)} of {planned} runs)"
              if cfg.max_minutes else "")
    lines = [
        f"# State-tracking probe `{cfg.name}`", "", "Produced by (from the repository root):", "",
        "```bash", command, "```", "",
        f"Machine: {machine}. Total {seconds / 60:.1f} min{budget}.", "",
        f"Training: {t.steps} steps of {t.batch_size} sequences, lengths uniform in [{t.min_len}, "
        f"{t.max_len}]{curriculum}; AdamW lr {t.lr}, warmup {t.warmup_steps}, cosine to 0.1 x lr. "
        f"Seeds {list(cfg.seeds)} (model init and data). Each cell: whole-sequence accuracy (every "
        f"position right) over {cfg.eval_samples} fresh sequences, mean over seeds [min-max]; "
        f"'solved': seeds with whole-sequence accuracy >= {SOLVED} at {max(lengths)}; 'NaN runs': seeds "
        "whose training loss became NaN or inf (scored 0, not a measurement). Base model "
        f"overrides: `{dict(cfg.model.overrides)}` (preset `{cfg.model.preset}`).", "",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        title = f"{task} (mod {cfg.task.modulus})" if task == "modcount" else task
        lines += [f"## {title}", "",
                  f"| variant | overrides | parameters | train loss | {head} | solved | NaN runs |",
                  "|---|---|---:|---:|" + "---:|" * len(lengths) + "---:|---:|"]
        for s in (s for s in summarize(rows) if s["task"] == task):
            ov = ", ".join(variants[s["variant"]].overrides) if s["variant"] in variants else ""
            cells = " | ".join(f"{e['seq_acc']:.2f} [{e['seq_min']:.2f}-{e['seq_max']:.2f}]"
                               for e in s["eval"])
            lines.append(f"| {s['variant']} | `{ov}` | {s['parameters']:,} | {s['final_loss']:.4f} | {cells} "
                         f"| {s['solved']}/{s['seeds']} | {s['nonfinite']} |")
        lines.append("")
    lines += ["![whole-sequence accuracy against length](seq_acc_vs_length.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], max_train_len: int, path: Path) -> None:
    """Whole-sequence accuracy against length, one panel per task, one line per variant (mean over
    seeds, the seeds' range shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab20")
    names = list(dict.fromkeys(s["variant"] for s in summary))
    for ax, task in zip(axes.flat, tasks):
        for s in (s for s in summary if s["task"] == task):
            color = cmap(names.index(s["variant"]) % 20)
            x = [e["length"] for e in s["eval"]]
            ax.plot(x, [e["seq_acc"] for e in s["eval"]], "-o", ms=3, color=color, label=s["variant"])
            ax.fill_between(x, [e["seq_min"] for e in s["eval"]], [e["seq_max"] for e in s["eval"]],
                            color=color, alpha=0.12)
        ax.axvline(max_train_len, color="gray", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.set_xlabel("sequence length (gray: longest training length)")
        ax.set_ylabel("whole-sequence accuracy")
        ax.grid(alpha=0.3)
    axes.flat[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@hydra.main(config_path=str(CONFIG_DIR / "eval"), config_name="state_tracking", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cfg = OmegaConf.to_object(cfg)
    env = ["NEWTONLM_NO_CEXT=1"] if os.environ.get("NEWTONLM_NO_CEXT") == "1" else []  # the cell kernels used
    command = shlex.join([*env, "python", "-m", "newtonlm.eval.synthetic.probe", *sys.argv[1:]])
    t0 = time.perf_counter()
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = run_probe(cfg, out)
    plot(rows, cfg.train.max_len, out / "seq_acc_vs_length.png")
    md = markdown(rows, cfg, command, machine_line(machine_info()), time.perf_counter() - t0)
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
