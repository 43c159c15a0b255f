"""Per-token negative log-likelihood of long sequences, for every architecture.

``token_nll(model, ids, ...)`` scores the targets ``ids[:, 1:]`` of a batch ``ids [B, T + 1]`` and
returns ``nll [B, T]`` in nats (fp32), target ``j`` predicted from ``ids[:, :j + 1]``, however long
T is relative to the model's training length:

* ``recurrent`` (ParaRNN, Mamba2): the sequence is fed in chunks of ``chunk`` tokens, each call
  continuing from the state (cache) the previous one returned, so the state is carried over the
  whole sequence and memory stays bounded. Identical (up to rounding) to one forward over T.
* ``window`` (attention models beyond their context): a sliding window of ``chunk`` tokens moving
  by ``stride``; the first window scores its first ``chunk`` targets, each later one only its last
  ``stride`` targets, so every target is scored once with at least ``chunk - stride`` tokens of
  context (the usual strided perplexity of a fixed-context model).
* ``full``: one forward over the whole sequence (for an attention model beyond its context this
  measures position extrapolation, e.g. RoPE beyond the trained length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STRATEGIES = ("recurrent", "window", "full")


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, n, V], targets [B, n] -> nll [B, n] (fp32)."""
    B, n, V = logits.shape
    return F.cross_entropy(logits.float().reshape(B * n, V), targets.reshape(B * n),
                           reduction="none").reshape(B, n)


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, strategy: str, chunk: int, stride: int | None = None) -> torch.Tensor:
    """NLL ``[B, T]`` of the targets ``ids[:, 1:]`` of ``ids [B, T + 1]`` (see the module docstring).

    ``chunk``: tokens per forward call (recurrent) or window length (window); ``stride``: window
    step (default ``chunk // 2``), ignored by the other strategies."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; expected one of {STRATEGIES}")
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids has shape {tuple(ids.shape)}; expected [B, T + 1] with T >= 1")
    if chunk < 1:
        raise ValueError(f"chunk={chunk}; expected a positive number of tokens")
    inputs, targets = ids[:, :-1], ids[:, 1:]
    T = inputs.shape[1]
    if strategy == "full" or (strategy == "window" and T <= chunk):
        return _nll(model(input_ids=inputs, use_cache=False).logits, targets)
    if strategy == "recurrent":
        cache, parts = None, []
        for start in range(0, T, chunk):
            out = model(input_ids=inputs[:, start:start + chunk], cache=cache, use_cache=True)
            cache = out.cache
            parts.append(_nll(out.logits, targets[:, start:start + chunk]))
        return torch.cat(parts, dim=1)
    stride = chunk // 2 if stride is None else stride
    if not 1 <= stride <= chunk:
        raise ValueError(f"stride={stride}; expected 1 <= stride <= chunk={chunk}")
    nll = torch.empty(targets.shape, dtype=torch.float32, device=ids.device)
    nll[:, :chunk] = _nll(model(input_ids=inputs[:, :chunk], use_cache=False).logits, targets[:, :chunk])
    done = chunk  # targets [0, done) are scored
    while done < T:
        end = min(done + stride, T)
        start = end - chunk  # the window [start, end) ends at the last new target
        logits = model(input_ids=inputs[:, start:end], use_cache=False).logits[:, done - start:]
        nll[:, done:end] = _nll(logits, targets[:, done:end])
        done = end
    return nll
