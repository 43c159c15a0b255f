"""newtonlm.export: training run directories -> Hugging Face model folders (and the Hub).

``python -m newtonlm.export`` (``cli``) writes the folder of a checkpoint (``folder``), with a model
card (``card``) and, for the ParaRNN models, the self-contained remote code (``bundle``), and uploads
it (``hub``). ``source`` reads run directories on its own; their format is the trainer's, documented
in ``newtonlm/training/checkpoint.py``. Evaluation reads run directories through this package.
Layering: uses newtonlm.models, newtonlm.kernels and newtonlm.data; never imports newtonlm.training or
newtonlm.eval.
"""

from .cli import main
from .folder import DTYPES, ExportResult, build_exported_model, export_checkpoint
from .hub import check_hub_access, push_to_hub
from .source import Checkpoint, ExportError, is_run_dir, read_checkpoint, read_run_config, read_tokenizer

__all__ = [
    "DTYPES", "Checkpoint", "ExportError", "ExportResult", "build_exported_model", "check_hub_access",
    "export_checkpoint", "is_run_dir", "main", "push_to_hub", "read_checkpoint", "read_run_config",
    "read_tokenizer",
]
