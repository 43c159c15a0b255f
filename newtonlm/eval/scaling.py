"""Scaling laws from a sweep: ``python -m newtonlm.eval.scaling SWEEP_DIR [--out DIR]``.

Reads every run directory of ``SWEEP_DIR`` (``python -m newtonlm.eval.sweep`` output, or any folder
of trainer run directories such as ``runs/compare/cpu``): the final validation loss (an unfinished run:
its last validation, marked unfinished and left out of the fits), perplexity, bits per byte (from the
sweep's evaluation, ``eval.json``), tokens, FLOPs and training time. Per architecture it fits the
saturating power law

    L(x) = E + A * x^(-alpha)

to the finished runs' loss against compute (x = FLOPs = ``newtonlm.models.flops_per_token`` x
tokens) and against parameters (x = the parameters the sweep's budget counts), by least squares
(``scipy.optimize.curve_fit``), with 95% percentile intervals from a bootstrap over the runs, and
finds the compute at which one architecture's fitted curve crosses another's. Writes ``scaling.md``,
``scaling.json``, ``loss_vs_flops.png`` and ``loss_vs_params.png`` into ``--out`` (default
``SWEEP_DIR/scaling``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .compare import read_metrics

CONFIDENCE = (2.5, 97.5)  # percentiles of the bootstrap intervals


# ---- reading runs ---------------------------------------------------------------------------------

@dataclass
class RunResult:
    """One run directory. ``status``: finished, unfinished or not started. The loss is the final
    validation's (``val_loss``; unfinished: the last validation, at ``tokens``); ``eval_loss`` and
    ``bits_per_byte``: the sweep's evaluation of the held-out split (None without one);
    ``flops = flops_per_token x tokens``; ``train_seconds``: the logged steps' ``step_time_s``, each
    times the steps since the previous record (start-up, validation and checkpoints excluded)."""

    name: str
    arch: str | None
    status: str
    step: int = 0
    tokens: int = 0
    tokens_trained: int = 0
    planned_tokens: int | None = None
    parameters: dict | None = None
    vocab_size: int | None = None
    flops_per_token: float | None = None
    flops: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    eval_loss: float | None = None
    bits_per_byte: float | None = None
    train_seconds: float | None = None


def _vocab(run_dir: Path, plan: dict) -> int | None:
    """The model's vocabulary: from the run's saved tokenizer (as the trainer sizes it), else the
    sweep's plan."""
    if (run_dir / "tokenizer").is_dir():
        from newtonlm.data import vocab_size_for_model
        from newtonlm.export import read_tokenizer

        return vocab_size_for_model(read_tokenizer(run_dir))
    return plan.get("vocab_size")


def read_run(run_dir: Path, plan: dict | None = None) -> RunResult:
    """A :class:`RunResult` from ``config.yaml``, ``metrics.jsonl``, ``tokenizer/`` and ``eval.json``
    of a trainer run directory; ``plan``: its entry in the sweep's plan (vocabulary, planned tokens)."""
    from newtonlm.export import read_run_config
    from newtonlm.models import flops_per_token

    from .sizes import parameter_count

    plan = plan or {}
    cfg = read_run_config(run_dir)
    recs = read_metrics(run_dir)
    train = [r for r in recs if r.get("kind") == "train"]
    val = [r for r in recs if r.get("kind") == "val" and r.get("val_loss") is not None]
    done = any(r.get("final") for r in val)
    out = RunResult(run_dir.name, cfg["model"]["arch"], "finished" if done else "unfinished",
                    planned_tokens=plan.get("tokens"))
    if train:
        out.step, out.tokens_trained = train[-1]["step"], train[-1]["tokens_seen"]
        prev, seconds = 0, 0.0
        for r in train:
            seconds += (r.get("step_time_s") or 0.0) * (r["step"] - prev)
            prev = r["step"]
        out.train_seconds = seconds
    if val:
        last = next(r for r in reversed(val) if r.get("final")) if done else val[-1]
        out.val_loss, out.tokens = last["val_loss"], last["tokens_seen"]
        out.val_ppl = math.exp(min(out.val_loss, 700.0))
    if not done:
        planned = f" of {out.planned_tokens:,}" if out.planned_tokens else ""
        out.status = f"unfinished (step {out.step}, {out.tokens_trained:,}{planned} tokens)"
    out.vocab_size = _vocab(run_dir, plan)
    if out.vocab_size:
        out.parameters = parameter_count(cfg["model"], out.vocab_size)
        out.flops_per_token = flops_per_token(cfg["model"], out.vocab_size, int(cfg["train"]["seq_len"]))
        out.flops = out.flops_per_token * out.tokens
    ev_path = run_dir / "eval.json"
    if done and ev_path.is_file():
        ev = json.loads(ev_path.read_text())
        if ev.get("step", out.step) == out.step:  # an evaluation of this (final) checkpoint
            out.eval_loss, out.bits_per_byte = ev["short"]["loss"], ev["short"]["bits_per_byte"]
    return out


