"""Zipf-distributed sampling over a ranked list: P(rank k) is proportional to 1 / k**s (numpy, seeded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")
DEFAULT_EXPONENT = 1.1


def zipf_probabilities(n: int, s: float = DEFAULT_EXPONENT) -> np.ndarray:
    """P(rank k) for k = 1..n, proportional to 1 / k**s and summing to 1."""
    if n < 1:
        raise ValueError(f"zipf: need at least one item, got {n}")
    if s < 0:
        raise ValueError(f"zipf: exponent must be >= 0, got {s}")
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return weights / weights.sum()


def shuffled(items: Sequence[T], seed: int) -> list[T]:
    """`items` in an order fixed by `seed` (the ranking of users: file order, shuffled once)."""
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


class ZipfSampler(Generic[T]):
    """Draws items by rank: `items[0]` is rank 1, the most likely. Deterministic given `seed`."""

    def __init__(self, items: Sequence[T], s: float = DEFAULT_EXPONENT, seed: int = 0) -> None:
        self.items = list(items)
        self.s = s
        self._cdf = np.cumsum(zipf_probabilities(len(self.items), s))
        self._cdf[-1] = 1.0  # no draw may fall past the last rank through rounding
        self._rng = np.random.default_rng(seed)

    def ranks(self, size: int) -> np.ndarray:
        """`size` 0-based ranks drawn from the Zipf distribution."""
        return np.searchsorted(self._cdf, self._rng.random(size), side="right")

    def sample(self) -> T:
        """One item."""
        return self.items[int(self.ranks(1)[0])]

    def sample_many(self, size: int) -> list[T]:
        """`size` items, drawn independently (repeats possible)."""
        return [self.items[int(r)] for r in self.ranks(size)]
