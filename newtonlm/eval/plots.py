"""PNG figures of the evaluation commands (matplotlib, headless Agg backend).

Scaling comparison: each function takes the comparison's rows (``compare.summarize`` output: one
dict per run with ``arch``, ``size``, ``parameters``, ``val_curve`` [(tokens, val_loss)], ``eval``
and ``long``, the
perplexity results at the training length and at several times it) and writes one figure.
Colours mark the architecture, line styles / markers the size. Synthetic suite:
:func:`accuracy_vs_length`. Scaling laws (``newtonlm.eval.scaling``): :func:`scaling_fit`. Cost
against context length (``newtonlm.models.bench --json`` reports): :func:`context_cost`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

COLORS = {"paragru": "tab:blue", "paralstm": "tab:green", "llama": "tab:red", "mamba2": "tab:purple"}
STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D"]


def _style(rows: list[dict]):
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    return lambda r: (COLORS.get(r["arch"], "black"), STYLES[sizes.index(r["size"]) % len(STYLES)],
                      MARKERS[sizes.index(r["size"]) % len(MARKERS)])


def val_loss_vs_tokens(rows: list[dict], path: Path) -> None:
    """Validation loss (the trainer's periodic validation) against training tokens, one line a run."""
    style = _style(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["val_curve"]:
            color, ls, marker = style(r)
            tokens, loss = zip(*r["val_curve"])
            ax.plot(tokens, loss, ls, color=color, marker=marker, ms=3, label=f"{r['arch']} {r['size']}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ppl_vs_params(rows: list[dict], path: Path) -> None:
    """Held-out perplexity at the training length against non-embedding parameters, one line an
    architecture through its sizes."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arch in dict.fromkeys(r["arch"] for r in rows):
        pts = sorted((r["parameters"]["non_embedding"], r["eval"]["ppl"]) for r in rows if r["arch"] == arch)
        ax.plot(*zip(*pts), "-o", color=COLORS.get(arch, "black"), label=arch)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("held-out perplexity (sequences of the training length)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ppl_vs_position(rows: list[dict], path: Path) -> None:
    """Perplexity by position in sequences of several times the training length (binned curve of
    the long evaluation, each bin at its geometric middle), with the training length marked."""
    style = _style(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    context = None
    for r in rows:
        color, ls, marker = style(r)
        bins = [b for b in r["long"]["curve"] if b["tokens"]]
        mids = [((b["start"] + 1) * b["end"]) ** 0.5 for b in bins]  # geometric middle, in context tokens
        ax.plot(mids, [b["ppl"] for b in bins], ls, color=color, marker=marker, ms=3,
                label=f"{r['arch']} {r['size']}")
        context = r["long"]["context"]
    if context:
        ax.axvline(context, color="gray", lw=1)
        ax.text(context, ax.get_ylim()[0], "training length ", ha="right", va="bottom", fontsize=8,
                color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("tokens of context (position in the sequence + 1)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(rows: list[dict], out_dir: Path) -> list[Path]:
    """The three figures into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ("val_loss_vs_tokens.png", "ppl_vs_params.png", "ppl_vs_position.png")
    paths = [out_dir / n for n in names]
    for fn, p in zip((val_loss_vs_tokens, ppl_vs_params, ppl_vs_position), paths):
        fn(rows, p)
    return paths


def accuracy_vs_length(rows: list[dict], max_train_len: int, path: Path) -> None:
    """Synthetic suite: accuracy against evaluation length, one panel per task, one line per
    architecture (rows: ``{task, arch, eval: [{length, acc}]}``), the longest training length marked."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cols = min(2, len(tasks))
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for r in (r for r in rows if r["task"] == task):
            lengths = [e["length"] for e in r["eval"]]
            ax.plot(lengths, [e["acc"] for e in r["eval"]], "-o", ms=3, color=COLORS.get(r["arch"], "black"),
                    label=r["arch"])
        ax.axvline(max_train_len, color="gray", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scaling_fit(points: dict, unfinished: list, curves: dict, crossings: list, xlabel: str,
                path: Path) -> None:
    """Scaling laws: loss against compute or parameters (log x), each architecture's finished runs
    (``points``: arch -> {x, y}) as filled markers, unfinished ones (``unfinished``: (arch, x, loss))
    hollow, its fitted curve with the 95% bootstrap band (``curves``: arch -> {x, y, band [2, n] or
    None}) and the crossings of the curves as dotted vertical lines."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arch, p in points.items():
        color = COLORS.get(arch, "black")
        ax.plot(p["x"], p["y"], "o", color=color, label=arch)
        if arch in curves:
            c = curves[arch]
            ax.plot(c["x"], c["y"], "-", color=color, lw=1)
            if c["band"] is not None:
                ax.fill_between(c["x"], c["band"][0], c["band"][1], color=color, alpha=0.15, lw=0)
    for arch, x, loss in unfinished:
        ax.plot([x], [loss], "o", mfc="none", color=COLORS.get(arch, "black"))
    for x in crossings:
        ax.axvline(x, color="gray", lw=1, ls=":")
    if unfinished:
        ax.plot([], [], "o", mfc="none", color="gray", label="unfinished (not fitted)")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # no finished run yet: no legend
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def context_cost(reports: list[dict], out_dir: Path) -> list[Path]:
    """Cost against context length from the ``--json`` reports of ``python -m newtonlm.models.bench``
    (training and/or ``--generation``; rows as in ``bench.training_row`` / ``bench.generation_row``):
    training tokens/s and peak memory against T, generation time per token and cache memory against
    the context, one line per architecture (colour) and size (line style), log-log axes. Points that
    did not fit are left out and named in the legend. Also ``python -m newtonlm.eval.plots context
    OUT_DIR JSON...``. Returns the paths written (two per kind of report)."""
    panels = {"training": ("T", "training sequence length T (tokens)",
                           [("tokens_per_s", "training tokens/s (fwd + bwd)", "training_tokens_per_s"),
                            ("peak_mem_mb", "peak memory growth per step (MB)", "training_memory")]),
              "generation": ("context", "context length (tokens)",
                             [("ms_per_token", "time per generated token (ms)", "generation_ms_per_token"),
                              ("cache_mb", "cache size after the prefill (MB)", "generation_cache")])}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, (xkey, xlabel, figures) in panels.items():
        mine = [rep for rep in reports if rep.get("kind", "training") == kind]
        rows = [r for rep in mine for r in rep["rows"]]
        if not rows:
            continue
        style = _style(rows)
        device = ", ".join(dict.fromkeys(rep.get("device", "cpu") for rep in mine))
        for key, ylabel, name in figures:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for arch, size in dict.fromkeys((r["arch"], r["size"]) for r in rows):
                line = [r for r in rows if (r["arch"], r["size"]) == (arch, size)]
                color, ls, marker = style(line[0])
                pts = sorted((r[xkey], r[key]) for r in line if r.get("fits", True))
                missing = ", ".join(str(r[xkey]) for r in line if not r.get("fits", True))
                label = f"{arch} {size}" + (f" (does not fit: {missing})" if missing else "")
                ax.plot(*zip(*pts) if pts else ([], []), ls, color=color, marker=marker, ms=4, label=label)
            ax.set_xscale("log", base=2)
            xs = sorted({r[xkey] for r in rows})
            ax.set_xticks(xs, [str(x) for x in xs], minor=False)
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.set_yscale("log")  # plain numbers at 1, 2, 5 x 10^k, not 6 x 10^0
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{kind}, {device}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            paths.append(out_dir / f"{name}.png")
            fig.savefig(paths[-1], dpi=120)
            plt.close(fig)
    return paths


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m newtonlm.eval.plots",
                                     description="Figures from saved results.")
    parser.add_argument("what", choices=["context"], help="context: models.bench --json reports")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("reports", type=Path, nargs="+", help="JSON files written by the command")
    args = parser.parse_args()
    for p in args.reports:
        if not p.is_file():
            parser.error(f"{p}: no such file; expected the --json output of python -m newtonlm.models.bench")
    for p in context_cost([json.loads(p.read_text()) for p in args.reports], args.out_dir):
        print(p)
