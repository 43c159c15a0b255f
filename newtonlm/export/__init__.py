"""newtonlm.export: training run directories -> Hugging Face model folders (and the Hub).

``python -m newtonlm.export`` (``cli``) writes the folder of a checkpoint (``folder``), with a model
card (``card``) and, for the ParaRNN models, the self-contained remote code (``bundle``), and uploads
it (``hub``). ``source`` reads run directories on its own (and verifies checkpoints against their
manifests); their format is the trainer's, documented in ``newtonlm/training/checkpoint.py``.
``checks`` pairs tokenizers with models and checks weight files, ``quiet`` keeps the libraries'
progress bars and expected warnings off the console. Evaluation reads run directories through this package.
Layering: uses newtonlm.models, newtonlm.kernels and newtonlm.data; never imports newtonlm.training or
newtonlm.eval.
"""

from .checks import check_vocabulary, check_weight_files, embedding_rows
from .cli import main
from .folder import DTYPES, ExportResult, build_exported_model, export_checkpoint
from .hub import check_hub_access, push_to_hub
from .quiet import known_accelerator, no_transformers_bars
from .source import (
    Checkpoint,
    ExportError,
    check_tokenizer,
    is_run_dir,
    read_checkpoint,
    read_manifest,
    read_run_config,
    read_tokenizer,
    verify_files,
)

__all__ = [
    "DTYPES", "Checkpoint", "ExportError", "ExportResult", "build_exported_model", "check_hub_access",
    "check_tokenizer", "check_vocabulary", "check_weight_files", "embedding_rows", "export_checkpoint",
    "is_run_dir", "known_accelerator", "main", "no_transformers_bars", "push_to_hub", "read_checkpoint",
    "read_manifest", "read_run_config", "read_tokenizer", "verify_files",
]
