"""Paired bootstrap confidence intervals for differences of per-user metrics.

Two models evaluated on the same users give two numbers per user; the question is whether the
mean of their *difference* is away from zero. Resampling users with replacement (the paired
bootstrap, e.g. Sakai 2006, "Evaluating evaluation metrics based on the bootstrap") keeps each
user's two numbers together, so the large between-user variance cancels out and the interval
reflects only how consistently one model beats the other.

All intervals of one report share one set of resamples drawn from one seed: the numbers are
reproducible, and intervals of different metrics are computed on the same resampled user sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """Mean difference and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.4f} (95% CI {self.low:+.4f}..{self.high:+.4f})"


# Draws per block while building the resample weights (8 MB of int64 each for draws and counts).
_BLOCK_DRAWS = 1 << 20


class PairedBootstrap:
    """Resample ``n`` users ``n_resamples`` times; compute intervals of mean differences.

    Args:
        n: number of users (rows of every array passed to ``interval``).
        n_resamples: bootstrap resamples.
        seed: the resamples are a function of ``(n, n_resamples, seed)`` only.
        level: coverage of the interval.

    >>> b = PairedBootstrap(4, n_resamples=200, seed=0)
    >>> b.interval(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0.25, 0.25, 0.25, 0.25]))
    Interval(mean=0.25, low=0.25, high=0.25)
    """

    def __init__(self, n: int, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> None:
        if n < 1 or n_resamples < 1:
            raise ValueError(f"need at least one user and one resample, got n={n}, n_resamples={n_resamples}")
        self.n, self.n_resamples, self.level = n, n_resamples, level
        rng = np.random.default_rng(seed)
        # Resample counts per user ([B, n]) rather than index lists: a mean over a resample is
        # then one matrix product, and all metrics share the same resamples. (Drawing indices and
        # counting them is ~10x faster than rng.multinomial with n categories.) The draws are made
        # and counted a block of resamples at a time, straight into the counts: consecutive
        # blocks read the generator's stream in the same order as one [B, n] draw (the same
        # counts), without [B, n] int64 draws beside them (~0.5 GB at 30k users). A user is drawn
        # a few times per resample at most, so the counts are kept in one byte each (uint16 if
        # ever needed): float64 weights were 2.4 GB at 300,000 users.
        self.counts = np.empty((n_resamples, n), dtype=np.uint8)
        block = max(1, _BLOCK_DRAWS // n)
        for start in range(0, n_resamples, block):
            rows = min(block, n_resamples - start)
            draws = rng.integers(0, n, size=(rows, n)) + np.arange(rows)[:, None] * n
            counts = np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n)
            if counts.max() > np.iinfo(self.counts.dtype).max:
                self.counts = self.counts.astype(np.uint16)
            self.counts[start : start + rows] = counts

    def resampled_means(self, values: np.ndarray) -> np.ndarray:
        """``[n_resamples, ...]`` means of ``values`` (``[n, ...]``) over each resample."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape[0] != self.n:
            raise ValueError(f"expected {self.n} rows (users), got {v.shape[0]}")
        v = v.reshape(self.n, -1)
        out = np.empty((self.n_resamples, v.shape[1]), dtype=np.float64)
        # The weights (counts / n, float64) of a few resamples at a time: ~64 MB whatever n.
        step = max(1, _BLOCK_DRAWS // self.n)
        for s in range(0, self.n_resamples, step):
            out[s : s + step] = (self.counts[s : s + step] / self.n) @ v
        return out

    def interval(self, a: np.ndarray, b: np.ndarray | None = None) -> Interval:
        """Interval of ``mean(a - b)`` (or of ``mean(a)`` when ``b`` is None)."""
        return self.intervals(np.asarray(a)[:, None], None if b is None else np.asarray(b)[:, None])[0]

    def intervals(self, a: np.ndarray, b: np.ndarray | None = None) -> list[Interval]:
        """One interval per column of ``a - b`` (``[n, m]``): m metrics on the same resamples."""
        d = np.asarray(a, dtype=np.float64) - (0.0 if b is None else np.asarray(b, dtype=np.float64))
        means = self.resampled_means(d)
        tail = (1.0 - self.level) / 2 * 100
        low, high = np.percentile(means, [tail, 100 - tail], axis=0)
        centre = d.mean(0)
        # The percentile of a constant can differ from it in the last bit: clamp around the mean.
        return [Interval(float(c), float(min(lo, c)), float(max(hi, c))) for c, lo, hi in zip(centre, low, high)]
