"""The export's input: a training run directory, read on its own terms (no import of the trainer).

The run-directory format is the trainer's and is documented in one place, the docstring of
``newtonlm/training/checkpoint.py``; this module reads it: ``checkpoints/step_NNNNNNNN/`` folders
(tag = 8-digit optimizer step), complete when they hold the ``COMPLETE`` marker; DeepSpeed's files in
them, whose model-states file carries the trainer's client state (``step``, ``tokens_seen``,
``world_size``, ``config`` = the resolved training config); ``config.yaml`` and ``tokenizer/`` at the
top. ``tests/test_export.py`` checks that this reader and the trainer's ``Checkpoints`` agree.

``read_checkpoint(path, step=None)`` accepts a run directory or one of its checkpoint folders, picks
the newest complete checkpoint (or the one of ``step``), reads its client state and consolidates the
weights to one fp32 state dict:

* ZeRO stage 0: the DeepSpeed model-states file already holds the full module state dict;
* ZeRO stages 1-3 (any world size): DeepSpeed's own ``zero_to_fp32`` merges the fp32 master weights
  of every rank's ``*_optim_states.pt`` shard (tied weights come back as DeepSpeed's shared params).

Before anything is loaded, the checkpoint is verified against its manifest: the ``COMPLETE`` marker
(format 2) lists every file DeepSpeed wrote with its size and, when the trainer computed it, its
crc32 (:func:`read_manifest`, :func:`verify_files`). A marker of format 1 (``{"step", "time"}``,
written before manifests) is accepted unverified, with a note (``Checkpoint.notes``). Without
``step``, a corrupt newest checkpoint is an error naming the file and the newest intact checkpoint
to export instead with ``--step``: never a silent fall-back to an older one.

Every problem a user can meet (no such run, no complete checkpoint, a partial one with files missing,
a file of the wrong size or checksum, an unreadable/truncated file, NaN weights, a ``tokenizer/``
that is not the one the checkpoint was trained with) raises :class:`ExportError` naming the path and
what was expected. The checkpoint files are pickles (DeepSpeed's format): read only checkpoints you
trust.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

# the run-directory format (owned and written by newtonlm/training/checkpoint.py and loop.py)
CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
TAG = re.compile(r"^step_(\d{8})$")
CLIENT_KEYS = ("step", "tokens_seen", "config")
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FORMAT = 2  # the COMPLETE marker as a manifest of the files (format 1: {"step", "time"} only)
FINGERPRINT = "tokenizer_fingerprint"  # key in the manifest and the client state


def tag_for(step: int) -> str:
    """The checkpoint folder name of optimizer step ``step``."""
    return f"step_{step:08d}"


def checkpoint_tags(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint folder under ``root`` (``<run>/checkpoints``), complete or not,
    by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if p.is_dir() and (m := TAG.match(p.name))]
    return sorted(found)


def complete_checkpoints(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of the complete checkpoints under ``root`` (those holding the marker), by step."""
    return [(s, t) for s, t in checkpoint_tags(root) if (Path(root) / t / MARKER).is_file()]


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a training run directory (``config.yaml`` and ``checkpoints/``)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / CHECKPOINTS).is_dir()


class ExportError(ValueError):
    """A problem with the checkpoint or the output folder that the user can fix; the message says how."""


class CorruptCheckpoint(ExportError):
    """A checkpoint whose files are damaged or missing (the message names them); completed by
    :func:`read_checkpoint` with which other checkpoint to export."""


# ---------------------------------------------------------------- the manifest (COMPLETE marker)

CRC_CHUNK = 1 << 24  # bytes per read while checksumming (16 MiB)


def read_manifest(tag_dir: Path) -> dict | None:
    """The manifest in ``tag_dir``'s ``COMPLETE`` marker: ``{"format": 2, "step", "world_size",
    "tokenizer_fingerprint", "config", "files": {relative path: {"size": int, "crc32": 8 hex digits or
    None}}}`` as the trainer writes it (``newtonlm/training/checkpoint.py``); ``None`` for a marker
    of format 1 (written before manifests: ``{"step", "time"}``; or an empty file), which is accepted
    unverified. A marker that is not JSON (a damaged manifest: every trainer wrote JSON), a manifest
    of another format or with malformed entries is an error."""
    marker = Path(tag_dir) / MARKER
    try:
        text = marker.read_text(encoding="utf-8")
        data = json.loads(text) if text.strip() else None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CorruptCheckpoint(f"the marker {marker} is unreadable ({type(err).__name__}: {err}); expected "
                                "the checkpoint's JSON manifest: the folder is damaged") from err
    if not isinstance(data, dict) or data.get("format", 1) == 1:
        return None
    if data["format"] != MANIFEST_FORMAT:
        raise ExportError(f"{marker} is a manifest of format {data['format']!r}; this newtonlm reads "
                          f"formats 1 and {MANIFEST_FORMAT}: use the newtonlm version that trained the run")
    files = data.get("files")
    bad = None
    if not isinstance(files, dict) or not files:
        bad = f"'files' is {files!r}; expected a non-empty mapping of file names to sizes"
    else:
        for name, entry in files.items():
            rel = Path(name)
            crc = entry.get("crc32") if isinstance(entry, dict) else None
            if rel.is_absolute() or ".." in rel.parts or not isinstance(entry, dict) or \
                    not isinstance(entry.get("size"), int) or isinstance(entry.get("size"), bool) or \
                    not (crc is None or (isinstance(crc, str) and re.fullmatch(r"[0-9a-fA-F]{8}", crc))):
                bad = (f"entry {name!r}: {entry!r}; expected a path inside the folder with "
                       '{"size": int, "crc32": 8 hex digits or null}')
                break
    if bad:
        raise ExportError(f"the manifest {marker} is malformed ({bad}); the checkpoint cannot be verified")
    return data


