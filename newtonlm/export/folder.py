"""Write a training checkpoint as a Hugging Face model folder.

Steps: verify, read and consolidate the checkpoint (``source``: newest complete one or ``step``, its
manifest, any ZeRO stage, DeepSpeed's own ``zero_to_fp32``) -> check the run's tokenizer against it
(the fingerprint recorded at the save, the embedding's rows: ``source.check_tokenizer``, ``checks``)
-> load it into a model built from the config saved in the checkpoint -> ``save_pretrained``
(``config.json``, ``model.safetensors``, ``generation_config.json``; for ParaGRU / ParaLSTM
``auto_map`` and the self-contained modeling code, ``bundle``) -> the run's tokenizer -> the model
card ``README.md`` (``card``). Everything is written to a hidden folder next to the output and
renamed into place at the end: an error leaves nothing at the output path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import card
from .bundle import make_self_contained
from .checks import check_vocabulary, token_ids_needed
from .quiet import known_accelerator, no_transformers_bars
from .source import TOKENIZER_DIR, Checkpoint, ExportError, check_tokenizer, read_checkpoint, read_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ExportResult:
    """What was written: the folder, the checkpoint's architecture, step and tokens seen, the parameter
    counts (``count_parameters``), the file names, and notes on what could not be verified (an old
    checkpoint without a manifest or a tokenizer fingerprint)."""

    out: Path
    arch: str
    step: int
    tokens_seen: int
    parameters: dict
    files: list[str]
    notes: list[str] = field(default_factory=list)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; expected a folder path (new, empty, or with --overwrite)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite "
                          "to replace it")


def _check_not_source(out: Path, run_dir: Path) -> None:
    out, run_dir = out.resolve(), run_dir.resolve()
    if out == run_dir or out in run_dir.parents:
        raise ExportError(f"--out {out} would replace the training run {run_dir} it exports; choose "
                          "another folder")


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _readable(folder: Path) -> None:
    """Give every file the permissions of a normally created one (some writers use mkstemp's 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


@contextlib.contextmanager
def staged_folder(out: Path):
    """Yield an empty hidden folder next to ``out``; on success it replaces ``out`` (one rename), on
    any error it is removed."""
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise ExportError(f"cannot create the output folder {out}: {err}") from err
    try:
        yield tmp
        _readable(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _auto_classes(model):
    """Register the model and config classes with the Auto classes while saving (so ``save_pretrained``
    writes ``auto_map`` and copies the modeling files), then restore the classes as they were."""
    classes = (type(model), type(model.config))
    saved = [cls.__dict__.get("_auto_class", None) for cls in classes]
    had = ["_auto_class" in cls.__dict__ for cls in classes]
    model.register_for_auto_class("AutoModelForCausalLM")
    model.config.register_for_auto_class("AutoConfig")
    try:
        yield
    finally:
        for cls, value, present in zip(classes, saved, had):
            if present:
                cls._auto_class = value
            else:
                del cls._auto_class


def _checkpoint_embedding_rows(ckpt: Checkpoint) -> int | None:
    """Rows of the input embedding in ``ckpt``'s weights (its name from the model class, built on the
    meta device: no memory), or None if the weights lack it (then ``load_state_dict`` reports it)."""
    from newtonlm.models import build_model

    with torch.device("meta"):
        probe = build_model(ckpt.config["model"], 64)
    weight = probe.get_input_embeddings().weight
    names = [n for n, p in probe.named_parameters(remove_duplicate=False) if p is weight]
    found = [ckpt.state_dict[n] for n in names if n in ckpt.state_dict]
    return int(found[0].shape[0]) if found else None


def build_exported_model(ckpt: Checkpoint, tokenizer, dtype: str):
    """The model of ``ckpt``'s config with its weights, special-token ids from the tokenizer, in
    ``dtype``. Refuses a tokenizer that is not the checkpoint's: another fingerprint than the one
    recorded at the save, ids beyond the embedding, or another vocabulary size."""
    from transformers import GenerationConfig

    from newtonlm.data import vocab_size_for_model
    from newtonlm.kernels import accept_clamped_weights
    from newtonlm.models import build_model

    where = ckpt.run_dir / TOKENIZER_DIR
    check_tokenizer(ckpt, tokenizer, where)
    vocab = vocab_size_for_model(tokenizer)
    try:
        rows = _checkpoint_embedding_rows(ckpt)
        model = build_model(ckpt.config["model"], vocab)
    except ValueError as err:  # e.g. a preset field this version of newtonlm no longer knows
        raise ExportError(f"the model config saved in {ckpt.path} is not accepted: {err}") from err
    if rows is not None:
        check_vocabulary(tokenizer, rows, where, ckpt.path)
        if rows != vocab:  # the trainer sizes the embedding as vocab_size_for_model(its tokenizer)
            raise ExportError(
                f"the tokenizer at {where} gives a vocabulary of {vocab} (max token id + 1 = "
                f"{token_ids_needed(tokenizer)}, rounded up to 64), but the embedding of checkpoint "
                f"{ckpt.path} has {rows} rows: this tokenizer is not the one the model was trained with (a "
                "swapped or retrained tokenizer folder). Put the run's original tokenizer back")
    try:
        # trained raw A/C may drift past a_max (the clamp in every forward is part of this model);
        # consolidated ZeRO weights lack the metadata that says so
        with accept_clamped_weights():
            model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as err:
        raise ExportError(f"the weights of {ckpt.path} do not fit the {ckpt.arch} model built from its saved "
                          f"config (vocabulary {vocab} from the run's tokenizer): {err}") from err
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, "head not tied"
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    for key, value in ids.items():
        setattr(model.config, key, value)
    model.generation_config = GenerationConfig(**ids)
    return model.to(DTYPES[dtype]).eval(), vocab


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, step: int | None = None,
                      dtype: str = "fp32", overwrite: bool = False,
                      repo_id: str | None = None) -> ExportResult:
    """Write the Hugging Face folder of a training checkpoint to ``out`` (see the module docstring).
    ``repo_id`` only names the model in the card's loading snippet (default: the folder)."""
    from newtonlm.models import count_parameters

    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
    known_accelerator()  # save_pretrained imports DeepSpeed (through accelerate): no accelerator guess
    out = Path(out)
    check_output(out, overwrite)
    ckpt = read_checkpoint(checkpoint, step)
    _check_not_source(out, ckpt.run_dir)
    tokenizer = read_tokenizer(ckpt.run_dir)
    model, vocab = build_exported_model(ckpt, tokenizer, dtype)
    params = count_parameters(model)
    with staged_folder(out) as tmp, no_transformers_bars():
        if ckpt.arch in card.REMOTE_CODE:
            with _auto_classes(model):
                model.save_pretrained(tmp)
            make_self_contained(tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        text = card.model_card(ckpt, params, vocab, dtype, repo_id or str(out))
        (tmp / "README.md").write_text(text, encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
    return ExportResult(out=out, arch=ckpt.arch, step=ckpt.step, tokens_seen=ckpt.tokens_seen,
                        parameters=params, files=files, notes=ckpt.notes)