def read_sweep(sweep_dir: Path) -> tuple[list[RunResult], str]:
    """Every run of ``sweep_dir`` (directories holding a ``config.yaml``; planned runs of its
    ``sweep.json`` that have none are listed as not started), and the parameter count its budget
    used (``total`` or ``non_embedding``; ``total`` without a sweep.json)."""
    record_path = sweep_dir / "sweep.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"runs": {}}
    plans = {name: entry.get("plan", {}) for name, entry in record["runs"].items()}
    order = {name: i for i, name in enumerate(plans)}  # the sweep's order, then other folders by name
    dirs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and (d / "config.yaml").is_file()),
                  key=lambda d: (order.get(d.name, len(order)), d.name))
    runs = [read_run(d, plans.get(d.name)) for d in dirs]
    seen = {r.name for r in runs}
    runs += [RunResult(name, plan.get("arch"), "not started", planned_tokens=plan.get("tokens"))
             for name, plan in plans.items() if name not in seen]
    if not runs:
        raise ValueError(f"{sweep_dir} holds no run directory (a folder with the trainer's config.yaml)")
    return runs, record.get("budget_params", "total")


# ---- the fit --------------------------------------------------------------------------------------

@dataclass
class PowerLaw:
    """``L(x) = E + A * x^(-alpha)``."""

    E: float
    A: float
    alpha: float

    def __call__(self, x):
        return self.E + self.A * np.asarray(x, dtype=float) ** (-self.alpha)


def fit_power_law(x, y) -> PowerLaw:
    """Least-squares fit of ``y = E + A x^(-alpha)`` with ``0 <= E <= min(y)``, ``A >= 0``, ``0 <
    alpha <= 5`` (``scipy.optimize.curve_fit``, trust-region). ``x`` is scaled by its geometric mean
    for the solver; the start is the best (E, A) by linear least squares over a grid of alpha. Needs
    at least 3 distinct positive ``x``; with exactly 3 the curve interpolates them."""
    from scipy.optimize import OptimizeWarning, curve_fit

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y have shapes {x.shape} and {y.shape}; expected 1-d arrays of one length")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and (x > 0).all()):
        raise ValueError("x and y must be finite and x > 0")
    if len(np.unique(x)) < 3:
        raise ValueError(f"{len(np.unique(x))} distinct x; a fit of E, A and alpha needs at least 3")
    x0 = math.exp(np.log(x).mean())
    u, ymin = x / x0, float(y.min())
    # start: for each alpha of a grid, the least-squares E, A (E clipped to [0, min y], A refitted)
    alphas = np.geomspace(0.01, 3.0, 80)[:, None]
    v = u[None, :] ** -alphas                                           # [grid, points]
    vc = v - v.mean(axis=1, keepdims=True)
    A = (vc * (y - y.mean())).sum(axis=1) / (vc * vc).sum(axis=1)
    E = np.clip(y.mean() - A * v.mean(axis=1), 0.0, ymin)
    A = np.maximum(((y - E[:, None]) * v).sum(axis=1) / (v * v).sum(axis=1), 1e-12)
    err = ((E[:, None] + A[:, None] * v - y) ** 2).sum(axis=1)
    i = int(err.argmin())
    E, A, alpha = float(E[i]), float(A[i]), float(alphas[i, 0])
    p0 = (min(max(E, 1e-9 * ymin), ymin * (1 - 1e-9)), A, alpha)
    with warnings.catch_warnings():  # 3 points: no covariance (not used here)
        warnings.simplefilter("ignore", OptimizeWarning)
        (E, A, alpha), _ = curve_fit(lambda t, e, a, al: e + a * t ** -al, u, y, p0=p0,
                                     bounds=([0.0, 0.0, 1e-6], [ymin, np.inf, 5.0]), maxfev=20000)
    return PowerLaw(float(E), float(A) * x0 ** float(alpha), float(alpha))