def file_crc32(path: Path) -> str:
    """zlib.crc32 of the whole file, streamed, as 8 lowercase hex digits (the manifest's form)."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def verify_files(tag_dir: Path, manifest: dict) -> None:
    """Check that every file the manifest lists exists in ``tag_dir`` with its size, and its crc32
    where one is given (sizes of all files first: a cheap check before reading any file whole).
    Raises :class:`CorruptCheckpoint` naming each bad file with the expected and the found value."""
    tag_dir = Path(tag_dir)
    problems = []
    sized = []
    for name, entry in sorted(manifest["files"].items()):
        file = tag_dir / name
        if not file.is_file():
            problems.append(f"{file} is missing (expected {entry['size']:,} bytes)")
        elif (size := file.stat().st_size) != entry["size"]:
            how = "truncated" if size < entry["size"] else "overwritten or appended to"
            problems.append(f"{file} has {size:,} bytes, the manifest records {entry['size']:,} ({how})")
        else:
            sized.append((file, entry))
    if not problems:
        for file, entry in sized:
            if entry.get("crc32") and (crc := file_crc32(file)) != entry["crc32"].lower():
                problems.append(f"{file} has crc32 {crc}, the manifest records {entry['crc32']} (its "
                                "bytes changed after the save)")
    if problems:
        raise CorruptCheckpoint(f"checkpoint {tag_dir} is corrupt: " + "; ".join(problems))


def intact(tag_dir: Path) -> bool | None:
    """Whether the checkpoint in ``tag_dir`` passes :func:`verify_files`; ``None`` when it cannot
    be told (a format-1 marker: no manifest)."""
    try:
        manifest = read_manifest(tag_dir)
        if manifest is None:
            return None
        verify_files(tag_dir, manifest)
    except ExportError:
        return False
    return True


@dataclass
class Checkpoint:
    """One training checkpoint, consolidated. ``config`` is the resolved training config saved in it
    (``model``, ``data``, ``train`` ...); ``state_dict`` maps parameter names to fp32 CPU tensors."""

    run_dir: Path
    tag: str
    step: int
    tokens_seen: int
    zero_stage: int
    world_size: int
    config: dict
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    tokenizer_fingerprint: str | None = None  # of the tokenizer it was trained with (None: not recorded)
    notes: list[str] = field(default_factory=list)  # what could not be checked (old formats), for the user

    @property
    def path(self) -> Path:
        return self.run_dir / CHECKPOINTS / self.tag

    @property
    def arch(self) -> str:
        return self.config["model"]["arch"]


def _steps(tags: list[tuple[int, str]]) -> str:
    return ", ".join(str(s) for s, _ in tags) or "none"


def locate(path: str | Path, step: int | None = None) -> tuple[Path, str]:
    """(run directory, checkpoint tag) of the checkpoint to export; the newest complete one unless
    ``step`` (or a ``checkpoints/step_NNNNNNNN`` folder as ``path``) chooses one."""
    run_dir, tag, _ = _locate(path, step)
    return run_dir, tag


def _locate(path: str | Path, step: int | None) -> tuple[Path, str, bool]:
    """:func:`locate`, and whether the tag was chosen here (True) or by the caller (False)."""
    path = Path(path)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ExportError(f"step={step!r}; expected an integer >= 0 (a checkpoint's optimizer step)")
    if not path.is_dir():
        raise ExportError(f"checkpoint path {path} does not exist or is not a directory; expected a run "
                          "directory of newtonlm.training.train (with checkpoints/ inside) or one of its "
                          "checkpoints/step_NNNNNNNN folders")
    if path.name == CHECKPOINTS and not (path / CHECKPOINTS).is_dir():
        path = path.parent  # the checkpoints/ folder itself: its run directory
    if path.parent.name == CHECKPOINTS and path.name.startswith("step_"):
        run_dir, chosen = path.parent.parent, path.name
        if step is not None and tag_for(step) != chosen:
            raise ExportError(f"--step {step} contradicts the checkpoint folder {path}; pass one of them")
    else:
        run_dir, chosen = path, None if step is None else tag_for(step)
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        raise ExportError(f"{run_dir} has no {CHECKPOINTS}/ folder; expected a run directory written by "
                          "newtonlm.training.train")
    complete = complete_checkpoints(root)
    if chosen is None:
        if not complete:
            found = sorted(p.name for p in root.glob("step_*") if p.is_dir())
            detail = (f"only incomplete ones (no {MARKER} marker: the save did not finish): {found}"
                      if found else "none at all")
            raise ExportError(f"no complete checkpoint in {root} ({detail})")
        return run_dir, complete[-1][1], True
    if not (root / chosen).is_dir():
        raise ExportError(f"no checkpoint {chosen} in {root}; complete checkpoints are at steps "
                          f"{_steps(complete)}")
    if not (root / chosen / MARKER).is_file():
        raise ExportError(f"checkpoint {root / chosen} is partial (no {MARKER} marker: the save did "
                          f"not finish); complete checkpoints are at steps {_steps(complete)}")
    return run_dir, chosen, False


def _torch_load(file: Path, mmap: bool = False):
    try:
        return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # truncated zip, bad pickle, EOF ...: all mean "this file is damaged"
        raise CorruptCheckpoint(f"cannot read {file}: {type(err).__name__}: {err}; the checkpoint file is "
                                "corrupt or truncated") from err


def _model_state_files(zero_stage: int, world_size: int) -> list[str]:
    if zero_stage == 3:
        return [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
    return ["mp_rank_00_model_states.pt"]


def _optim_files(tag_dir: Path) -> list[Path]:
    return sorted(tag_dir.glob("*_optim_states.pt"))


def _read_client_state(tag_dir: Path) -> dict:
    candidates = [tag_dir / name for name in
                  ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    file = next((f for f in candidates if f.is_file()), None)
    if file is None:
        raise CorruptCheckpoint(f"checkpoint {tag_dir} has no DeepSpeed model-states file (expected one of "
                                f"{[f.name for f in candidates]}); the checkpoint is partial")
    state = _torch_load(file, mmap=True)  # weights stay on disk until used (large models)
    missing = [k for k in (*CLIENT_KEYS, "module") if k not in state]
    if missing or not isinstance(state.get("config"), dict) or "model" not in state["config"]:
        raise ExportError(f"{file} lacks {missing or ['config.model']}; expected a checkpoint written by "
                          "newtonlm.training.train (its client state holds step, tokens_seen and config)")
    return state


def _zero_state_dict(ckpt_root: Path, tag: str) -> dict[str, torch.Tensor]:
    from .quiet import quiet_zero_to_fp32

    with quiet_zero_to_fp32() as (zero_to_fp32, printed):  # its prints and bars are not for the user
        try:
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
        except Exception as err:  # DeepSpeed raises ValueError, FileNotFoundError, KeyError ...
            said = printed.getvalue().strip().splitlines()
            last = f" (its last output: {said[-1].strip()!r})" if said else ""
            raise CorruptCheckpoint(f"DeepSpeed could not consolidate the ZeRO shards of {ckpt_root / tag}: "
                                    f"{type(err).__name__}: {err}{last}; the checkpoint is partial or "
                                    "corrupt") from err


def consolidate(tag_dir: Path, state: dict) -> tuple[dict[str, torch.Tensor], int, int]:
    """(fp32 state dict, ZeRO stage, world size) of a checkpoint whose model-states dict is ``state``."""
    zero_stage = int(state.get("ds_config", {}).get("zero_optimization", {}).get(
        "stage", state["config"].get("train", {}).get("zero_stage", 0)))
    world_size = int(state.get("world_size") or state.get("dp_world_size") or 1)
    missing = [f for f in _model_state_files(zero_stage, world_size) if not (tag_dir / f).is_file()]
    optim = _optim_files(tag_dir)
    if zero_stage > 0 and len(optim) != world_size:
        missing.append(f"{world_size} *_optim_states.pt shards (found {len(optim)})")
    if missing:
        raise CorruptCheckpoint(f"checkpoint {tag_dir} (ZeRO stage {zero_stage}, world size {world_size}) "
                                f"is partial: missing {missing}")
    if optim:  # fp32 master weights live in the optimizer shards (ZeRO 1-3, or bf16 weights)
        for f in optim:  # a damaged shard gives a clear error before DeepSpeed's own parsing
            _torch_load(f, mmap=True)
        sd = _zero_state_dict(tag_dir.parent, tag_dir.name)
    else:
        sd = state["module"]
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    for name, t in sd.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CorruptCheckpoint(f"checkpoint {tag_dir}: parameter {name} holds non-finite values (NaN "
                                    "or Inf)")
    return sd, zero_stage, world_size


def _instead(root: Path, tag: str, automatic: bool) -> str:
    """What to export instead of the damaged checkpoint ``tag``: with the tag chosen automatically,
    the newest older checkpoint that passes verification (named, never taken silently)."""
    step = int(TAG.match(tag).group(1))
    older = [(s, t) for s, t in complete_checkpoints(root) if s < step]
    if not automatic:
        others = [(s, t) for s, t in complete_checkpoints(root) if s != step]
        return f"complete checkpoints at other steps: {_steps(others)}; choose one of them with --step N"
    head = f"{tag} is the newest complete checkpoint, and an older one is never used in its place silently"
    for s, t in reversed(older):
        ok = intact(root / t)
        if ok:
            return f"{head}: the newest intact checkpoint is {t}, pass --step {s} to use it"
        if ok is None:
            return (f"{head}: the previous complete checkpoint is {t} (written before checkpoint manifests, "
                    f"so it cannot be verified without loading it): try --step {s}")
    return f"{head}, and no older complete checkpoint is intact ({_steps(older)} checked)"


def read_checkpoint(path: str | Path, step: int | None = None) -> Checkpoint:
    """Locate (see :func:`locate`), verify against the manifest, read and consolidate a training
    checkpoint. A damaged checkpoint is an error naming the file and the checkpoint to export instead."""
    run_dir, tag, automatic = _locate(path, step)
    tag_dir = run_dir / CHECKPOINTS / tag
    try:
        manifest = read_manifest(tag_dir)
        notes = []
        if manifest is None:
            notes.append(f"checkpoint {tag_dir} was written before checkpoint manifests (its {MARKER} "
                         "marker lists no files): its files were not verified before loading")
        else:
            verify_files(tag_dir, manifest)
        state = _read_client_state(tag_dir)
        sd, zero_stage, world_size = consolidate(tag_dir, state)
    except CorruptCheckpoint as err:
        raise CorruptCheckpoint(f"{err}. {_instead(run_dir / CHECKPOINTS, tag, automatic)}") from err
    fingerprint = state.get(FINGERPRINT) or (manifest or {}).get(FINGERPRINT)
    return Checkpoint(run_dir=run_dir, tag=tag, step=int(state["step"]),
                      tokens_seen=int(state["tokens_seen"]), zero_stage=zero_stage, world_size=world_size,
                      config=state["config"], state_dict=sd, tokenizer_fingerprint=fingerprint, notes=notes)


def check_tokenizer(ckpt: Checkpoint, tokenizer, where: Path) -> None:
    """Refuse a tokenizer that is not the one ``ckpt`` was trained with (its fingerprint, recorded at
    the save, against ``newtonlm.data.tokenizer_fingerprint`` of ``tokenizer``, loaded from ``where``).
    A checkpoint without a recorded fingerprint (older trainers) gets a note in ``ckpt.notes``."""
    from newtonlm.data.tokenizer import tokenizer_fingerprint

    if ckpt.tokenizer_fingerprint is None:
        ckpt.notes.append(f"checkpoint {ckpt.path} records no tokenizer fingerprint (written by an older "
                          f"trainer): {where} is assumed to be the tokenizer it was trained with (only "
                          "its vocabulary size is checked)")
        return
    found = tokenizer_fingerprint(tokenizer)
    if found != ckpt.tokenizer_fingerprint:
        raise ExportError(
            f"the tokenizer at {where} (fingerprint {found}) is not the one checkpoint {ckpt.path} was "
            f"trained with (fingerprint {ckpt.tokenizer_fingerprint}): the run's tokenizer folder was "
            "replaced or retrained after this save, and the weights would be paired with the wrong token "
            f"ids. Put the run's original tokenizer back into {where} (the tokenizer that data.tokenizer "
            "in the checkpoint's config describes), or export a checkpoint trained with this tokenizer")


def read_run_config(run_dir: str | Path) -> dict:
    """The resolved training config the trainer saved in ``<run>/config.yaml``, as a dict."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path} does not exist; expected the {CONFIG_FILE} the trainer writes into "
                          "the run directory")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def read_tokenizer(run_dir: str | Path):
    """The tokenizer the trainer saved in ``<run>/tokenizer/``."""
    from newtonlm.data import load_tokenizer

    path = Path(run_dir) / TOKENIZER_DIR
    if not (path / "tokenizer_config.json").is_file():
        raise ExportError(f"{path} holds no saved tokenizer (tokenizer_config.json); expected the "
                          f"{TOKENIZER_DIR}/ folder the trainer writes into the run directory")
    try:
        return load_tokenizer(str(path))
    except ValueError as err:
        raise ExportError(f"the run's tokenizer at {path} could not be loaded: {err}") from err
