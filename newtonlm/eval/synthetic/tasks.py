"""Synthetic sequence tasks where the recurrence's nonlinearity matters, as deterministic generators.

Every task maps a length L and a seeded ``numpy.random.Generator`` to a batch::

    inputs  int64 [B, L]   token ids in [0, vocab_size)
    targets int64 [B, L]   the answer expected from the model's output at that position, or -100
                           (not scored)

The model reads ``inputs`` causally and is scored on its logits at the scored positions (a
transduction, not next-token prediction of the input).

* ``parity``: bits x_t in {0, 1}; target at every t: x_1 + ... + x_t mod 2 (state tracking in Z_2,
  which diagonal linear recurrences with positive decay cannot represent at arbitrary length).
* ``modcount``: x_t in {0, ..., m-1}; target at every t: x_1 + ... + x_t mod m (the cyclic group Z_m).
* ``recall`` (multi-query associative recall): n = min(num_keys, L // 3) pairs ``k v`` with distinct
  keys (ids [0, K)) and values (ids [K, K + V)), then L - 2n queries, each a key of the pairs;
  target at a query: its value.
* ``selective_copy``: ``num_tokens`` data tokens (ids [0, A)) at random positions among distractor
  tokens (ids [A, A + D)) in the first L - num_tokens positions, then ``num_tokens`` copy markers
  (id A + D); target at the i-th marker: the i-th data token (in order), distractors ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TASKS = ("parity", "modcount", "recall", "selective_copy")
IGNORE = -100


@dataclass
class TaskConfig:
    """Parameters of the tasks (each task reads its own): ``modulus`` (modcount), ``num_keys`` /
    ``num_values`` (recall), ``num_tokens`` / ``alphabet`` / ``distractors`` (selective_copy: data
    tokens to copy, data alphabet size, distractor alphabet size)."""

    modulus: int = 5
    num_keys: int = 64
    num_values: int = 16
    num_tokens: int = 4
    alphabet: int = 8
    distractors: int = 8


def vocab_size(task: str, cfg: TaskConfig) -> int:
    """Size of the task's token vocabulary (inputs and answers)."""
    sizes = {"parity": 2, "modcount": cfg.modulus, "recall": cfg.num_keys + cfg.num_values,
             "selective_copy": cfg.alphabet + cfg.distractors + 1}
    if task not in sizes:
        raise ValueError(f"task={task!r}; expected one of {TASKS}")
    return sizes[task]


def min_length(task: str, cfg: TaskConfig) -> int:
    """The shortest length the task is defined for."""
    return {"parity": 1, "modcount": 1, "recall": 4, "selective_copy": 2 * cfg.num_tokens}[task]


def _running_mod(rng: np.random.Generator, batch: int, length: int, m: int):
    x = rng.integers(0, m, size=(batch, length))
    return x, np.cumsum(x, axis=1) % m


def _recall(rng: np.random.Generator, batch: int, length: int, cfg: TaskConfig):
    K, V = cfg.num_keys, cfg.num_values
    n = min(K, length // 3)
    keys = np.argsort(rng.random((batch, K)), axis=1)[:, :n]        # n distinct keys per row
    values = K + rng.integers(0, V, size=(batch, n))
    which = rng.integers(0, n, size=(batch, length - 2 * n))         # the pair each query asks for
    rows = np.arange(batch)[:, None]
    inputs = np.empty((batch, length), dtype=np.int64)
    inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2] = keys, values
    inputs[:, 2 * n:] = keys[rows, which]
    targets = np.full((batch, length), IGNORE, dtype=np.int64)
    targets[:, 2 * n:] = values[rows, which]
    return inputs, targets


def _selective_copy(rng: np.random.Generator, batch: int, length: int, cfg: TaskConfig):
    A, D, M = cfg.alphabet, cfg.distractors, cfg.num_tokens
    body = length - M
    inputs = A + rng.integers(0, D, size=(batch, length))             # distractors everywhere
    data = rng.integers(0, A, size=(batch, M))
    where = np.sort(np.argsort(rng.random((batch, body)), axis=1)[:, :M], axis=1)
    rows = np.arange(batch)[:, None]
    inputs[rows, where] = data
    inputs[:, body:] = A + D                                          # copy markers
    targets = np.full((batch, length), IGNORE, dtype=np.int64)
    targets[:, body:] = data
    return inputs, targets


def generate(task: str, cfg: TaskConfig, batch: int, length: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), both int64 ``[batch, length]`` (module docstring)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}; expected one of {TASKS}")
    if batch < 1 or length < min_length(task, cfg):
        raise ValueError(f"batch={batch}, length={length}; expected batch >= 1 and length >= "
                         f"{min_length(task, cfg)} for task {task!r}")
    if task == "parity":
        x, y = _running_mod(rng, batch, length, 2)
    elif task == "modcount":
        if cfg.modulus < 2:
            raise ValueError(f"modulus={cfg.modulus}; expected >= 2")
        x, y = _running_mod(rng, batch, length, cfg.modulus)
    elif task == "recall":
        if cfg.num_keys < 1 or cfg.num_values < 2:
            raise ValueError(f"num_keys={cfg.num_keys}, num_values={cfg.num_values}; expected >= 1 and >= 2")
        x, y = _recall(rng, batch, length, cfg)
    else:
        if cfg.num_tokens < 1 or cfg.alphabet < 2 or cfg.distractors < 1:
            raise ValueError(f"num_tokens={cfg.num_tokens}, alphabet={cfg.alphabet}, distractors="
                             f"{cfg.distractors}; expected >= 1, >= 2, >= 1")
        x, y = _selective_copy(rng, batch, length, cfg)
    return x.astype(np.int64), y.astype(np.int64)


def batch_rng(seed: int, task: str, purpose: int, index: int) -> np.random.Generator:
    """The generator of one batch: a function of (seed, task, purpose, index) only, so every batch
    is reproducible on its own (purpose 0: training step ``index``; 1: evaluation at length
    ``index``)."""
    return np.random.default_rng([seed, TASKS.index(task), purpose, index])