def bootstrap(x, y, n: int, seed: int = 0) -> list[PowerLaw]:
    """Fits to ``n`` resamples of the points (drawn with replacement); resamples with fewer than 3
    distinct x (no fit possible) are dropped."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) >= 3:
            out.append(fit_power_law(x[idx], y[idx]))
    return out


def crossovers(f: PowerLaw, g: PowerLaw, lo: float, hi: float, grid: int = 2000) -> list[float]:
    """Every x in [lo, hi] where ``f(x) = g(x)``: sign changes of f - g on a grid in log x, each
    refined by Brent's method (``scipy.optimize.brentq``)."""
    from scipy.optimize import brentq

    def d(t):
        return float(f(math.exp(t)) - g(math.exp(t)))

    ts = np.linspace(math.log(lo), math.log(hi), grid)
    vals = f(np.exp(ts)) - g(np.exp(ts))
    roots = [math.exp(t) for t in ts[vals == 0.0]]
    for i in np.flatnonzero(vals[:-1] * vals[1:] < 0):
        roots.append(math.exp(brentq(d, ts[i], ts[i + 1], xtol=1e-12, rtol=1e-12)))
    return sorted(roots)


def _interval(values: list[float]) -> list[float] | None:
    return [float(v) for v in np.percentile(values, CONFIDENCE)] if values else None


def fit_all(points: dict[str, tuple[list, list]], n_boot: int, seed: int) -> dict:
    """Per architecture (name -> (x, y) of its finished runs): the fit, its bootstrap fits and the
    95% intervals of E, A and alpha; fewer than 3 distinct x: only a note."""
    out = {}
    for arch, (x, y) in points.items():
        if len(set(x)) < 3:
            out[arch] = {"points": len(x), "note": f"{len(set(x))} distinct x: at least 3 needed for a fit"}
            continue
        law = fit_power_law(x, y)
        boot = bootstrap(x, y, n_boot, seed) if len(set(x)) > 3 else []
        out[arch] = {"points": len(x), "law": law, "boot": boot, **asdict(law),
                     **{f"{k}_ci": _interval([getattr(b, k) for b in boot]) for k in ("E", "A", "alpha")},
                     "resamples": len(boot),
                     "note": "" if boot else "3 points: the curve interpolates them; no uncertainty"}
    return out


def crossover_table(fits: dict, lo: float, hi: float, measured: tuple[float, float]) -> list[dict]:
    """For each pair of fitted architectures: where their curves cross in [lo, hi], who leads below
    and above, the 95% bootstrap interval of the crossing (resample i of one paired with resample i
    of the other; the crossing nearest the fitted one) and the share of resamples that cross."""
    rows = []
    fitted = [a for a in fits if "law" in fits[a]]
    for a, b in itertools.combinations(fitted, 2):
        fa, fb = fits[a]["law"], fits[b]["law"]
        pairs = list(zip(fits[a]["boot"], fits[b]["boot"]))
        boot_roots = [crossovers(p, q, lo, hi, grid=400) for p, q in pairs]
        for root in crossovers(fa, fb, lo, hi) or [None]:
            if root is None:
                lower = a if fa(math.sqrt(lo * hi)) < fb(math.sqrt(lo * hi)) else b
                rows.append({"archs": [a, b], "x": None, "below": lower, "above": lower,
                             "share": (sum(bool(r) for r in boot_roots) / len(pairs)) if pairs else None})
                continue
            near = [min(r, key=lambda v: abs(math.log(v / root))) for r in boot_roots if r]
            below = a if fa(root / 1.01) < fb(root / 1.01) else b
            rows.append({"archs": [a, b], "x": root, "below": below, "above": b if below == a else a,
                         "ci": _interval(near), "share": len(near) / len(pairs) if pairs else None,
                         "measured": measured[0] <= root <= measured[1]})
    return rows


# ---- the analysis and its report ------------------------------------------------------------------

AXES = {"compute": ("FLOPs", "training compute C (FLOPs)"), "params": ("parameters", "parameters N")}


