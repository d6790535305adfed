"""The candidate set: union of each source's top-N per user, with the rank each source gave."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.recommender import Recommender


def rank_column(source: str) -> str:
    return f"rank_{source}"


def generate_candidates(
    users: np.ndarray,
    sources: Mapping[str, Recommender],
    n_per_source: Mapping[str, int],
    exclude: sp.csr_matrix | None,
) -> pl.DataFrame:
    """One row per distinct (user_idx, item_idx) that any source puts in its top-N.

    Columns: user_idx, item_idx, ``rank_<source>`` (1-based, null where that source did not
    propose the item), ``source`` (the first source, in config order, that proposed it).
    Sorted by user_idx, item_idx.
    """
    frames = []
    for name, n in n_per_source.items():
        items, scores = sources[name].recommend(users, n, exclude=exclude)
        k = items.shape[1]
        ok = np.isfinite(scores).ravel()  # fewer than n unseen items -> -inf padding
        frames.append(
            pl.DataFrame(
                {
                    Columns.UserIdx: np.repeat(users, k)[ok].astype(np.int32),
                    Columns.ItemIdx: items.ravel()[ok].astype(np.int32),
                    rank_column(name): np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))[ok],
                }
            )
        )
    keys = [Columns.UserIdx, Columns.ItemIdx]
    out = frames[0]
    for f in frames[1:]:
        out = out.join(f, on=keys, how="full", coalesce=True)
    names = list(n_per_source)
    first = pl.coalesce([pl.when(pl.col(rank_column(s)).is_not_null()).then(pl.lit(s)) for s in names]).alias(
        Columns.Source
    )
    return out.with_columns(first).sort(keys)
