"""Checkpoints: DeepSpeed's ``save_checkpoint`` plus a manifest that marks the checkpoint complete,
keep-last-K, verification, resume.

The run directory (``hydra.run.dir``) is the trainer's output and the only contract between training
and its readers (``newtonlm.export``, and through it ``newtonlm.eval``), which read it without
importing the trainer. Its format, owned by this module and ``loop.py``:

* ``config.yaml``: the resolved training config (``model``, ``data``, ``train``, ...);
* ``tokenizer/``: the run's tokenizer (``save_pretrained``; holds ``tokenizer_config.json``), the one
  its checkpoints were trained with (their manifests hold its fingerprint);
* ``metrics.jsonl``: one JSON object per line; validation records have ``"kind": "val"``, ``step``,
  ``val_loss``, ``val_ppl``, ``val_tokens`` (and ``"final": true`` for the one at the end); events
  have ``"kind": "event"`` (e.g. ``"event": "skipped_corrupt_checkpoint"``);
* ``.lock``: the lock of the trainer writing the directory (``lock.py``); readers ignore it;
* ``checkpoints/step_NNNNNNNN/``: one folder per saved optimizer step (tag: ``step_`` + the step in 8
  digits, :func:`tag_for`), written by DeepSpeed (``mp_rank_00_model_states.pt`` or, under ZeRO-3,
  ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` per rank, and ``*_optim_states.pt`` shards under
  ZeRO 1-3). The model-states file carries the client state: ``step``, ``tokens_seen``,
  ``world_size``, ``config`` (the resolved config again), ``tokenizer_fingerprint``,
  ``tokenizer_size``, ``vocab_size``, ``data_signature``, ``skipped_total``, ``consecutive_skips``,
  and every rank's ``data`` (loader position) and ``rng`` states;
* ``checkpoints/step_NNNNNNNN/COMPLETE`` (:data:`MARKER`): the checkpoint is complete; a folder without
  it is a save that did not finish and is never read. Since format 2 the marker is the checkpoint's
  manifest, JSON::

      {"format": 2, "step": int, "time": float (Unix time of the save), "world_size": int,
       "tokenizer_fingerprint": str (newtonlm.data.tokenizer.tokenizer_fingerprint) or null,
       "tokenizer_size": int (largest token id + 1), "vocab_size": int (the model's embedding rows),
       "data_signature": {...} (rank 0's data-loader signature, ResumableLoader.signature()),
       "config": {...} (the resolved config, as in the client state),
       "files": {"<path relative to the folder>": {"size": int, "crc32": "<8 hex digits>"}}}

  ``files`` lists every file DeepSpeed wrote in the folder with its size and the zlib CRC-32 of its
  whole content (``crc32`` may be null in manifests of other writers: then only the size is
  checked). Format 1 (newtonlm before manifests) is ``{"step", "time"}``: such checkpoints are read
  without verification. :meth:`Checkpoints.verify` checks a folder against its manifest;
  ``newtonlm.export`` has its own verifier of the same format (``tests/test_export.py`` checks both
  agree);
* ``checkpoints/latest``: DeepSpeed's pointer, the newest complete tag;
* ``checkpoints/.universal-step_NNNNNNNN/`` (transient): while a ZeRO checkpoint written by another
  number of ranks is loaded, rank 0's conversion of it to DeepSpeed's universal checkpoint
  (``ds_to_universal``); deleted once every rank has loaded it or the conversion failed, and on
  the next such load if a crash left it. Readers ignore it (it has no ``step_`` name).

Elastic resume (:meth:`Checkpoints.load`): the manifest's ``world_size`` is the number of ranks
that wrote the checkpoint. Loaded on another number of ranks, a ZeRO 1-3 checkpoint goes through
the universal conversion (the per-rank optimizer shards are merged into one file per parameter and
state, then each rank takes its new partition: DeepSpeed's own re-partitioning, nothing
hand-written); a ZeRO-0 checkpoint holds the whole optimizer state in its model-states file and
loads as it is. The original folder is only read.

Checksums: every file gets a CRC-32, computed right after the save by the rank that wrote it (the
file is still in that node's page cache; :func:`file_owner`) and gathered on rank 0, which writes the
manifest. zlib's CRC-32 runs at about 1 GB/s per core (measured 1.0-1.1 GB/s on a busy 2-core VM:
``.venv/bin/python -c "import zlib,os,time; b=os.urandom(1<<28); t=time.time(); zlib.crc32(b);
print(256/(time.time()-t), 'MB/s')"``). At 7B parameters a checkpoint is ~112 GB (fp32 weights
28 GB in the model-states file, Adam's fp32 master copy and two moments 84 GB in the optimizer
shards): on 8 ranks with ZeRO 1-2, rank 0 checksums 28 + 10.5 GB (~28 s: its two files in parallel
threads, ~40 s on one core) while the others checksum their 10.5 GB shards (~10 s) at the same time;
under ZeRO-3 each rank has 14 GB (~14 s). The save itself writes 112 GB (~1 min at 2 GB/s).
Verification at resume costs the same, for the checkpoint resumed from only. That is acceptable
every few hundred steps for the guarantee it buys (a truncated or bit-flipped file is named before
anything loads); all files are checksummed, because the weights file is the one whose corruption
would otherwise go unnoticed longest.

Crash safety: a save first removes any older folder of the same tag (a leftover of a crashed save,
or of an abandoned branch of the run), DeepSpeed writes the files without touching ``latest``, every
rank checksums its files, and only then does rank 0 write ``COMPLETE`` and then ``latest``
(atomically, by rename). A crash or a failed write (no space, file-size limit, I/O error: raised as
:class:`CheckpointWriteError` naming the folder, the error, the free space and the last complete
checkpoint) at any point leaves a folder without ``COMPLETE`` and ``latest`` on the previous complete
checkpoint, for newtonlm's resume and export (which only consider folders with the marker) and for
DeepSpeed's own tools (``zero_to_fp32``, ``load_checkpoint`` without a tag) alike. Pruning keeps
the newest ``keep_last`` complete checkpoints, never removes the one ``latest`` names, and removes
incomplete folders older than the newest complete one; removing the folder ``latest`` names moves
``latest`` to the newest remaining complete checkpoint. ``tests/test_export.py`` checks that the
export's reader reads what :class:`Checkpoints` writes.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import faults
from .distributed import all_gather_object, barrier, broadcast_object, rank_and_world
from .errors import UserError

_TAG = re.compile(r"^step_(\d{8})$")
# DeepSpeed's per-rank files: ZeRO shards and ZeRO-3 model states; NVMe-offloaded optimizer tensors
_RANK_FILE = re.compile(r"(?:^|/)zero_pp_rank_(\d+)_|(?:^|/)offloaded_tensors/rank(\d+)/")
MARKER = "COMPLETE"
FORMAT = 2
# client-state keys copied into the manifest, so that a resume can be planned without loading weights
MANIFEST_KEYS = ("world_size", "tokenizer_fingerprint", "tokenizer_size", "vocab_size", "data_signature",
                 "config")
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_CHUNK = 8 << 20  # streamed checksums: 8 MiB reads (no faster beyond, measured)


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt or unreadable. The message
    names the folder or file and what was expected."""


