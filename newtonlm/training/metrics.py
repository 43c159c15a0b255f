"""Run outputs: ``metrics.jsonl``, the console progress line, wandb, and MFU.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged optimizer step (``"kind":
"train"``) and one per validation (``"kind": "val"``; the one at the end of a run has ``"final":
true``), and events (``"kind": "event"``, ``"event": <name>``, e.g. a corrupt checkpoint skipped at
resume). On resume the file is cut back to the records up to the resumed step, final validation
excepted, so it always tells one consistent history. :class:`RunLog` sends each record to all
three outputs.

MFU (model FLOPs utilization) = model FLOPs per second / the peak of the units the matmuls run
on (:func:`peak_flops`): bf16 (autocast) uses the dense bf16 tensor-core peak; fp32 uses the fp32
peak of the CUDA cores (non-tensor), torch's default, or the dense TF32 tensor-core peak when TF32
matmuls are enabled (``torch.backends.cuda.matmul.allow_tf32`` or
``torch.set_float32_matmul_precision("high")``). The trainer does not enable TF32. On a CPU the
peak is an fp32 matmul measured at start-up, for either precision.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm


def _parse(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:  # e.g. cut short by a crash or a full disk
        return None
    return rec if isinstance(rec, dict) else None


class MetricsLog:
    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
        else:  # drop what was logged after the checkpoint we resume from (and a torn last line);
            # a final validation comes after the last checkpoint too: a resumed run that finishes
            # (even one resumed from that very checkpoint) writes it again
            kept = [line for line in self.path.read_text().splitlines()
                    if (rec := _parse(line)) is not None and rec.get("step", 0) <= resume_step
                    and not rec.get("final")]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._fh = open(self.path, "a")

    def write(self, record: dict) -> None:
        """Append one record; non-finite floats are written as null (strict JSON)."""
        if self.enabled:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in record.items()}
            self._fh.write(json.dumps(clean) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self.enabled:
            self._fh.close()


class Progress:
    """The console progress line on stderr (or ``stream``): step, loss, tokens/s, elapsed and ETA.

    On a terminal: a tqdm bar redrawn in place. Otherwise (a log file, a batch job's output): one
    plain line whenever another ``every_frac`` of the run is done or ``every_s`` seconds have passed
    since the previous line, and one at the last step; never a line per step. The ETA extrapolates
    the steps done since ``start_step`` (a resumed run's earlier steps do not count)."""

    BAR = "{l_bar}{bar}| step {n_fmt}/{total_fmt}{postfix} [{elapsed}<{remaining}]"
    LINE = "step {n_fmt}/{total_fmt} ({percentage:.0f}%){postfix}, elapsed {elapsed}, ETA {remaining}"

    def __init__(self, total_steps: int, start_step: int, enabled: bool, stream=None,
                 every_frac: float = 0.1, every_s: float = 60.0, clock=time.monotonic):
        self.enabled, self.total, self.start = enabled, total_steps, start_step
        if not enabled:
            return
        self.stream = sys.stderr if stream is None else stream
        self.every_steps = max(1, math.ceil(every_frac * total_steps))
        self.every_s, self.clock = every_s, clock
        self.t0 = self.last_time = clock()
        self.last_step = start_step
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, bar_format=self.BAR,
                            dynamic_ncols=True, mininterval=0.5)

    def update(self, step: int, loss: float, tokens_per_s: float, skipped: bool = False,
               detail: str = "") -> None:
        if not self.enabled:
            return
        postfix = (f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s" + (f", {detail}" if detail else "")
                   + (" (skipped)" if skipped else ""))
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        now = self.clock()
        milestone = step // self.every_steps > self.last_step // self.every_steps
        if milestone or now - self.last_time >= self.every_s or step >= self.total:
            line = tqdm.format_meter(step, self.total, now - self.t0, initial=self.start,
                                     postfix=postfix, bar_format=self.LINE)
            print(line, file=self.stream, flush=True)
            self.last_time, self.last_step = now, step

    def close(self) -> None:
        if self.enabled and self.bar is not None:
            self.bar.close()


def init_wandb(cfg, run_dir: Path, resolved: dict, enabled: bool):
    """A wandb run (offline by default, never required): None when disabled or not rank 0."""
    if not enabled or cfg.mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: logging to metrics.jsonl only", file=sys.stderr)
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name,
                     tags=list(cfg.tags), config=resolved, dir=str(run_dir), mode=cfg.mode,
                     resume="allow", id=_wandb_id(run_dir))
    # x-axis: the trainer's step, logged as a field (not wandb's own step counter, which must
    # increase: a resumed run logs again the steps after its checkpoint, and wandb would drop them)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run directory, so that a resumed run continues the same wandb run."""
    f = run_dir / "wandb_id.txt"
    if not f.exists():
        import uuid

        f.write_text(uuid.uuid4().hex[:12])
    return f.read_text().strip()


