"""The model card (``README.md``) of an exported model, generated from the checkpoint's config and the
run's records: architecture and size, training data and settings, tokens seen, the validation loss
measured by the trainer at the exported step (``metrics.jsonl``), the results in ``<run>/eval.json``
when it exists, and how to load the model.

Local file paths of the training data are not written (only their count): a card is meant to be
published.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .source import Checkpoint

ARCH_TEXT = {
    "paragru": ("ParaGRU", "ParaRNN language model with the ParaGRU cell (a GRU with diagonal recurrence), "
                "applied in parallel over the sequence by Newton's method and a parallel scan (ParaRNN, "
                "Danieli et al., arXiv 2510.21450); blocks of a gated recurrent mixer and a SwiGLU MLP."),
    "paralstm": ("ParaLSTM", "ParaRNN language model with the ParaLSTM cell (CIFG LSTM with peepholes, "
                 "2x2-block recurrence), applied in parallel over the sequence by Newton's method and a "
                 "parallel scan (ParaRNN, Danieli et al., arXiv 2510.21450); blocks of a gated recurrent "
                 "mixer and a SwiGLU MLP."),
    "llama": ("Transformer (Llama)", "Transformer baseline: transformers' Llama architecture (RoPE, SwiGLU, "
              "RMSNorm)."),
    "mamba2": ("Mamba2", "State-space baseline: transformers' Mamba2 architecture."),
}
REMOTE_CODE = ("paragru", "paralstm")


def validation_record(run_dir: Path, step: int) -> dict | None:
    """The trainer's last validation record at ``step`` in ``metrics.jsonl`` (None if there is none;
    damaged lines, e.g. a crash mid-write, are skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "val" and rec.get("step") == step:
            found = rec
    return found


