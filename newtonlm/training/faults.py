"""Fault injection for the robustness tests, driven by one environment variable.

``NEWTONLM_FAULTS`` is a comma-separated list of:

* ``sigterm@S``: after optimizer step S, the process sends itself SIGTERM (preemption);
* ``kill_in_save@S``: SIGKILL right after DeepSpeed wrote the first file of the step-S checkpoint;
* ``exit@R:S``: rank R exits abruptly (``os._exit(1)``) after step S (a dead rank).

Unset (the normal case) nothing happens. NaN losses are injected through ``train.inject_nan_steps``.
"""

from __future__ import annotations

import os
import signal


def _faults() -> list[tuple[str, str]]:
    spec = os.environ.get("NEWTONLM_FAULTS", "")
    return [tuple(item.split("@", 1)) for item in spec.split(",") if "@" in item]


def after_step(step: int, rank: int) -> None:
    for kind, arg in _faults():
        if kind == "sigterm" and int(arg) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        elif kind == "exit":
            r, s = (int(v) for v in arg.split(":"))
            if r == rank and s == step:
                os._exit(1)


def before_save(engine, step: int) -> None:
    for kind, arg in _faults():
        if kind == "kill_in_save" and int(arg) == step:
            ce = engine.checkpoint_engine
            original = ce.save

            def save_then_die(*args, _original=original, **kwargs):
                _original(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)

            ce.save = save_then_die
