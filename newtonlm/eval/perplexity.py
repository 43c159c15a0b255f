"""Perplexity, bits per byte and the per-position loss curve on held-out text.

    python -m newtonlm.eval.perplexity MODEL [data overrides] [--split val] [--eval-factor 4] [--json]

MODEL is a training run directory (DeepSpeed checkpoint) or a Hugging Face folder. The text is the
configured split (default: the run's own data config and its held-out ``val`` split; for a Hugging
Face folder ``data=shakespeare``), tokenized with the model's tokenizer into one stream (see
``corpus``) and cut into sequences of ``eval_len`` targets (default 4 x the training length), each
scored from an empty state:

* ``loss`` / ``ppl``: mean NLL (nats) over every target (text tokens and document separators, as the
  trainer's validation loss) and its exponential;
* ``bits_per_byte``: NLL of the text tokens (separators excluded, as lm-evaluation-harness) over
  ``ln 2 x`` the UTF-8 bytes of the documents: independent of the tokenizer;
* the curve: mean NLL by target position in the sequence (position p = p tokens of context), out to
  ``eval_len``: how the loss behaves beyond the training length (length extrapolation, and state
  collapse of recurrent models as in "Stuffed Mamba"). Recurrent models (ParaRNN, Mamba2) carry
  their state through the whole sequence; attention models use a sliding window of their context
  beyond it (``--attention full``: one forward, i.e. position extrapolation).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from newtonlm.export import check_vocabulary, embedding_rows

from .corpus import TokenStream, split_documents, token_stream, windows
from .loading import LoadedModel, is_run_dir, load_for_eval
from .scoring import token_nll

LN2 = math.log(2.0)


def position_bins(context: int, eval_len: int) -> list[int]:
    """Bin edges of the curve: 0, 1, 2, 4, ... (powers of two below ``context``), ``context``, then
    every ``context / 2`` up to ``eval_len`` (the last edge is ``eval_len``)."""
    edges, p = [0], 1
    while p < min(context, eval_len):
        edges.append(p)
        p *= 2
    step = max(1, context // 2)
    p = min(context, eval_len)
    while p < eval_len:
        edges.append(p)
        p += step
    edges.append(eval_len)
    return sorted(set(edges))


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def evaluate_stream(loaded: LoadedModel, stream: TokenStream, eval_len: int, batch_size: int = 8,
                    attention: str = "window", chunk: int | None = None, stride: int | None = None,
                    progress: bool = False) -> dict:
    """Score ``stream`` in sequences of ``eval_len`` targets; returns the metrics dict (module
    docstring): totals, ``loss``, ``ppl``, ``bits_per_byte``, ``in_context`` / ``beyond_context``
    (loss and ppl of positions below / at or above the context length), the binned ``curve`` and
    the raw per-position sums ``position_nll_sum`` / ``position_count`` (length ``eval_len``).

    ``chunk``: tokens per forward call of a recurrent model / window of an attention model (default:
    the context length); ``stride``: window step (default chunk // 2)."""
    if eval_len < 1 or batch_size < 1:
        raise ValueError(f"eval_len={eval_len}, batch_size={batch_size}; expected positive integers")
    if attention not in ("window", "full"):
        raise ValueError(f"attention={attention!r}; expected 'window' or 'full'")
    # ids beyond the embedding would fail deep in nn.Embedding ("index out of range in self")
    check_vocabulary(loaded.tokenizer, embedding_rows(loaded.model), f"{loaded.source} (tokenizer)",
                     loaded.source)
    chunk = chunk or loaded.context
    strategy = "recurrent" if loaded.recurrent else attention
    device = next(loaded.model.parameters()).device
    pos_sum = np.zeros(eval_len, dtype=np.float64)
    pos_count = np.zeros(eval_len, dtype=np.int64)
    nats = text_nats = 0.0
    seqs = list(windows(stream, eval_len))
    full = [s for s in seqs if len(s[1]) == eval_len]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in seqs if len(s[1]) < eval_len]
    t0 = time.perf_counter()
    bar = tqdm(batches, desc=f"scoring {len(seqs)} sequences of {eval_len} tokens", unit="batch",
               disable=not progress, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)  # a log file: a line per 30 s
    for batch in bar:
        ids = torch.as_tensor(np.stack([s[0] for s in batch]), device=device)
        mask = np.stack([s[1] for s in batch])
        nll = token_nll(loaded.model, ids, strategy, chunk, stride).double().cpu().numpy()
        n = nll.shape[1]
        pos_sum[:n] += nll.sum(0)
        pos_count[:n] += nll.shape[0]
        nats += float(nll.sum())
        text_nats += float(nll[mask].sum())
    seconds = time.perf_counter() - t0
    n_targets, n_text = stream.n_targets, int(stream.text_mask.sum())
    assert int(pos_count.sum()) == n_targets
    loss = nats / n_targets
    result = {
        "source": loaded.source, "arch": loaded.arch, "context": loaded.context, "eval_len": eval_len,
        "strategy": strategy, "chunk": chunk,
        "stride": (stride or chunk // 2) if strategy == "window" else None,
        "docs": stream.n_docs, "tokens": n_targets, "text_tokens": n_text, "bytes": stream.n_bytes,
        "nats": nats, "loss": loss, "ppl": _ppl(loss),
        "bits_per_byte": text_nats / (LN2 * stream.n_bytes),
        "bytes_per_token": stream.n_bytes / n_text,
        "seconds": seconds, "tokens_per_s": n_targets / seconds if seconds > 0 else None,
    }
    parts = (("in_context", slice(0, loaded.context)), ("beyond_context", slice(loaded.context, None)))
    for name, sl in parts:
        count = int(pos_count[sl].sum())
        part = float(pos_sum[sl].sum()) / count if count else None
        result[name] = {"tokens": count, "loss": part, "ppl": None if part is None else _ppl(part)}
    edges = position_bins(loaded.context, eval_len)
    curve = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        count = int(pos_count[lo:hi].sum())
        part = float(pos_sum[lo:hi].sum()) / count if count else None
        curve.append({"start": lo, "end": hi, "tokens": count, "loss": part,
                      "ppl": None if part is None else _ppl(part)})
    result["curve"] = curve
    result["position_nll_sum"] = pos_sum.tolist()
    result["position_count"] = pos_count.tolist()
    return result


def data_config_for(model_path: Path, overrides: list[str]):
    """The data config to read: the run's own (``config.yaml``) with ``data.<field>=`` overrides
    applied, unless a ``data=<name>`` override picks a config from ``configs/data/``, or the model is
    a Hugging Face folder (then ``data=shakespeare`` by default)."""
    from omegaconf import OmegaConf

    from newtonlm.data import compose_data_config, load_data_config
    from newtonlm.export import read_run_config

    for o in overrides:
        if not (o.startswith("data=") or o.startswith("data.")):
            raise ValueError(f"override {o!r}: expected data=<name> or data.<field>=<value>")
    if is_run_dir(model_path) and not any(o.startswith("data=") for o in overrides):
        base = OmegaConf.create(read_run_config(model_path)["data"])
        dotlist = [o[len("data."):] for o in overrides]
        return load_data_config(OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist)))
    return compose_data_config(overrides)