def analyse(runs: list[RunResult], budget_params: str, loss: str = "auto", n_boot: int = 1000,
            seed: int = 0, decades: float = 2.0) -> dict:
    """Fits against compute and parameters, crossovers searched from ``decades`` below the smallest
    to ``decades`` above the largest x measured. ``loss``: ``val`` (the trainer's final validation),
    ``eval`` (the sweep's evaluation of the held-out split) or ``auto`` (eval if every finished run
    has it)."""
    done = [r for r in runs if r.status == "finished" and r.flops is not None and r.val_loss is not None]
    if loss == "auto":
        loss = "eval" if done and all(r.eval_loss is not None for r in done) else "val"
    if loss not in ("val", "eval"):
        raise ValueError(f"loss={loss!r}; expected val, eval or auto")
    done = [r for r in done if (r.eval_loss if loss == "eval" else r.val_loss) is not None]
    out = {"loss": loss, "budget_params": budget_params, "bootstrap": n_boot, "seed": seed,
           "decades": decades}
    for axis in AXES:
        points = {}
        for r in done:
            x = r.flops if axis == "compute" else r.parameters[budget_params]
            px, py = points.setdefault(r.arch, ([], []))
            px.append(float(x))
            py.append(float(r.eval_loss if loss == "eval" else r.val_loss))
        fits = fit_all(points, n_boot, seed)
        xs = [x for px, _ in points.values() for x in px]
        measured = (min(xs), max(xs)) if xs else (1.0, 1.0)
        lo, hi = measured[0] / 10 ** decades, measured[1] * 10 ** decades
        out[axis] = {"points": {a: {"x": p[0], "y": p[1]} for a, p in points.items()}, "fits": fits,
                     "measured": measured, "search": [lo, hi],
                     "crossovers": crossover_table(fits, lo, hi, measured) if xs else []}
    return out