FALLBACK_WARN_RATE = 0.05  # Newton rejected for more than this share of solves: warn


def newton_summary(record: dict) -> str:
    """The recurrence's path for the progress line, from a record's ``newton/...`` telemetry (see
    ``newtonlm.kernels.newton_telemetry``): ``newton 3.0 it`` (+ ``, fallback 12%`` when Newton was
    rejected), ``sequential`` (the sequential path by choice: CPU ``auto``), or "" (no ParaRNN
    layer, or no telemetry in this record)."""
    newton, fallbacks = record.get("newton/newton") or 0, record.get("newton/fallbacks") or 0
    if newton + fallbacks > 0:
        text = f"newton {record.get('newton/mean_iterations') or 0:.1f} it"
        return text + (f", fallback {record['newton/fallback_rate']:.0%}" if fallbacks else "")
    return "sequential" if record.get("newton/sequential") else ""


def fallback_warning(record: dict, threshold: float = FALLBACK_WARN_RATE) -> str | None:
    """A warning when Newton was rejected (and the layer recomputed sequentially) for more than
    ``threshold`` of its solves in this record's interval, naming the layers; None otherwise."""
    rate = record.get("newton/fallback_rate") or 0.0
    if rate <= threshold:
        return None
    layers = sorted({key.split("/")[1] for key in record if key.startswith("newton/layer")},
                    key=lambda name: int(name[len("layer"):]))
    worst = [f"{name}: {record[f'newton/{name}/fallback_rate']:.0%} (last residual "
             f"{record.get(f'newton/{name}/residual')})" for name in layers
             if (record.get(f"newton/{name}/fallback_rate") or 0) > 0]
    return (f"step {record.get('step')}: Newton was rejected for {rate:.0%} of the solves since the "
            f"previous record ({', '.join(worst)}); those layers were recomputed sequentially, so the "
            "run is becoming sequential (many times slower on a GPU). Check the recurrent weights' "
            "bound (model.a_max) and model.newton_max_extra_iters; metrics.jsonl has the per-layer "
            "residual history")


class RunLog:
    """metrics.jsonl, wandb and the progress line of one run (they write on rank 0 only).
    ``resume_step``: the step of the checkpoint the run resumed from (None: a fresh run)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None, wandb_cfg, resolved: dict,
                 total_steps: int, progress: bool):
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", enabled, resume_step)
        self.wandb = init_wandb(wandb_cfg, run_dir, resolved, enabled)
        self.progress = Progress(total_steps, resume_step or 0, enabled and progress)

    def train(self, record: dict) -> None:
        """A step's record (see train.train_step)."""
        self.metrics.write(record)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))})
        self.progress.update(record["step"], record["loss"], record["tokens_per_s"], record["skipped"],
                             newton_summary(record))
        if self.metrics.enabled and (warning := fallback_warning(record)):
            print(f"newtonlm: warning: {warning}", file=sys.stderr, flush=True)

    def val(self, step: int, tokens_seen: int, val: dict, final: bool = False) -> None:
        """A validation's results ``val`` (``val_loss``, ``val_ppl``, ``val_tokens``) at ``step``;
        ``final``: the validation at the end of the run."""
        self.metrics.write({"kind": "val", "step": step, "tokens_seen": tokens_seen,
                            **({"final": True} if final else {}), **val})
        if self.wandb is not None:
            self.wandb.log({"step": step, **val})

    def event(self, name: str, step: int, **fields) -> None:
        """Something that happened to the run, not a measurement (metrics.jsonl only), e.g.
        ``skipped_corrupt_checkpoint`` with the checkpoint and the reason."""
        self.metrics.write({"kind": "event", "event": name, "step": step, **fields})

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


