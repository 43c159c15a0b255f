"""Counter-based randomness: every random choice of the pipeline is a pure function of integer keys
(seed, stream, purpose, counter). A resumable state therefore holds a counter instead of a
generator's internals, and a random order can be recomputed anywhere (any worker, any restart)."""

from __future__ import annotations

import hashlib

import numpy as np

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """The SplitMix64 finalizer: a bijective avalanche of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix64(*keys: int) -> int:
    """A uniformly distributed 64-bit integer determined by ``keys`` (non-negative integers)."""
    h = 0
    for key in keys:
        h = _splitmix64(h ^ (key & _MASK64))
    return h


def hash_text(text: str) -> int:
    """A stable 64-bit integer for a string (the same on every machine and Python process, unlike
    ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def random_below(n: int, *keys: int) -> int:
    """A uniform integer in ``[0, n)`` determined by ``keys`` (bias below n / 2**64)."""
    return mix64(*keys) % n


def uniform(*keys: int) -> float:
    """A uniform float in ``[0, 1)`` determined by ``keys``."""
    return (mix64(*keys) >> 11) / float(1 << 53)


class IndexPermutation:
    """A pseudo-random bijection of ``range(n)`` evaluated one index at a time in O(1) memory, so
    that a corpus of any size can be shuffled globally without materializing a permutation.

    A 4-round Feistel network on the smallest even number of bits covering ``n`` is a bijection of
    ``[0, 2**bits)``; re-applying it until the value falls below ``n`` (cycle walking) restricts it
    to a bijection of ``[0, n)`` (fewer than 4 applications on average since ``2**bits < 4 n``).
    """

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"IndexPermutation needs n >= 1, got {n}")
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.n = n
        self.key = key
        self._half = bits // 2
        self._mask = (1 << self._half) - 1

    def _feistel(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for r in range(self.ROUNDS):
            left, right = right, left ^ (mix64(self.key, r, right) & self._mask)
        return (left << self._half) | right

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} outside [0, {self.n})")
        x = self._feistel(index)
        while x >= self.n:
            x = self._feistel(x)
        return x


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """``_splitmix64`` on every element of a uint64 array (multiplications wrap modulo 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform_array(key: int, counters: np.ndarray) -> np.ndarray:
    """``uniform(key, c)`` for every ``c`` of ``counters`` (non-negative integers), float64, vectorized:
    the shard mixture draws one value per global sequence index."""
    x = np.asarray(counters, dtype=np.int64).astype(np.uint64) ^ np.uint64(mix64(key))
    return (_splitmix64_array(x) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