class CheckpointWriteError(UserError):
    """A save that failed (no space, file-size limit, I/O error): not a bug, so reported as one
    message (exit code 2). Its folder is not marked complete; the message names the folder, the
    error, the free space and the last complete checkpoint."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def file_owner(relpath: str, world_size: int) -> int:
    """The rank that checksums a checkpoint file (at save) and verifies it (at resume): the rank that
    wrote it for DeepSpeed's per-rank files (``zero_pp_rank_<r>_...``, ``offloaded_tensors/rank<r>/``),
    rank 0 for the others (and for a rank beyond ``world_size``)."""
    m = _RANK_FILE.search(relpath)
    rank = int(m.group(1) or m.group(2)) if m else 0
    return rank if rank < world_size else 0


def checksum(path: Path) -> str:
    """zlib CRC-32 of the whole file, streamed, as 8 hex digits."""
    crc, buf = 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def folder_files(folder: Path) -> list[str]:
    """Files of a checkpoint folder (paths relative to it, sorted), the marker excepted."""
    out = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(folder).as_posix()
            if rel != MARKER and not rel.startswith(f".{MARKER}"):
                out.append(rel)
    return sorted(out)


def manifest_problems(folder: Path, files: dict, owned=lambda rel: True) -> list[str]:
    """What is wrong with the files of ``folder`` listed in a manifest's ``files`` (those for which
    ``owned(relpath)``): missing, another size, another CRC-32. Empty when they are intact."""
    problems = []
    for rel, want in sorted(files.items()):
        if not owned(rel):
            continue
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path} has {size:,} bytes, expected {want['size']:,} "
                            "(truncated or overwritten)")
        elif want.get("crc32") and (crc := checksum(path)) != want["crc32"]:
            problems.append(f"{path} has CRC-32 {crc}, expected {want['crc32']} (its content changed)")
    return problems


def human_size(n: float) -> str:
    """Bytes in decimal units: ``512 bytes``, ``1.50 MB``, ``112.00 GB``."""
    if n < 1000:
        return f"{n:,.0f} bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:,.2f} {unit}"


def _free_space(path: Path) -> tuple[int, int]:
    """(free, total) bytes of the filesystem holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return usage.free, usage.total


