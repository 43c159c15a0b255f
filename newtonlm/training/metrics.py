"""Run outputs: ``metrics.jsonl``, the console progress line, wandb, and MFU.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per optimizer step (``"kind": "train"``)
and one per validation (``"kind": "val"``). On resume the file is cut back to the records up to the
resumed step, so it always tells one consistent history.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch


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
        else:  # drop what was logged after the checkpoint we resume from (and a torn last line)
            kept = [line for line in self.path.read_text().splitlines()
                    if (rec := _parse(line)) is not None and rec.get("step", 0) <= resume_step]
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
    """One console line per log interval: step, loss, tokens/s, ETA (stderr when not a TTY too)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.total, self.enabled = total_steps, enabled
        self.t0, self.s0 = time.perf_counter(), start_step

    def update(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> None:
        if not self.enabled:
            return
        done = step - self.s0
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        print(f"[{bar}] step {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s "
              f"ETA {_fmt_eta(eta)}{extra}", file=sys.stderr, flush=True)


def _fmt_eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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


# Peak dense throughput per GPU (bf16 / fp32 non-tensor), FLOP/s, for MFU.
_GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device, precision: str, configured: float) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained)."""
    if configured > 0:
        return configured, "configured (train.peak_flops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_BF16.items():
            if key in name:
                return (value if precision == "bf16" else value / 2), f"table ({name})"
        return 0.0, f"unknown GPU {name}: set train.peak_flops"
    return _measured_cpu_matmul_flops(), "measured fp32 matmul on this CPU"


def _measured_cpu_matmul_flops(n: int = 512, reps: int = 8) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)