def _g(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def _ci(v) -> str:
    return "-" if not v else f"[{v[0]:.3g}, {v[1]:.3g}]"


def markdown(runs: list[RunResult], result: dict, command: str, note: str = "") -> str:
    loss = "evaluation loss (held-out split)" if result["loss"] == "eval" else "final validation loss"
    lines = [
        "# Scaling laws", "", "Produced by (from the repository root):", "", "```bash", command, "```", "",
        *([note, ""] if note else []),
        f"Loss: the {loss}, nats/token. Compute C = `newtonlm.models.flops_per_token` x training tokens "
        "(3 x the forward's multiply-adds x 2; embedding, norms and Newton iterations not counted). "
        f"Parameters N: {result['budget_params'].replace('_', '-')} (as the budget counts them). Fit per "
        "architecture on its finished runs: L = E + A x^(-alpha), least squares (scipy curve_fit); "
        f"intervals: 95% percentile bootstrap over the runs ({result['bootstrap']} resamples, those with "
        "fewer than 3 distinct x dropped). Unfinished runs are listed and not fitted.", "",
        "## Runs", "",
        "| run | arch | status | parameters | non-embedding | tokens | FLOPs | val loss | val ppl | "
        "eval loss | bits/byte | train time |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        p = r.parameters or {}
        lines.append(f"| {r.name} | {r.arch or '-'} | {r.status} | {_g(p.get('total'), ',')} | "
                     f"{_g(p.get('non_embedding'), ',')} | {_g(r.tokens, ',') if r.tokens else '-'} | "
                     f"{_g(r.flops)} | {_g(r.val_loss, '.4f')} | {_g(r.val_ppl, '.2f')} | "
                     f"{_g(r.eval_loss, '.4f')} | {_g(r.bits_per_byte, '.4f')} | "
                     f"{_duration(r.train_seconds)} |")
    for axis, (unit, label) in AXES.items():
        part = result[axis]
        lines += ["", f"## Loss against {label}", "",
                  "| arch | runs | E | A | alpha | E 95% | alpha 95% | resamples | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for arch, f in part["fits"].items():
            lines.append(f"| {arch} | {f['points']} | {_g(f.get('E'), '.4f')} | {_g(f.get('A'))} | "
                         f"{_g(f.get('alpha'), '.4f')} | {_ci(f.get('E_ci'))} | {_ci(f.get('alpha_ci'))} | "
                         f"{f.get('resamples', '-')} | {f['note']} |")
        lo, hi = part["search"]
        lines += ["", f"Crossings of the fitted curves, searched over {unit} in [{lo:.3g}, {hi:.3g}] "
                  f"(measured: [{part['measured'][0]:.3g}, {part['measured'][1]:.3g}]):", ""]
        for c in part["crossovers"]:
            a, b = c["archs"]
            share = "" if c["share"] is None else f"; {c['share']:.0%} of the resamples cross"
            if c["x"] is None:
                lines.append(f"* {a} / {b}: no crossing; {c['below']} lower throughout{share}.")
            else:
                where = "within" if c["measured"] else "outside (extrapolated)"
                lines.append(f"* {c['above']} overtakes {c['below']} at {c['x']:.3g} {unit} "
                             f"(95%: {_ci(c.get('ci'))}{share}); {where} the measured range.")
        if not part["crossovers"]:
            lines.append("* fewer than two fitted architectures.")
    lines += ["", "![loss against FLOPs](loss_vs_flops.png)", "",
              "![loss against parameters](loss_vs_params.png)", ""]
    return "\n".join(lines)


def _jsonable(result: dict) -> dict:
    out = {k: v for k, v in result.items() if k not in AXES}
    for axis in AXES:
        part = dict(result[axis])
        part["fits"] = {a: {k: v for k, v in f.items() if k not in ("law", "boot")}
                        for a, f in part["fits"].items()}
        out[axis] = part
    return out


def curves(part: dict, span: float = 3.0) -> dict:
    """For the plots: per fitted architecture, the curve and its 95% bootstrap band over the measured
    range widened ``span`` times on each side."""
    lo, hi = part["measured"][0] / span, part["measured"][1] * span
    xs = np.geomspace(lo, hi, 200)
    out = {}
    for arch, f in part["fits"].items():
        if "law" in f:
            band = np.percentile([b(xs) for b in f["boot"]], CONFIDENCE, axis=0) if f["boot"] else None
            out[arch] = {"x": xs, "y": f["law"](xs), "band": band}
    return out


def write(sweep_dir: Path, out_dir: Path, command: str, loss: str = "auto", n_boot: int = 1000,
          seed: int = 0, decades: float = 2.0, note: str = "") -> dict:
    """Read, fit, and write ``scaling.md``, ``scaling.json`` and the two figures into ``out_dir``;
    ``note``: a paragraph under the command (the sweep adds the machine and its run time)."""
    from . import plots

    runs, budget_params = read_sweep(sweep_dir)
    result = analyse(runs, budget_params, loss, n_boot, seed, decades)
    out_dir.mkdir(parents=True, exist_ok=True)
    for axis, name in (("compute", "loss_vs_flops.png"), ("params", "loss_vs_params.png")):
        part = result[axis]
        unfinished = [(r.arch, r.flops if axis == "compute" else r.parameters[budget_params], r.val_loss)
                      for r in runs if r.status.startswith("unfinished") and r.flops and r.val_loss]
        crossings = [c["x"] for c in part["crossovers"] if c["x"] is not None]
        plots.scaling_fit(part["points"], unfinished, curves(part), crossings, AXES[axis][1],
                          out_dir / name)
    (out_dir / "scaling.json").write_text(json.dumps(
        {"command": command, "note": note, "runs": [asdict(r) for r in runs], **_jsonable(result)}, indent=1))
    md = markdown(runs, result, command, note)
    (out_dir / "scaling.md").write_text(md)
    print(md)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir", type=Path, help="a sweep directory (or any folder of run directories)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default SWEEP_DIR/scaling)")
    p.add_argument("--loss", default="auto", choices=("auto", "val", "eval"),
                   help="val: the trainer's final validation; eval: the sweep's held-out evaluation; "
                        "auto: eval if every finished run has it")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decades", type=float, default=2.0,
                   help="crossings are searched this many decades beyond the measured range (default 2)")
    args = p.parse_args(argv)
    if not args.sweep_dir.is_dir():
        p.error(f"{args.sweep_dir} is not a directory; expected a sweep directory (runs/sweep/<name>)")
    if args.bootstrap < 0:
        p.error(f"--bootstrap={args.bootstrap}; expected >= 0")
    command = shlex.join(["python", "-m", "newtonlm.eval.scaling", *(sys.argv[1:] if argv is None else argv)])
    try:
        write(args.sweep_dir, args.out or args.sweep_dir / "scaling", command, args.loss, args.bootstrap,
              args.seed, args.decades)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