def _file_size_limit() -> int | None:
    """The soft RLIMIT_FSIZE (``ulimit -f``) in bytes, None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _os_error(exc: BaseException) -> OSError | None:
    """The first OSError with an errno in ``exc``'s chain (torch's writer raises a RuntimeError
    without one: then None)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def convert_to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` of the ZeRO checkpoint ``folder`` into the new folder ``out``
    (its parent gets DeepSpeed's ``latest_universal`` pointer). In this process, serially (no
    worker processes forked from a trainer); the converter's progress output is swallowed."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # newtonlm's models carry no universal-checkpoint metadata (no tensor
                              # parallelism): DeepSpeed's default one is right for them
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)


def _base_optimizer(engine):
    return getattr(engine.optimizer, "optimizer", engine.optimizer)  # inside the ZeRO wrapper


def _group_hyperparameters(engine) -> list[dict]:
    """The inner optimizer's settings per parameter group, but the learning rate (the schedule's)."""
    return [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
            for group in _base_optimizer(engine).param_groups]


def _repair_zero3_universal_load(engine, hyper: list[dict]) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19.8,
    ``stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``): it gives every parameter group
    the first group's settings (here: weight decay on the no-decay group), and one ``step`` tensor
    to every group, which AdamW then increments once per group and step (wrong bias correction
    from the first resumed step on). ``hyper``: the groups' settings before the load, which equal
    the checkpoint's (a resume refuses another weight decay, betas or eps)."""
    import torch

    base = _base_optimizer(engine)
    for group, settings in zip(base.param_groups, hyper, strict=True):
        group.update(settings)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


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
        step = tag_step(tag)
        return [t for s, t in self._tags() if s > step]

    def all_tags(self) -> list[str]:
        return [t for _, t in self._tags()]

    # ---- reading -------------------------------------------------------------------------------

    def manifest(self, tag: str) -> dict | None:
        """The manifest (format 2) of a complete checkpoint; None for a format-1 marker (no file
        list: not verifiable). CheckpointError for a marker that is not JSON or of another format."""
        path = self.root / tag / MARKER
        try:
            marker = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {exc}); expected the "
                                  "checkpoint's JSON manifest") from exc
        if not isinstance(marker, dict):
            raise CheckpointError(f"{path} holds {type(marker).__name__}; expected the checkpoint's "
                                  "JSON manifest")
        if "format" not in marker:
            return None  # format 1: {"step", "time"}
        if marker["format"] != FORMAT:
            raise CheckpointError(f"{path} has format {marker['format']!r}; this newtonlm reads "
                                  f"format {FORMAT}")
        files = marker.get("files")
        if not isinstance(files, dict) or not all(isinstance(f, dict) and isinstance(f.get("size"), int)
                                                  for f in files.values()):
            raise CheckpointError(f"{path} is a malformed manifest: expected \"files\": {{path: {{\"size\": "
                                  "int, \"crc32\": 8 hex digits or null}}")
        return marker

    def size(self, tag: str) -> int:
        """Bytes of a checkpoint: from its manifest, else (format 1) of the files in its folder."""
        manifest = self.manifest(tag)
        if manifest is not None:
            return sum(f["size"] for f in manifest["files"].values())
        folder = self.root / tag
        return sum((folder / rel).stat().st_size for rel in folder_files(folder))

    def verify(self, tag: str) -> str | None:
        """Why checkpoint ``tag`` cannot be used (each file named, expected vs found), or None when
        it is complete and every file has its manifest's size and CRC-32. A collective: every rank
        checks the files it owns (:func:`file_owner`), every rank gets the same answer. A format-1
        checkpoint has nothing to verify (None)."""
        rank, world = rank_and_world()
        try:
            if not (self.root / tag / MARKER).is_file():
                problems = [f"{self.root / tag} is missing or incomplete (no {MARKER} marker)"]
            elif (manifest := self.manifest(tag)) is None:
                problems = []
            else:
                problems = manifest_problems(self.root / tag, manifest["files"],
                                             lambda rel: file_owner(rel, world) == rank)
        except (CheckpointError, OSError) as exc:
            problems = [str(exc)]
        found = [p for mine in all_gather_object(problems) for p in mine]
        return "; ".join(dict.fromkeys(found)) or None

    def read_client_state(self, tag: str) -> dict:
        """The client state of a checkpoint, read from its model-states file without an engine
        (for format-1 checkpoints, whose marker holds no settings). Loads that file's weights too."""
        import torch

        folder = self.root / tag
        path = next((folder / name for name in MODEL_STATES if (folder / name).is_file()), None)
        if path is None:
            raise CheckpointError(f"{folder} has no model-states file ({' or '.join(MODEL_STATES)})")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated zip, a bit flip in a pickle, ...
            raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from exc
        return state

    def saved_world_size(self, tag: str) -> int | None:
        """The number of ranks that wrote checkpoint ``tag`` (its manifest's ``world_size``); None
        for a format-1 checkpoint or a manifest without it."""
        manifest = self.manifest(tag)
        return None if manifest is None else manifest.get("world_size")

    def load(self, engine, tag: str) -> dict:
        """Load checkpoint ``tag`` into the engine (weights, optimizer, schedule) -> its client state.
        A ZeRO checkpoint written by another number of ranks is first converted to DeepSpeed's
        universal checkpoint (:meth:`_load_universal`); without ZeRO (stage 0) every rank's optimizer
        state is whole in the model-states file and loads on any number of ranks as it is. A
        collective."""
        folder = self.root / tag
        if not (folder / MARKER).is_file():
            raise CheckpointError(f"checkpoint {folder} is missing or incomplete (no {MARKER} marker); "
                                  f"complete ones: {[t for _, t in self.complete()] or 'none'}")
        saved_world, (_, world) = self.saved_world_size(tag), rank_and_world()
        if saved_world is not None and saved_world != world and engine.zero_optimization_stage() > 0:
            return self._load_universal(engine, tag, saved_world)
        return self._engine_load(engine, self.root, tag, folder)

    @staticmethod
    def _engine_load(engine, root: Path, tag: str, folder: Path) -> dict:
        try:
            path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        except Exception as exc:
            raise CheckpointError(f"loading checkpoint {folder} failed: {type(exc).__name__}: {exc}") from exc
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {folder}")
        return client_state

    def _load_universal(self, engine, tag: str, saved_world: int) -> dict:
        """Load a ZeRO checkpoint written by ``saved_world`` ranks on this world size: rank 0 converts
        it with DeepSpeed's ``ds_to_universal`` into ``<root>/.universal-<tag>/<tag>`` (one tensor
        file per parameter and optimizer state, independent of the partitioning); every rank then
        loads its own partition from there (``checkpoint.load_universal``). The original folder is
        only read; the converted copy is deleted once every rank has loaded it, or when the
        conversion fails (CheckpointError naming the checkpoint)."""
        folder, work = self.root / tag, self.root / f".universal-{tag}"
        error = None
        if self.is_main:
            shutil.rmtree(work, ignore_errors=True)  # a leftover of a crashed start
            try:
                convert_to_universal(folder, work / tag)
            except Exception as exc:  # DeepSpeed's converter raises what it meets (asserts included)
                error = (f"converting checkpoint {folder} (written by {saved_world} ranks) to DeepSpeed's "
                         f"universal checkpoint for {rank_and_world()[1]} ranks failed: "
                         f"{type(exc).__name__}: {exc}")
        error = broadcast_object(error)
        try:
            if error:
                raise CheckpointError(error)
            engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
            hyper = _group_hyperparameters(engine)
            try:
                state = self._engine_load(engine, work, tag, folder)
            finally:
                engine._config.load_universal_checkpoint = False
            if engine.zero_optimization_stage() == 3:
                _repair_zero3_universal_load(engine, hyper)
            return state
        finally:
            barrier()
            if self.is_main:
                shutil.rmtree(work, ignore_errors=True)

    # ---- writing -------------------------------------------------------------------------------

    def remove(self, tags: list[str]) -> None:
        """Delete those of these checkpoint folders that exist (rank 0), then wait for every rank.
        If ``latest`` names one of them it first moves to the newest remaining complete checkpoint
        (or goes, when none remains), so it never names a deleted or half-deleted folder."""
        if self.is_main:
            latest = self.root / "latest"
            if latest.is_file() and latest.read_text().strip() in tags:
                remaining = [t for _, t in self.complete() if t not in tags]
                if remaining:
                    self._write(latest, remaining[-1])
                else:
                    latest.unlink()
            for tag in tags:
                if (self.root / tag).exists():
                    shutil.rmtree(self.root / tag)
        barrier()

    def save(self, engine, step: int, client_state: dict) -> str:
        """Save the engine's state and ``client_state`` as checkpoint ``step``; every rank calls it.
        The manifest copies :data:`MANIFEST_KEYS` from ``client_state`` (null where absent). A failed
        write raises :class:`CheckpointWriteError` on the rank that saw it."""
        tag = tag_for(step)
        folder = self.root / tag
        self.remove([tag])  # never mix fresh files with those of an older save of this tag
        faults.before_save(engine, step)
        rank, world = rank_and_world()
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
            mine = self._file_records(folder, [rel for rel in folder_files(folder)
                                               if file_owner(rel, world) == rank])
        except (OSError, RuntimeError) as exc:  # torch's writer raises RuntimeError("... unexpected pos")
            raise CheckpointWriteError(self.write_failure(folder, exc)) from exc
        gathered = all_gather_object(mine)  # also the barrier: every rank has finished its files
        if self.is_main:
            files = {rel: rec for part in gathered for rel, rec in part.items()}
            files.update(self._file_records(folder, [r for r in folder_files(folder) if r not in files]))
            manifest = {"format": FORMAT, "step": step, "time": time.time(),
                        **{key: client_state.get(key) for key in MANIFEST_KEYS}, "files": files}
            try:
                self._write(folder / MARKER, json.dumps(manifest, indent=1))
                self._write(self.root / "latest", tag)
            except OSError as exc:
                raise CheckpointWriteError(self.write_failure(folder, exc)) from exc
            self.prune()
        barrier()
        return tag

    @staticmethod
    def _file_records(folder: Path, rels: list[str]) -> dict:
        """{relpath: {"size", "crc32"}}; files in parallel (zlib releases the GIL)."""
        def record(rel):
            path = folder / rel
            return rel, {"size": path.stat().st_size, "crc32": checksum(path)}

        if len(rels) <= 1:
            return dict(map(record, rels))
        with ThreadPoolExecutor(max_workers=min(4, len(rels))) as pool:
            return dict(pool.map(record, rels))

    def write_failure(self, folder: Path, exc: BaseException) -> str:
        """The message of a failed save: the folder, the error (and the OS error behind it when
        known), the free space, the file-size limit if one is set, the last complete checkpoint."""
        what = f"{type(exc).__name__}: {exc}"
        cause = _os_error(exc)
        if cause is not None and cause is not exc:
            what += f" (OS error: {cause})"
        free, total = _free_space(self.root)
        parts = [f"saving checkpoint {folder} failed: {what}",
                 f"free space on its filesystem: {human_size(free)} of {human_size(total)}"]
        limit = _file_size_limit()
        if limit is not None:
            at_limit = [rel for rel in (folder_files(folder) if folder.is_dir() else [])
                        if (folder / rel).stat().st_size >= limit]
            parts.append(f"file-size limit (ulimit -f, RLIMIT_FSIZE): {human_size(limit)}"
                         + (f", reached by {', '.join(at_limit)}" if at_limit else ""))
        last = self.latest_complete()
        parts.append(f"the folder is not marked complete and is never resumed from; the last complete "
                     f"checkpoint is {self.root / last} (train.resume=auto resumes from it)" if last
                     else "the folder is not marked complete; there is no complete checkpoint yet")
        return "; ".join(parts)

    def space_warning(self) -> str | None:
        """A warning when the next save will likely fail: less free space than the last complete
        checkpoint took, or a file-size limit below its largest file. None otherwise."""
        last = self.latest_complete()
        if last is None:
            return None
        try:
            manifest = self.manifest(last)
            need = self.size(last)
        except (CheckpointError, OSError):
            return None
        free, _ = _free_space(self.root)
        warnings = []
        if free < need:
            warnings.append(f"{human_size(free)} free on the filesystem of {self.root}, but the last "
                            f"checkpoint ({last}) took {human_size(need)}")
        limit = _file_size_limit()
        largest = max((f["size"] for f in manifest["files"].values()), default=0) if manifest else 0
        if limit is not None and largest > limit:
            warnings.append(f"the file-size limit (ulimit -f) is {human_size(limit)}, but the last "
                            f"checkpoint has a file of {human_size(largest)}")
        if not warnings:
            return None
        return ("; ".join(warnings) + ": the next save will likely fail (free space, e.g. delete older "
                "checkpoints, or raise the limit)")

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


STATE_DUMP_ENV = "NEWTONLM_STATE_DUMP"


def dump_state(engine, step: int, when: str) -> None:
    """Test hook: with ``NEWTONLM_STATE_DUMP=<folder>`` set, rank 0 writes
    ``<folder>/<when>_<step>.pt``: every parameter's fp32 value and Adam moments (``exp_avg``,
    ``exp_avg_sq``), gathered whole from any ZeRO partitioning, by name; the elastic-resume tests
    compare the state a run saved with the state another world size resumed. A collective."""
    folder = os.environ.get(STATE_DUMP_ENV)
    if not folder:
        return
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = engine.zero_optimization_stage() > 0
    zero_opt = engine.optimizer
    if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO 1-2 link each parameter to its optimizer-state fragment after the first step of the
        # first parameter group, before the others have state: link again, now that all have it
        zero_opt._hp_optimizer_states_linked = False
        zero_opt._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        if zero:
            value = [safe_get_full_fp32_param(p)] + [safe_get_full_optimizer_state(p, k)
                                                     for k in ("exp_avg", "exp_avg_sq")]
        else:
            moments = engine.optimizer.state.get(p, {})
            value = [p.detach()] + [moments.get(k) for k in ("exp_avg", "exp_avg_sq")]
        out[name] = [None if v is None else v.detach().float().cpu().clone() for v in value]
    # the inner optimizer's hyperparameters per group and its step counts (Adam's bias correction)
    base = _base_optimizer(engine)
    steps = sorted({float(st["step"]) for st in base.state.values() if "step" in st})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    gathered = all_gather_object({"steps": steps, "groups": groups})
    if rank_and_world()[0] == 0:
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save({"params": out, "optimizer": gathered}, Path(folder) / f"{when}_{step}.pt")
