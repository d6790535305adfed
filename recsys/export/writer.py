"""Recommendation tables and atomic writes: a reader never sees a half-written file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from recsys.columns import RECOMMENDATION_SCHEMA, Columns
from recsys.data.dataset import Dataset


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


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary name in the same folder, then rename it to ``path``
    (atomic on one file system): a reader never sees a half-written file, even after kill -9."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_parquet_atomic(df: pl.DataFrame, path: str | Path) -> Path:
    return write_atomic(path, df.write_parquet)


def write_text_atomic(text: str, path: str | Path) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))
