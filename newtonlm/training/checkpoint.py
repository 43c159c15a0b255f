"""Checkpoints: DeepSpeed's ``save_checkpoint`` plus a completeness marker, keep-last-K, resume.

Layout under ``<run_dir>/checkpoints/``: one folder per tag ``step_00000100`` written by DeepSpeed
(model/optimizer states; ``client_state`` holds the step, tokens seen, every rank's data-loader and
RNG states and the resolved config), ``<tag>/COMPLETE`` and the ``latest`` file (DeepSpeed's format:
the newest tag), both written by rank 0 after every rank finished the save.

Crash safety: a save first removes any older folder of the same tag (a leftover of a crashed save,
or of an abandoned branch of the run), DeepSpeed writes the files without touching ``latest``, and
only after a barrier does rank 0 write ``COMPLETE`` and then ``latest`` (atomically, by rename). A
crash at any point leaves a folder without ``COMPLETE`` and ``latest`` on the previous complete
checkpoint, for newtonlm's resume (which only considers folders with the marker) and for
DeepSpeed's own tools (``zero_to_fp32``, ``load_checkpoint`` without a tag) alike. Pruning keeps the
newest ``keep_last`` complete checkpoints, never removes the one ``latest`` names, and removes
incomplete folders older than the newest complete one.
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

    def newer_than(self, tag: str) -> list[str]:
        """Checkpoint folders (complete or not) of later steps than ``tag``."""
        step = int(_TAG.match(tag).group(1))
        return [t for s, t in self._tags() if s > step]

    def all_tags(self) -> list[str]:
        return [t for _, t in self._tags()]

    def remove(self, tags: list[str]) -> None:
        """Delete those of these checkpoint folders that exist (rank 0; and ``latest`` if it names
        one), then wait for every rank."""
        if self.is_main:
            latest = self.root / "latest"
            if latest.is_file() and latest.read_text().strip() in tags:
                latest.unlink()
            for tag in tags:
                if (self.root / tag).exists():
                    shutil.rmtree(self.root / tag)
        barrier()

    def save(self, engine, step: int, client_state: dict) -> str:
        tag = tag_for(step)
        self.remove([tag])  # never mix fresh files with those of an older save of this tag
        faults.before_save(engine, step)
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        barrier()
        if self.is_main:
            self._write(self.root / tag / MARKER, json.dumps({"step": step, "time": time.time()}))
            self._write(self.root / "latest", tag)
            self.prune()
        barrier()
        return tag

    @staticmethod
    def _write(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

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

