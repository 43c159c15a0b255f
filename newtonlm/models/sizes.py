"""Exact parameter counts of every preset: ``python -m newtonlm.models.sizes [--json] [--vocab V]``.

Each model is built on the meta device (structure only, no memory). Counts: total (the tied head
counted once) and non-embedding (without the token embedding), at the reference vocabulary of each
size (``presets.REFERENCE_VOCAB``) unless ``--vocab`` is given; the last column compares the total
with the Llama preset of the same size.
"""

from __future__ import annotations

import argparse
import json

import torch

from .factory import build_model, count_parameters
from .presets import REFERENCE_VOCAB, SIZES, load_preset, preset_names


def preset_counts(name: str, vocab_size: int) -> dict[str, int]:
    """``{"total", "non_embedding"}`` of preset ``name`` at ``vocab_size``, built on meta."""
    with torch.device("meta"):
        model = build_model(load_preset(name), vocab_size)
    return count_parameters(model)


def table(vocab_size: int | None = None) -> list[dict]:
    """One row per preset: ``{preset, arch, size, vocab_size, total, non_embedding, vs_llama}``."""
    rows = []
    for name in preset_names():
        arch, size = name.rsplit("_", 1)
        vocab = vocab_size or REFERENCE_VOCAB[size]
        rows.append({"preset": name, "arch": arch, "size": size, "vocab_size": vocab,
                     **preset_counts(name, vocab)})
    for size in SIZES:
        same = [r for r in rows if r["size"] == size]
        ref = next(r for r in same if r["arch"] == "llama")
        for r in same:
            r["vs_llama"] = r["total"] / ref["total"] - 1.0
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'preset':<15} {'vocab':>6} {'total':>15} {'non-embedding':>15} {'vs llama':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['preset']:<15} {r['vocab_size']:>6} {r['total']:>15,} {r['non_embedding']:>15,} "
                     f"{r['vs_llama']:>+9.1%}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size for every preset")
    args = p.parse_args(argv)
    if args.vocab is not None and args.vocab <= 0:
        p.error(f"--vocab={args.vocab}; expected a positive integer")
    rows = table(args.vocab)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