def _numeric_leaves(obj, prefix: str = "") -> list[tuple[str, float]]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [(prefix, obj)] if math.isfinite(obj) else []
    if isinstance(obj, dict):
        return [row for k, v in obj.items()
                for row in _numeric_leaves(v, f"{prefix} / {k}" if prefix else str(k))]
    return []


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _table(rows: list, head: list[str] | None = None) -> str:
    """A markdown table of rows (sequences of cell strings); ``head`` empty by default."""
    head = head or [""] * len(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# perplexity results (newtonlm.eval.perplexity, written by newtonlm.eval.compare as {name: result})
EVAL_COLUMNS = (("eval_len", "sequence length"), ("tokens", "tokens"), ("loss", "loss (nats/token)"),
                ("ppl", "perplexity"), ("bits_per_byte", "bits/byte"))


def evaluation_table(run_dir: Path, tag: str) -> tuple[str | None, str | None]:
    """(markdown table, note) of ``<run>/eval.json``: one row per perplexity result (``{name: {loss,
    ppl, ...}}``), else every numeric entry; the note says why nothing is shown (unreadable, or the
    results of another checkpoint, recognized by the tag in their ``source``)."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        return None, f"eval.json is unreadable ({type(err).__name__})"
    if not isinstance(data, dict):
        return None, "eval.json is not a JSON object"
    results = {k: v for k, v in data.items() if isinstance(v, dict) and "loss" in v}
    for result in results.values():
        source = result.get("source")
        if isinstance(source, str) and source.endswith(")") and not source.endswith(f"({tag})"):
            other = source.rsplit("(", 1)[-1][:-1]
            return None, f"eval.json holds results of checkpoint {other}, not of the exported {tag}"
    if results:
        rows = [[name] + [_fmt(r.get(key)) for key, _ in EVAL_COLUMNS] for name, r in results.items()]
        return _table(rows, ["evaluation"] + [label for _, label in EVAL_COLUMNS]), None
    rows = [[k, _fmt(v)] for k, v in _numeric_leaves(data)]
    return (_table(rows, ["metric", "value"]), None) if rows else (None, None)


def _model_rows(ckpt: Checkpoint, params: dict, vocab: int, dtype: str) -> list[tuple[str, str]]:
    m = ckpt.config["model"]
    rows = [("architecture", ARCH_TEXT[ckpt.arch][0]),
            ("parameters", f"{params['total']:,} ({params['non_embedding']:,} without the tied embedding)"),
            ("layers", str(m.get("num_hidden_layers", "?"))), ("hidden size", str(m.get("hidden_size", "?"))),
            ("vocabulary", f"{vocab:,} (embedding tied to the LM head)"),
            ("weights", f"{dtype} safetensors")]
    if ckpt.arch in REMOTE_CODE:
        rows.append(("recurrence solver", f"cell_mode={m.get('cell_mode', 'auto')!r} (auto: compiled "
                     "sequential loop on CPU, fused Triton Newton kernels on CUDA)"))
    return rows


def _data_lines(config: dict) -> list[str]:
    data = config.get("data", {})
    lines = []
    for name, src in data.get("sources", {}).items():
        kind = src.get("kind", "?")
        what = {"shakespeare": "bundled Shakespeare plays (public domain)",
                "bible": "bundled King James Bible (public domain)"}.get(kind)
        if kind == "hub":
            config = f" ({src['hub_config']})" if src.get("hub_config") else ""
            what = f"Hugging Face dataset `{src.get('hub_name')}`{config}, split {src.get('hub_split')}"
        elif kind == "files":
            what = f"local files ({len(src.get('paths', []))} paths)"
        lines.append(f"- `{name}`: {what or kind}, weight {src.get('weight', 1.0)}")
    tok = data.get("tokenizer", {})
    if tok.get("pretrained"):
        lines.append(f"- tokenizer: pretrained `{tok['pretrained']}`")
    else:
        lines.append(f"- tokenizer: byte-level BPE trained on the training split "
                     f"({tok.get('vocab_size')} entries)")
    if data.get("val_fraction"):
        lines.append(f"- validation: {data['val_fraction']:.0%} of the documents held out")
    return lines


def _training_rows(ckpt: Checkpoint) -> list[tuple[str, str]]:
    t = ckpt.config.get("train", {})
    # the run's global batch (recorded since elastic resume); older runs: micro x accum x world size
    # (before sequence parallelism every rank read its own sequences)
    sequences = t.get("global_batch_size") or (t.get("micro_batch_size", 0) * t.get("grad_accum", 1)
                                               * ckpt.world_size)
    tokens_per_step = sequences * t.get("seq_len", 0)
    return [("checkpoint", f"step {ckpt.step:,} (`{ckpt.tag}`)"),
            ("tokens seen", f"{ckpt.tokens_seen:,}"),
            ("sequence length", str(t.get("seq_len", "?"))),
            ("batch", f"{tokens_per_step:,} tokens per step"),
            ("optimizer", f"AdamW, lr {t.get('lr')}, {t.get('schedule')} schedule, weight decay "
                          f"{t.get('weight_decay')}"),
            ("engine", f"DeepSpeed ZeRO stage {ckpt.zero_stage}, {ckpt.world_size} process(es), "
                       f"{t.get('precision')} precision")]


def _usage(ckpt: Checkpoint, name: str) -> str:
    remote = ", trust_remote_code=True" if ckpt.arch in REMOTE_CODE else ""
    return (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{name}"{remote})\n'
        f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})\n'
        'ids = tokenizer("ROMEO:", return_tensors="pt").input_ids\n'
        "out = model.generate(ids, max_new_tokens=50, do_sample=True, top_k=40)\n"
        "print(tokenizer.decode(out[0]))\n"
        "```")


def model_card(ckpt: Checkpoint, params: dict, vocab: int, dtype: str, name: str) -> str:
    """The ``README.md`` text; ``name`` is the repo id (or folder) used in the loading snippet."""
    title, description = ARCH_TEXT[ckpt.arch]
    tags = ["newtonlm", ckpt.arch] + (["pararnn", "rnn"] if ckpt.arch in REMOTE_CODE else [])
    parts = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {title} language model ({params['total']:,} parameters)", "",
             description + " Trained with newtonlm and exported from its DeepSpeed checkpoint with "
             "`python -m newtonlm.export`.", "",
             "## Model", "", _table(_model_rows(ckpt, params, vocab, dtype)), "",
             "## Training data", "", *_data_lines(ckpt.config), "",
             "## Training", "", _table(_training_rows(ckpt)), "", "## Evaluation", ""]
    val = validation_record(ckpt.run_dir, ckpt.step)
    if val is not None and isinstance(val.get("val_loss"), (int, float)):
        parts.append(f"Validation (held-out split, {val.get('val_tokens', 0):,} tokens, measured by the "
                     f"trainer at step {ckpt.step:,}): loss **{val['val_loss']:.4f}** nats/token, perplexity "
                     f"**{val.get('val_ppl', math.exp(min(val['val_loss'], 50))):.2f}**.")
    else:
        parts.append(f"No validation result was recorded at step {ckpt.step:,}.")
    table, note = evaluation_table(ckpt.run_dir, ckpt.tag)
    if table:
        parts += ["", "Evaluation (`eval.json`, `newtonlm.eval`):", "", table]
    elif note:
        parts += ["", f"({note}.)"]
    parts += ["", "## Usage", "", _usage(ckpt, name), ""]
    if ckpt.arch in REMOTE_CODE:
        parts += ["The modeling code ships with the weights (`trust_remote_code=True`; the tokenizer is a "
                  "plain fast tokenizer, the flag only spares transformers' prompt, as AutoTokenizer reads "
                  "`config.json`): it needs only "
                  "`torch` and `transformers`, runs on CPU (a small C kernel is compiled with the system "
                  "compiler when one is present, PyTorch loops otherwise) and uses the Triton kernels on "
                  "CUDA when `triton` is installed (without it, the PyTorch solver). `newtonlm_kernels.py` "
                  "carries newtonlm's kernel package as text and, on first load, writes it to "
                  "`~/.cache/newtonlm/bundles/` (`NEWTONLM_CACHE` overrides) and imports it from there. "
                  "A recurrent model supports right padding only.", ""]
    parts += ["## Limitations", "",
              "A research model trained on a small corpus: it produces text in the style of its training "
              "data, with no instruction tuning or safety filtering.", ""]
    return "\n".join(parts)
