"""Load a model to evaluate: a training run (DeepSpeed checkpoint) or a Hugging Face folder.

* Run directory (``python -m newtonlm.training.train`` output): the newest complete checkpoint (or
  the one of a given step), any ZeRO stage, read and consolidated by ``newtonlm.export`` (the one
  reader of run directories); the model preset and the training sequence length come from the config
  saved in the checkpoint, the tokenizer from ``tokenizer/``.
* Hugging Face folder (``save_pretrained`` / the export command): ``config.json`` + weights +
  tokenizer files; loaded with ``AutoModelForCausalLM`` (newtonlm's model types are registered by
  importing ``newtonlm.models``, so no remote code is needed here). Its context length is the config's
  ``max_position_embeddings`` unless the caller gives one.

Checked before anything is evaluated (errors are ``ValueError``s naming the file and both values):
a run's checkpoint against its manifest and its ``tokenizer/`` against the fingerprint recorded at
the save (through ``newtonlm.export``); a folder's ``*.safetensors`` files open (a truncated one is
named); every id the tokenizer can produce has a row in the model's embedding. What could not be
checked (old checkpoints) is listed in ``LoadedModel.notes``. The libraries' progress bars and
DeepSpeed's accelerator warning are kept off the console (``newtonlm.export.quiet``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from newtonlm.export import (
    check_vocabulary,
    check_weight_files,
    embedding_rows,
    is_run_dir,
    no_transformers_bars,
)
from newtonlm.quiet import quiet_expected_notices

RECURRENT_TYPES = ("paragru", "paralstm", "pararnn", "mamba2")


@dataclass
class LoadedModel:
    """A model ready for evaluation (eval mode, on ``device``) with what the evaluators need.

    ``context``: the sequence length the model was trained on (run directory) or its config's
    ``max_position_embeddings`` (Hugging Face folder); ``recurrent``: it carries a fixed-size state
    (ParaRNN, Mamba2) rather than attending to a window; ``source``: the path and checkpoint tag;
    ``notes``: what could not be verified (for the user).
    """

    model: torch.nn.Module
    tokenizer: object
    arch: str
    context: int
    recurrent: bool
    source: str
    notes: list[str] = field(default_factory=list)


def load_run(run_dir: Path, step: int | None = None
             ) -> tuple[torch.nn.Module, object, str, int, str, list[str]]:
    """(model, tokenizer, arch, training seq_len, checkpoint tag, notes) of a run directory, fp32
    weights. The checkpoint is verified, read, consolidated, paired with the run's tokenizer and loaded
    by the export's code (``newtonlm.export.read_checkpoint``, ``read_tokenizer``,
    ``build_exported_model``)."""
    from newtonlm.export import build_exported_model, read_checkpoint, read_tokenizer

    ckpt = read_checkpoint(run_dir, step)
    tokenizer = read_tokenizer(ckpt.run_dir)
    model, _ = build_exported_model(ckpt, tokenizer, "fp32")
    return model, tokenizer, ckpt.arch, int(ckpt.config["train"]["seq_len"]), ckpt.tag, ckpt.notes


def load_folder(path: Path) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of a Hugging Face folder, fp32, its weight files and vocabulary checked."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import newtonlm.models  # noqa: F401  (registers the ParaRNN model types)

    check_weight_files(path)
    with no_transformers_bars():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        except SafetensorError as err:  # damage check_weight_files cannot see (e.g. shards in a subfolder)
            raise ValueError(f"cannot read the weights of {path}: SafetensorError: {err}; the folder's "
                             "weight files are truncated or damaged: copy or export it again") from err
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    check_vocabulary(tokenizer, embedding_rows(model), path, path)
    return model, tokenizer


def load_for_eval(path: str | Path, step: int | None = None, context: int | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a run directory or a Hugging Face folder (see the module docstring) for evaluation.

    ``step``: checkpoint of a run (default: the newest complete one); ``context``: overrides the
    context length (an attention model's window; the chunk length of a recurrent one)."""
    path = Path(path)
    if context is not None and context < 1:
        raise ValueError(f"context={context}; expected a positive number of tokens")
    quiet_expected_notices()  # DeepSpeed's accelerator guess, CUDA-kernel hints (newtonlm/quiet.py)
    notes = []
    if is_run_dir(path):
        model, tokenizer, arch, seq_len, tag, notes = load_run(path, step)
        source = f"{path} ({tag})"
    elif (path / "config.json").is_file():
        if step is not None:
            raise ValueError(f"step={step} given for the Hugging Face folder {path}; steps select "
                             "checkpoints of a run directory")
        model, tokenizer = load_folder(path)
        arch = model.config.model_type
        seq_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        if seq_len <= 0 and context is None:
            raise ValueError(f"{path}/config.json has no max_position_embeddings; pass a context length")
        source = str(path)
    else:
        raise ValueError(f"{path} is neither a run directory (config.yaml + checkpoints/) nor a Hugging "
                         "Face folder (config.json)")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {path} has no EOS token; documents need a separator")
    model = model.to(device=device, dtype=dtype).eval()
    recurrent = model.config.model_type in RECURRENT_TYPES
    return LoadedModel(model, tokenizer, arch, context or seq_len, recurrent, source, notes)
