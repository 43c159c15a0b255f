"""Checkpoints: DeepSpeed's ``save_checkpoint`` plus a completeness marker, keep-last-K, resume.

Layout under ``<run_dir>/checkpoints/``: one folder per tag ``step_00000100`` written by DeepSpeed
(model/optimizer states; ``client_state`` holds the step, tokens seen, every rank's data-loader and
RNG states and the resolved config), DeepSpeed's ``latest`` file, and ``<tag>/COMPLETE`` written by
rank 0 after every rank finished the save.

Crash safety: DeepSpeed writes ``latest`` only after all files and a barrier, and the ``COMPLETE``
marker comes after that, so a crash at any point leaves a folder without ``COMPLETE``; resume only
considers folders with the marker, so ``resume=auto`` picks the previous checkpoint. Pruning keeps
the newest ``keep_last`` complete checkpoints, never removes the one ``latest`` names, and removes
incomplete folders older than the newest complete one (leftovers of crashed saves).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from . import faults
from .distributed import barrier

_TAG = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class Checkpoints:
    def __init__(self, root: Path, keep_last: int, is_main: bool):
        self.root, self.keep_last, self.is_main = Path(root), keep_last, is_main

    def _tags(self) -> list[tuple[int, str]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in self.root.iterdir()
                 if p.is_dir() and (m := _TAG.match(p.name))]
        return sorted(found)

    def complete(self) -> list[tuple[int, str]]:
        return [(s, t) for s, t in self._tags() if (self.root / t / MARKER).is_file()]

    def latest_complete(self) -> str | None:
        done = self.complete()
        return done[-1][1] if done else None

    def has_any(self) -> bool:
        return bool(self._tags())

    def save(self, engine, step: int, client_state: dict) -> str:
        tag = tag_for(step)
        faults.before_save(engine, step)
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=True)
        barrier()
        if self.is_main:
            tmp = self.root / tag / f".{MARKER}.tmp"
            tmp.write_text(json.dumps({"step": step, "time": time.time()}))
            os.replace(tmp, self.root / tag / MARKER)
            self.prune()
        barrier()
        return tag

    def prune(self) -> None:
        latest_file = self.root / "latest"
        pinned = latest_file.read_text().strip() if latest_file.is_file() else None
        done = self.complete()
        keep = {t for _, t in done[-self.keep_last:]} | ({pinned} if pinned else set())
        newest = done[-1][0] if done else -1
        for step, tag in self._tags():
            complete = (self.root / tag / MARKER).is_file()
            if tag in keep or (not complete and step >= newest):
                continue
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def load(self, engine, tag: str) -> dict:
        if not (self.root / tag / MARKER).is_file():
            raise ValueError(f"checkpoint {self.root / tag} is missing or incomplete (no {MARKER} "
                             f"marker); complete ones: {[t for _, t in self.complete()] or 'none'}")
        path, client_state = engine.load_checkpoint(str(self.root), tag=tag,
                                                    load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        return client_state

