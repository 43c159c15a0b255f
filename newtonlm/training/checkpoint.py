"""Checkpoints: DeepSpeed's ``save_checkpoint`` plus a completeness marker, keep-last-K, resume.

The run directory (``hydra.run.dir``) is the trainer's output and the only contract between training
and its readers (``newtonlm.export``, and through it ``newtonlm.eval``), which read it without
importing the trainer. Its format, owned by this module and ``loop.py``:

* ``config.yaml``: the resolved training config (``model``, ``data``, ``train``, ...);
* ``tokenizer/``: the run's tokenizer (``save_pretrained``; holds ``tokenizer_config.json``);
* ``metrics.jsonl``: one JSON object per line; validation records have ``"kind": "val"``, ``step``,
  ``val_loss``, ``val_ppl``, ``val_tokens`` (and ``"final": true`` for the one at the end);
* ``checkpoints/step_NNNNNNNN/``: one folder per saved optimizer step (tag: ``step_`` + the step in 8
  digits, :func:`tag_for`), written by DeepSpeed (``mp_rank_00_model_states.pt`` or, under ZeRO-3,
  ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` per rank, and ``*_optim_states.pt`` shards under
  ZeRO 1-3). The model-states file carries the client state: ``step``, ``tokens_seen``,
  ``world_size``, ``config`` (the resolved config again), ``skipped_total``, ``consecutive_skips``,
  and every rank's ``data`` (loader position) and ``rng`` states;
* ``checkpoints/step_NNNNNNNN/COMPLETE`` (:data:`MARKER`, JSON ``{"step", "time"}``): the checkpoint
  is complete; a folder without it is a save that did not finish and is never read;
* ``checkpoints/latest``: DeepSpeed's pointer, the newest complete tag.

Crash safety: a save first removes any older folder of the same tag (a leftover of a crashed save,
or of an abandoned branch of the run), DeepSpeed writes the files without touching ``latest``, and
only after a barrier does rank 0 write ``COMPLETE`` and then ``latest`` (atomically, by rename), both
after every rank finished the save. A crash at any point leaves a folder without ``COMPLETE`` and
``latest`` on the previous complete checkpoint, for newtonlm's resume and export (which only
consider folders with the marker) and for DeepSpeed's own tools (``zero_to_fp32``,
``load_checkpoint`` without a tag) alike. Pruning keeps the newest ``keep_last`` complete
checkpoints, never removes the one ``latest`` names, and removes incomplete folders older than the
newest complete one. ``tests/test_export.py`` checks that the export's reader reads what
:class:`Checkpoints` writes.
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

