"""Evaluation: perplexity and bits per byte, lm-evaluation-harness, a synthetic capability suite,
and the scaling comparison. See docs/eval.md.

Commands::

    python -m newtonlm.eval.perplexity MODEL [data overrides] [--json]   # ppl, bits/byte, position curve
    python -m newtonlm.eval.harness write-task --out DIR                 # local lm_eval task
    python -m newtonlm.eval.harness run MODEL --tasks-dir DIR            # lm_eval on a newtonlm model
    python -m newtonlm.eval.synthetic [hydra overrides]                  # parity, modcount, recall, copy
    python -m newtonlm.eval.compare [scale=cpu|cluster] [overrides]      # 4 architectures x sizes
    python -m newtonlm.eval.sweep sweep=NAME [--dry-run]                 # a sweep: local, Slurm, hostfile
    python -m newtonlm.eval.scaling SWEEP_DIR                            # power-law fits, crossings

MODEL is a training run directory (DeepSpeed checkpoint) or a Hugging Face folder. Modules, in the
order data flows: ``loading`` (model + tokenizer + context length), ``corpus`` (held-out text as a
token stream with its byte count), ``scoring`` (per-token NLL of long sequences: recurrent state,
sliding window, full), ``perplexity``, ``harness``, ``synthetic/`` (tasks, train, command),
``sizes`` (preset + overrides), ``compare``, ``sweep`` (plans and runs sweeps), ``scaling``
(fits), ``plots``.

Names are imported on first use, so that ``python -m newtonlm.eval.<tool>`` runs its module without
the package having imported it already.
"""

from importlib import import_module

_LAZY = {
    "LoadedModel": "loading", "load_for_eval": "loading",
    "TokenStream": "corpus", "split_documents": "corpus", "token_stream": "corpus",
    "evaluate_stream": "perplexity", "token_nll": "scoring",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