def format_table(r: dict) -> str:
    lines = [
        f"model: {r['source']} ({r['arch']}, context {r['context']}, {r['strategy']}"
        + (f", stride {r['stride']}" if r["stride"] else "") + ")",
        f"text: {r['docs']} documents, {r['bytes']:,} bytes, {r['tokens']:,} targets "
        f"({r['text_tokens']:,} text tokens, {r['bytes_per_token']:.2f} bytes/token), sequences of "
        f"{r['eval_len']}",
        f"loss {r['loss']:.4f} nats/token   perplexity {r['ppl']:.2f}   bits/byte {r['bits_per_byte']:.4f}",
    ]
    for name in ("in_context", "beyond_context"):
        part = r[name]
        if part["tokens"]:
            lines.append(f"  {name.replace('_', ' '):<15} loss {part['loss']:.4f}  ppl {part['ppl']:.2f}  "
                         f"({part['tokens']:,} targets)")
    lines += ["", f"{'positions':>13} {'targets':>9} {'loss':>8} {'ppl':>9}"]
    for b in r["curve"]:
        if b["tokens"]:
            lines.append(f"{b['start']:>6}-{b['end'] - 1:<6} {b['tokens']:>9,} {b['loss']:>8.4f} "
                         f"{b['ppl']:>9.2f}")
    lines.append(f"\n{r['seconds']:.1f} s ({r['tokens_per_s']:,.0f} tokens/s)")
    return "\n".join(lines)


