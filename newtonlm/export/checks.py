"""Checks of what export and evaluation pair and load, before it can fail deep inside a library:

* :func:`check_vocabulary`: every id the tokenizer can produce has a row in the model's embedding
  (a swapped or retrained tokenizer folder otherwise crashes inside ``nn.Embedding`` with
  ``IndexError: index out of range in self``, or silently reads the wrong rows);
* :func:`check_weight_files`: the ``*.safetensors`` files of a Hugging Face folder open (a truncated
  file otherwise surfaces as ``SafetensorError: incomplete metadata`` with no path).

Errors are :class:`ExportError` (a ``ValueError``) naming both sides and what to do.
"""

from __future__ import annotations

from pathlib import Path

from .source import ExportError


def token_ids_needed(tokenizer) -> int:
    """Rows an embedding needs for ``tokenizer``: its largest id (added tokens included) + 1."""
    from newtonlm.data.tokenizer import max_token_id

    return max_token_id(tokenizer) + 1


def embedding_rows(model) -> int:
    """Rows of the model's input embedding (= its vocabulary size)."""
    return int(model.get_input_embeddings().weight.shape[0])


def check_vocabulary(tokenizer, rows: int, tokenizer_at, model_at) -> None:
    """Refuse a tokenizer with ids beyond an embedding of ``rows`` rows. ``tokenizer_at`` /
    ``model_at`` name where each came from (paths) in the message."""
    needed = token_ids_needed(tokenizer)
    if needed > rows:
        raise ExportError(
            f"the tokenizer at {tokenizer_at} produces token ids up to {needed - 1} (max token id + 1 = "
            f"{needed}), but the model at {model_at} has an embedding of {rows} rows: this tokenizer is not "
            "the one the model was trained with (a swapped or retrained tokenizer folder). Use the model's "
            "own tokenizer (the one saved with it)")


def check_weight_files(folder: Path) -> None:
    """Open the header of every ``*.safetensors`` file in ``folder`` (cheap: memory-mapped, the tensors
    are not read); a truncated or damaged one is an error naming the file."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # SafetensorError (header, size), OSError
            raise ExportError(
                f"cannot read {file} ({file.stat().st_size:,} bytes): {type(err).__name__}: {err}; the "
                "weights file is truncated or damaged (an interrupted copy or download?): copy or export the "
                "folder again") from err