# Dense peak FLOP/s of one GPU per matmul mode: fp32 on the CUDA cores (non-tensor), TF32 and bf16
# on the tensor cores. NVIDIA datasheet figures; the datasheets' tensor figures marked "with
# sparsity" are twice these. The first pattern that matches the device name
# (torch.cuda.get_device_name) wins; a GPU not listed (e.g. H100 NVL, A10G: their figures differ
# from their namesakes') needs train.peak_flops.
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bH100\b.*\bPCIe\b", {"fp32": 51e12, "tf32": 378e12, "bf16": 756e12}),
    (r"\bH[12]00\b(?!.*\b(?:PCIe|NVL)\b)", {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12}),  # SXM
    (r"\bA100\b", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12}),  # SXM4 and PCIe alike
    (r"\bL40S\b", {"fp32": 91.6e12, "tf32": 183e12, "bf16": 362e12}),
    (r"\bA10\b", {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12}),
)
MODES = ("fp32", "tf32", "bf16")  # matmul modes: fp32 CUDA cores, TF32 / bf16 tensor cores


def gpu_peak_flops(name: str, mode: str) -> float | None:
    """Dense peak FLOP/s of the GPU called ``name`` for matmuls in ``mode`` (fp32, tf32, bf16),
    or None for a GPU not in :data:`GPU_PEAKS`."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peaks[mode]
    return None


def matmul_mode(precision: str, allow_tf32: bool) -> str:
    """The mode a training precision's matmuls run in on a GPU: bf16 for bf16 autocast; for fp32,
    TF32 tensor cores if ``allow_tf32`` (torch.backends.cuda.matmul.allow_tf32) else fp32."""
    if precision == "bf16":
        return "bf16"
    if precision != "fp32":
        raise ValueError(f"precision={precision!r}; expected fp32 or bf16")
    return "tf32" if allow_tf32 else "fp32"


def peak_flops(device: torch.device, precision: str, configured: float) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained): ``configured`` if > 0; on a GPU the table's
    figure for the mode the matmuls run in (0 for an unknown GPU: MFU is then not reported); on a
    CPU an fp32 matmul measured now."""
    if configured > 0:
        return configured, "configured (train.peak_flops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        mode = matmul_mode(precision, torch.backends.cuda.matmul.allow_tf32)
        peak = gpu_peak_flops(name, mode)
        if peak is None:
            return 0.0, f"unknown GPU {name}: set train.peak_flops"
        return peak, f"table ({name}, dense {mode})"
    return _measured_cpu_matmul_flops(), "measured fp32 matmul on this CPU"


def mfu(flops_per_token: float, tokens: float, seconds: float, peak: float, world_size: int) -> float | None:
    """Model FLOPs utilization of a step that processed ``tokens`` on ``world_size`` devices of
    ``peak`` FLOP/s each in ``seconds``; None without a peak."""
    return flops_per_token * tokens / seconds / (peak * world_size) if peak > 0 else None


def _measured_cpu_matmul_flops(n: int = 512, reps: int = 8) -> float:
    g = torch.Generator().manual_seed(0)  # not the global RNG, which checkpoints save and restore
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)