def run(model: str | Path, overrides: list[str] = (), split: str = "val", eval_len: int | None = None,
        eval_factor: float = 4.0, batch_size: int = 8, max_tokens: int | None = None, step: int | None = None,
        context: int | None = None, attention: str = "window", chunk: int | None = None,
        stride: int | None = None, device: str | None = None, dtype: str = "float32",
        progress: bool = False) -> dict:
    """Load ``model``, read the split, evaluate: the Python form of the command (same defaults)."""
    from newtonlm.data.sources import SPLITS

    path = Path(model)
    if split not in SPLITS:  # before loading anything
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(dtypes)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"loading {path} on {device}")
    loaded = load_for_eval(path, step=step, context=context, device=device, dtype=dtypes[dtype])
    for note in loaded.notes:  # what could not be verified (old checkpoints): shown even with --quiet
        print(f"note: {note}", file=sys.stderr, flush=True)
    if eval_len is None:
        if not eval_factor > 0:
            raise ValueError(f"eval_factor={eval_factor}; expected a positive number")
        eval_len = max(1, round(eval_factor * loaded.context))
    data_cfg = data_config_for(path, list(overrides))
    say(f"reading and tokenizing the {split} split of {', '.join(data_cfg.sources)}")
    stream = token_stream(split_documents(data_cfg, split), loaded.tokenizer, max_tokens)
    result = evaluate_stream(loaded, stream, eval_len, batch_size, attention, chunk, stride, progress)
    result["split"] = split
    result["data"] = list(data_cfg.sources)
    return result


def main(argv: list[str] | None = None) -> None:
    from newtonlm.data.config import split_overrides

    overrides, options = split_overrides(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run directory (config.yaml + checkpoints/) or Hugging Face folder")
    p.add_argument("--split", default="val", help="val (held out, default), train or all")
    p.add_argument("--eval-len", type=int, help="targets per sequence (default: eval-factor x context)")
    p.add_argument("--eval-factor", type=float, default=4.0, help="eval_len / context (default 4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, help="stop after the document reaching this many targets")
    p.add_argument("--step", type=int, help="checkpoint step of a run (default: the newest complete one)")
    p.add_argument("--context", type=int, help="context length (default: the run's seq_len, or the "
                   "config's max_position_embeddings)")
    p.add_argument("--attention", default="window", choices=("window", "full"),
                   help="attention models beyond their context: sliding window (default) or one forward")
    p.add_argument("--chunk", type=int, help="tokens per forward call / window length (default: context)")
    p.add_argument("--stride", type=int, help="sliding-window step (default: chunk // 2)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--json", action="store_true", help="print the result as JSON (with the raw curve)")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(options)
    try:
        result = run(args.model, overrides, args.split, args.eval_len, args.eval_factor, args.batch_size,
                     args.max_tokens, args.step, args.context, args.attention, args.chunk, args.stride,
                     args.device, args.dtype, progress=not args.quiet)
    except ValueError as err:  # a problem the user can fix (ExportError, DataError ...): one line, exit 2
        print(f"newtonlm perplexity: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        sys.exit(2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1) if args.json else format_table(result))


if __name__ == "__main__":
    main()
