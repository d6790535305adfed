"""Features of each (user, candidate item) pair for the fusion ranker.

Every model scores every candidate (not only those it proposed), so the ranker can weigh the
text tower against CF item by item. Item statistics come from the stage's history only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import polars as pl

from recsys.columns import Columns
from recsys.rank.candidates import rank_column
from recsys.recommender import History, Recommender

DAY = 86400.0


def item_statistics(history: History) -> pl.DataFrame:
    """Popularity and recency of every item, as of the end of ``history``."""
    df = history.interactions
    now = df[Columns.Timestamp].max() if df.height else 0
    recent = now - 14 * DAY
    stats = df.group_by(Columns.ItemIdx).agg(
        pl.len().alias("item_events"),
        pl.col(Columns.Weight).sum().alias("item_weight"),
        (pl.col(Columns.Timestamp) >= recent).sum().alias("item_events_14d"),
        ((now - pl.col(Columns.Timestamp).min()) / DAY).alias("item_age_days"),
        ((now - pl.col(Columns.Timestamp).max()) / DAY).alias("item_idle_days"),
    )
    all_items = pl.DataFrame({Columns.ItemIdx: np.arange(history.n_items, dtype=np.int32)})
    out = all_items.join(stats.with_columns(pl.col(Columns.ItemIdx).cast(pl.Int32)), on=Columns.ItemIdx, how="left")
    # Items never seen in the history: zero counts, unknown age (LightGBM routes nulls itself).
    return out.with_columns(
        pl.col("item_events", "item_weight", "item_events_14d").fill_null(0).cast(pl.Float32),
        pl.col("item_events").rank("average", descending=False).truediv(history.n_items).alias("item_pop_pct"),
    ).sort(Columns.ItemIdx)


def user_statistics(history: History, now: int | None = None) -> pl.DataFrame:
    """Per user: event count and days since the last event, as of ``now`` (default: the history's end)."""
    df = history.interactions
    if now is None:
        now = df[Columns.Timestamp].max() if df.height else 0
    return (
        df.group_by(Columns.UserIdx)
        .agg(
            pl.len().cast(pl.Float32).alias("user_events"),
            ((now - pl.col(Columns.Timestamp).max()) / DAY).alias("user_idle_days"),
        )
        .with_columns(pl.col(Columns.UserIdx).cast(pl.Int32))
    )


def build_features(
    candidates: pl.DataFrame,
    history: History,
    scorers: Mapping[str, Recommender],
    sources: Sequence[str],
    item_stats: pl.DataFrame | None = None,
    now: int | None = None,
    pair_scores: Callable[[Recommender, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> pl.DataFrame:
    """Candidates + model scores, per-user standardised scores, ranks, item and user statistics.

    Export passes ``item_stats`` and ``now`` of the whole training history (it works on blocks of
    users) and a cheaper per-pair scorer; training and export then compute the same features.
    """
    users = candidates[Columns.UserIdx].to_numpy().astype(np.int64)
    items = candidates[Columns.ItemIdx].to_numpy().astype(np.int64)
    score = pair_scores or (lambda model, u, i: model.score_pairs(u, i))
    scores = {f"score_{name}": score(model, users, items) for name, model in scorers.items()}
    df = candidates.with_columns(pl.Series(k, v) for k, v in scores.items())
    z = [
        ((pl.col(c) - pl.col(c).mean().over(Columns.UserIdx)) / (pl.col(c).std().over(Columns.UserIdx) + 1e-6)).alias(
            f"{c}_z"
        )
        for c in scores
    ]
    n_sources = pl.sum_horizontal([pl.col(rank_column(s)).is_not_null().cast(pl.Int8) for s in sources])
    df = df.with_columns(*z, n_sources.alias("n_sources"))
    stats = item_statistics(history) if item_stats is None else item_stats
    df = df.join(stats, on=Columns.ItemIdx, how="left")
    df = df.join(user_statistics(history, now), on=Columns.UserIdx, how="left")
    return df.sort(Columns.UserIdx, Columns.ItemIdx)


def feature_columns(df: pl.DataFrame) -> list[str]:
    """Every column except keys and labels, in a fixed order."""
    skip = {Columns.UserIdx, Columns.ItemIdx, Columns.Source, "label"}
    return [c for c in df.columns if c not in skip]
