"""Export a training checkpoint as a Hugging Face model folder, and optionally publish it.

    python -m newtonlm.training.export --checkpoint RUN_DIR --out DIR [--step N] [--dtype fp32|bf16]
        [--overwrite] [--push-to-hub REPO_ID [--private] [--revision BRANCH] [--commit-message MSG]]

Steps: read and consolidate the checkpoint (``export_source``: newest complete one or ``--step``, any
ZeRO stage, DeepSpeed's own ``zero_to_fp32``) -> load it into a model built from the config saved in
the checkpoint -> ``save_pretrained`` (``config.json``, ``model.safetensors``, ``generation_config.json``;
for ParaGRU / ParaLSTM ``auto_map`` and the self-contained modeling code, ``export_bundle``) -> the
run's tokenizer -> the model card ``README.md`` (``export_card``). Everything is written to a hidden
folder next to DIR and renamed into place at the end: an error leaves nothing at DIR.

``--push-to-hub`` uploads the folder with huggingface_hub (``create_repo`` + ``upload_folder``),
authenticated by huggingface_hub itself from ``HF_TOKEN`` or the login saved by ``hf auth login``;
the token is never read into this program's output, files or model card. See docs/export.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .export_source import Checkpoint, ExportError, read_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ExportResult:
    """What was written: the folder, the checkpoint's architecture, step and tokens seen, the parameter
    counts (``count_parameters``) and the file names."""

    out: Path
    arch: str
    step: int
    tokens_seen: int
    parameters: dict
    files: list[str]


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


def _tokenizer(run_dir: Path):
    from .. import data as nd

    path = run_dir / "tokenizer"
    if not (path / "tokenizer_config.json").is_file():
        raise ExportError(f"{path} holds no saved tokenizer (tokenizer_config.json); expected the "
                          "tokenizer/ folder the trainer writes into the run directory")
    try:
        return nd.load_tokenizer(str(path))
    except ValueError as err:
        raise ExportError(f"the run's tokenizer at {path} could not be loaded: {err}") from err


def build_exported_model(ckpt: Checkpoint, tokenizer, dtype: str):
    """The model of ``ckpt``'s config with its weights, special-token ids from the tokenizer, in ``dtype``."""
    from transformers import GenerationConfig

    from .. import data as nd
    from .. import models as nm

    vocab = nd.vocab_size_for_model(tokenizer)
    try:
        model = nm.build_model(ckpt.config["model"], vocab)
    except ValueError as err:  # e.g. a preset field this version of newtonlm no longer knows
        raise ExportError(f"the model config saved in {ckpt.path} is not accepted: {err}") from err
    try:
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
    from .. import models as nm
    from .export_bundle import make_self_contained
    from .export_card import REMOTE_CODE, model_card

    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
    out = Path(out)
    check_output(out, overwrite)
    ckpt = read_checkpoint(checkpoint, step)
    _check_not_source(out, ckpt.run_dir)
    tokenizer = _tokenizer(ckpt.run_dir)
    model, vocab = build_exported_model(ckpt, tokenizer, dtype)
    params = nm.count_parameters(model)
    with staged_folder(out) as tmp:
        if ckpt.arch in REMOTE_CODE:
            with _auto_classes(model):
                model.save_pretrained(tmp)
            make_self_contained(tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        card = model_card(ckpt, params, vocab, dtype, repo_id or str(out))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
    return ExportResult(out=out, arch=ckpt.arch, step=ckpt.step, tokens_seen=ckpt.tokens_seen,
                        parameters=params, files=files)


def check_hub_access(repo_id: str) -> None:
    """Fail before any work when the repo id is malformed or no Hugging Face login is available."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ExportError(f"--push-to-hub {repo_id!r} is not a valid repo id ({err}); expected "
                          "'namespace/name'") from err
    if get_token() is None:  # only tested for presence: the token itself is left to huggingface_hub
        raise ExportError("no Hugging Face login: run `hf auth login` or set HF_TOKEN, then rerun")


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, api=None) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing; ``revision``: a branch,
    created if missing); returns the commit URL. ``api``: an ``HfApi``-like object (default ``HfApi()``,
    which authenticates from HF_TOKEN or the saved login)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    folder = Path(folder)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   commit_message=commit_message, repo_type="model")
    except Exception as err:  # network, permissions, quota ...: the folder is intact, say how to retry
        raise ExportError(f"upload to {repo_id} failed: {type(err).__name__}: {err}; the exported folder "
                          f"{folder} is complete: retry with `hf upload {repo_id} {folder}`") from err
    return str(getattr(commit, "commit_url", commit))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m newtonlm.training.export",
                                description="Export a newtonlm training checkpoint as a Hugging Face model "
                                            "folder (and optionally upload it).")
    p.add_argument("--checkpoint", required=True,
                   help="run directory (or one of its checkpoints/step_* folders)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--step", type=int, default=None,
                   help="export this step (default: the newest complete checkpoint)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights' dtype (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="upload the folder to this model repo")
    p.add_argument("--private", action="store_true", help="create the repo private (with --push-to-hub)")
    p.add_argument("--revision", default=None,
                   help="branch to upload to (with --push-to-hub; created if missing)")
    p.add_argument("--commit-message", default=None, help="commit message (with --push-to-hub)")
    return p


def main(argv: list[str] | None = None, hub_api=None) -> int:
    """The command line; returns the exit status (2 for an :class:`ExportError`). ``hub_api`` replaces
    ``HfApi()`` (tests)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.push_to_hub is None and (args.private or args.revision or args.commit_message):
        parser.error("--private, --revision and --commit-message need --push-to-hub REPO_ID")
    try:
        if args.push_to_hub:
            check_hub_access(args.push_to_hub)
        result = export_checkpoint(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                                   overwrite=args.overwrite, repo_id=args.push_to_hub)
        print(f"exported {result.arch} step {result.step} ({result.tokens_seen:,} tokens, "
              f"{result.parameters['total']:,} parameters, {args.dtype}) to {result.out}: "
              f"{', '.join(result.files)}")
        if args.push_to_hub:
            message = args.commit_message or (f"newtonlm export: {result.arch} step {result.step} "
                                              f"({result.tokens_seen:,} tokens)")
            url = push_to_hub(result.out, args.push_to_hub, private=args.private, revision=args.revision,
                              commit_message=message, api=hub_api)
            print(f"uploaded to {args.push_to_hub}: {url}")
    except ExportError as err:
        print(f"newtonlm export: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
