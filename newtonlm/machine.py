"""The machine a measurement ran on, for the benchmarks' JSON and the evaluation reports.

Layer-less like ``paths.py`` (it imports nothing from newtonlm), so every layer, kernels included,
uses this one description instead of writing its own.
"""

from __future__ import annotations

import os
import platform

import torch


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (``model name`` in ``cpuinfo``; Linux on x86); elsewhere, or when the
    file lacks it (many ARM kernels), what ``platform`` knows: the processor or the architecture."""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict:
    """``{cpu, cpu_count, threads, load_average, platform, python, torch, gpu, gpu_count}``.

    ``threads``: torch's intra-op threads in this process; ``load_average``: the 1-minute load
    average now (other jobs on the same cores slow every figure down, so read it at the end of a
    measurement); ``gpu``: the name of CUDA device 0, None without one (reading it initializes
    CUDA). Benchmarks add their own keys (device, library versions) next to these."""
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if gpu_count else None,
        "gpu_count": gpu_count,
    }


def machine_line(info: dict, load_at_start: float | None = None) -> str:
    """``info`` (a :func:`machine_info` dict) as one line for a report; with ``load_at_start``, the
    load average at the start of the measurement next to the one in ``info`` (at its end)."""
    gpus = f"{info['gpu_count']} x {info['gpu']}" if info["gpu_count"] else "no GPU"
    load = f"load average {info['load_average']:.1f}"
    if load_at_start is not None:
        load = f"load average {load_at_start:.1f} at the start, {info['load_average']:.1f} at the end"
    threads = f"{info['threads']} thread" + ("s" if info["threads"] != 1 else "")
    return (f"{info['cpu']}, {info['cpu_count']} cores, {gpus}; torch {info['torch']} ({threads}), "
            f"Python {info['python']}, {info['platform']}; {load}")
