"""Recommendation tables: ``user_id, item_id, score, rank, source`` from index arrays."""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys.atomic import write_atomic, write_parquet_atomic, write_text_atomic
from recsys.columns import RECOMMENDATION_SCHEMA, Columns
from recsys.data.dataset import Dataset

# The atomic writers are re-exported for recsys.export.batch and recsys.train.
__all__ = ["recommendations_frame", "write_atomic", "write_parquet_atomic", "write_text_atomic"]


def recommendations_frame(
    dataset: Dataset, users: np.ndarray, items: np.ndarray, scores: np.ndarray, sources: np.ndarray | None = None
) -> pl.DataFrame:
    """``user_id, item_id, score, rank, source`` from ``[n_users, K]`` arrays (-1 = no item)."""
    k = items.shape[1]
    keep = items.ravel() >= 0
    src = sources.ravel()[keep] if sources is not None else np.full(int(keep.sum()), "", dtype=object)
    df = pl.DataFrame(
        {
            Columns.User: dataset.users.ids[np.repeat(users, k)[keep]].tolist(),
            Columns.Item: dataset.item_ids.ids[items.ravel()[keep]].tolist(),
            Columns.Score: scores.ravel()[keep].astype(np.float64),
            Columns.Rank: np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))[keep],
            Columns.Source: src.tolist(),
        },
        schema=RECOMMENDATION_SCHEMA,
    )
    return df.sort(Columns.User, Columns.Rank)
