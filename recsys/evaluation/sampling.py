"""Evaluation of very large user sets on a seeded sample of users, with the sampling error stated.

Full-ranking evaluation costs users x items per model: at 10^5-10^6 test users that dominates a
job whose other stages grow with the events. A uniform sample of users estimates every mean
metric without bias; its 95 % interval (normal approximation, with the finite-population
correction for drawing without replacement) is logged beside each metric.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import polars as pl

from recsys.columns import Columns
from recsys.data.split import Split
from recsys.errors import require_whole


def sample_test_users(split: Split, max_users: int | None, seed: int) -> tuple[Split, int, int]:
    """``split`` with its test part cut to a seeded sample of ``max_users`` users (unchanged when
    there are no more than that, or ``max_users`` is None); returns ``(split, sampled, total)``.

    >>> import polars as pl
    >>> t = pl.DataFrame({"user_idx": [0, 1, 2, 3], "item_idx": [5, 6, 7, 8]})
    >>> s, n, total = sample_test_users(Split(t.head(0), t.head(0), t), 2, seed=0)
    >>> (s.test.height, n, total)
    (2, 2, 4)
    """
    require_whole("eval.max_users", max_users, optional=True)
    test, sampled, total = sample_users(split.test, max_users, seed)
    return (split if test is split.test else dataclasses.replace(split, test=test)), sampled, total


def sample_users(targets: pl.DataFrame, max_users: int | None, seed: int) -> tuple[pl.DataFrame, int, int]:
    """The rows of ``targets`` of a seeded sample of ``max_users`` of its users (``targets`` itself
    when it has no more, or ``max_users`` is None); returns ``(rows, sampled, total)``.

    >>> t = pl.DataFrame({"user_idx": [0, 1, 1, 2, 3]})
    >>> rows, n, total = sample_users(t, 2, seed=0)
    >>> (rows["user_idx"].n_unique(), n, total)
    (2, 2, 4)
    """
    users = targets[Columns.UserIdx].unique().sort().to_numpy()
    total = len(users)
    if max_users is None or total <= max_users:
        return targets, total, total
    keep = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return targets.filter(pl.col(Columns.UserIdx).is_in(keep.tolist())), max_users, total


def ci95_half_width(per_user: np.ndarray, total: int) -> float:
    """Half-width of the 95 % interval of the population mean estimated from ``per_user`` values of
    a uniform sample (without replacement) of ``total`` users; 0 when the sample is everyone.

    >>> round(ci95_half_width(np.array([0.0, 1.0] * 50), 1_000_000), 4)
    0.0985
    >>> ci95_half_width(np.array([0.0, 1.0]), 2)
    0.0
    """
    n = len(per_user)
    if n < 2 or n >= total:
        return 0.0
    fpc = math.sqrt((total - n) / (total - 1))
    return float(1.96 * np.std(per_user, ddof=1) / math.sqrt(n) * fpc)
