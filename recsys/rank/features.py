"""Features of each (user, candidate item) pair for the fusion ranker.

Every model scores every candidate (not only those it proposed), so the ranker can weigh the
text tower against CF item by item. Item and user statistics come from the stage's history only,
as of each user's cut where the stage has per-user cuts (``History.user_now``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from recsys.columns import Columns
from recsys.rank.candidates import rank_column
from recsys.recommender import History, Recommender

DAY = 86400.0
#: The suffix of a score's gap to the user's best candidate (``build_features(score_gaps=True)``).
GAP = "_gap"


def item_statistics(history: History) -> pl.DataFrame:
    """Popularity and recency of every item, as of the end of ``history`` (one row per item)."""
    df = history.interactions
    now = int(df[Columns.Timestamp].max()) if df.height else 0
    items = np.arange(history.n_items, dtype=np.int64)
    stats = item_statistics_at(history, items, np.full(len(items), now, dtype=np.int64))
    return pl.DataFrame({Columns.ItemIdx: items.astype(np.int32), **stats})


def item_statistics_at(history: History, items: np.ndarray, now: np.ndarray) -> dict[str, pl.Series]:
    """Popularity and recency of ``items[j]`` counting only the events at or before ``now[j]``.

    Under a per-user split (leave-last-out) each user's features are taken as of that user's own
    cut (``History.user_now``): the other users' later events stay out, so no statistic tells the
    ranker which items were active in the user's era (docs/design.md, "Time"). Items without an
    event by then: zero counts, unknown age and idle time (LightGBM routes nulls itself).
    """
    df = history.interactions
    it = df[Columns.ItemIdx].to_numpy().astype(np.int64)
    ts = df[Columns.Timestamp].to_numpy().astype(np.int64)
    w = df[Columns.Weight].to_numpy().astype(np.float64)
    order = np.lexsort((ts, it))
    it, ts, w = it[order], ts[order], w[order]
    now = np.asarray(now, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    recent = int(14 * DAY)
    # One sorted key (item, time) answers "events of item i up to time t" with one searchsorted.
    base = (int(min(ts.min(), now.min())) if len(ts) else int(now.min(initial=0))) - recent - 1
    span = (int(max(ts.max(), now.max())) if len(ts) else int(now.max(initial=0))) - base + 2
    key = it * span + (ts - base)
    start = np.searchsorted(it, items, side="left")
    upto = np.searchsorted(key, items * span + (now - base), side="right")
    before = np.searchsorted(key, items * span + (now - recent - base), side="left")
    n = upto - start
    cw = np.r_[0.0, np.cumsum(w)]
    has = n > 0
    first = np.where(has, ts[np.minimum(start, max(len(ts) - 1, 0))] if len(ts) else 0, 0)
    last = np.where(has, ts[np.maximum(upto - 1, 0)] if len(ts) else 0, 0)
    total = np.searchsorted(np.sort(ts), now, side="right")
    return {
        "item_events": pl.Series("item_events", n, dtype=pl.Float32),
        "item_weight": pl.Series("item_weight", cw[upto] - cw[start], dtype=pl.Float32),
        "item_events_14d": pl.Series("item_events_14d", upto - before, dtype=pl.Float32),
        "item_age_days": pl.Series("item_age_days", (now - first) / DAY).set(pl.Series(~has), None),
        "item_idle_days": pl.Series("item_idle_days", (now - last) / DAY).set(pl.Series(~has), None),
        "item_share": pl.Series("item_share", n / np.maximum(total, 1), dtype=pl.Float64),
    }


def user_statistics(history: History, now: int | None = None) -> pl.DataFrame:
    """Per user, sorted by user_idx: event count and days since the last event, as of ``now``
    (default: each user's ``History.user_now`` where the stage sets one, else the history's end)."""
    df = history.interactions
    if now is None and history.user_now is not None:
        at = pl.Series(history.user_now)[df[Columns.UserIdx].to_numpy()]
        df = df.with_columns(at.alias("_now"))
    else:
        if now is None:
            now = df[Columns.Timestamp].max() if df.height else 0
        df = df.with_columns(pl.lit(now, dtype=pl.Int64).alias("_now"))
    return (
        df.group_by(Columns.UserIdx)
        .agg(
            pl.len().cast(pl.Float32).alias("user_events"),
            ((pl.col("_now").first() - pl.col(Columns.Timestamp).max()) / DAY).alias("user_idle_days"),
        )
        .with_columns(pl.col(Columns.UserIdx).cast(pl.Int32))
        .sort(Columns.UserIdx)
    )


def build_features(
    candidates: pl.DataFrame,
    history: History,
    scorers: Mapping[str, Recommender],
    sources: Sequence[str],
    item_stats: pl.DataFrame | None = None,
    user_stats: pl.DataFrame | None = None,
    score_gaps: bool = False,
) -> pl.DataFrame:
    """Candidates + model scores, per-user standardised scores, ranks, item and user statistics,
    and with ``score_gaps`` each score's gap to the user's best candidate (``score_<model>_gap``,
    the last columns: ``rank.score_gap_feature``).

    ``scorers`` score the candidate pairs (``score_pairs``; a ``ScoreBlock`` reads the block the
    candidates came from). Item statistics: as of each user's cut where ``history`` has per-user
    cuts (``History.user_now``), else one row per item of ``item_stats`` (default
    ``item_statistics(history)``). ``user_stats``: sorted by user_idx, as ``user_statistics``
    returns it (its default); callers that work block by block pass both, computed once.

    Computed with numpy on the candidates sorted by (user, item): the per-user standardised
    scores as sums over each user's contiguous rows, the statistics as gathers. A user with one
    candidate gets NaN z-scores, which the ranker reads as missing.
    """
    keys = [Columns.UserIdx, Columns.ItemIdx]
    users = candidates[Columns.UserIdx].to_numpy().astype(np.int64)
    items = candidates[Columns.ItemIdx].to_numpy().astype(np.int64)
    if np.any(np.diff(users * (int(items.max(initial=0)) + 1) + items) < 0):  # not in (user, item) order
        candidates = candidates.sort(keys)
        users = candidates[Columns.UserIdx].to_numpy().astype(np.int64)
        items = candidates[Columns.ItemIdx].to_numpy().astype(np.int64)
    cols: dict[str, pl.Series] = {c: candidates[c] for c in candidates.columns}
    # Each user's rows are contiguous: per-user sums by np.add.reduceat over the run starts.
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, len(users)])
    scores = {f"score_{name}": _pair_scores(model, users, items) for name, model in scorers.items()}
    for name, v in scores.items():
        cols[name] = pl.Series(name, v, dtype=pl.Float32)
    for name, v in scores.items():
        cols[f"{name}_z"] = pl.Series(f"{name}_z", _user_z(v, starts, counts), dtype=pl.Float32)
    n_sources = np.zeros(len(users), dtype=np.int8)
    for s in sources:
        n_sources += candidates[rank_column(s)].is_not_null().to_numpy()
    cols["n_sources"] = pl.Series("n_sources", n_sources)
    if history.user_now is not None:
        cols.update(item_statistics_at(history, items, history.user_now[users]))
    else:
        stats = item_statistics(history) if item_stats is None else item_stats
        for c in stats.columns:  # one row per item, in item order
            if c != Columns.ItemIdx:
                cols[c] = stats[c].gather(items)
    user_stats = user_statistics(history) if user_stats is None else user_stats
    # Found by binary search in the sorted ids: a block's cost stays with its rows, not all users.
    ids = user_stats[Columns.UserIdx].to_numpy()
    at = np.minimum(np.searchsorted(ids, users), max(len(ids) - 1, 0))
    known = ids[at] == users if len(ids) else np.zeros(len(users), dtype=bool)
    rows = pl.Series(at).set(pl.Series(~known), None)  # no history: nulls
    for c in user_stats.columns:
        if c != Columns.UserIdx:
            cols[c] = user_stats[c].gather(rows)
    if score_gaps:
        for name, v in scores.items():
            cols[f"{name}{GAP}"] = pl.Series(f"{name}{GAP}", _user_gap(v, starts, counts), dtype=pl.Float32)
    return pl.DataFrame(list(cols.values()))


def _pair_scores(model: Recommender, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``model``'s scores of the pairs, NaN (missing, to the ranker) for a user it has no
    history of: a factor model's zero vector or an item-kNN's empty row scores 0 everywhere,
    which is no score."""
    v = np.asarray(model.score_pairs(users, items), dtype=np.float32)
    blank = model.users_without_history(users)
    return v if blank is None else np.where(blank, np.float32(np.nan), v)


def _user_z(x: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``(x - mean) / (std + 1e-6)`` within each user's run of rows (sample std)."""
    if len(x) == 0:
        return x.astype(np.float32)
    xd = x.astype(np.float64)
    mean = np.add.reduceat(xd, starts) / counts
    dev = xd - np.repeat(mean, counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.add.reduceat(dev * dev, starts) / (counts - 1))
        return (dev / (np.repeat(std, counts) + 1e-6)).astype(np.float32)


def _user_gap(x: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``x - max`` within each user's run of rows: how far a candidate lies behind the user's best.
    A per-user z-score says how a score stands among the user's candidates on average; a peaked
    list (one clear favourite) and a flat one with the same spread are told apart only by this."""
    if len(x) == 0:
        return x.astype(np.float32)
    return (x - np.repeat(np.maximum.reduceat(x, starts), counts)).astype(np.float32)


def feature_columns(df: pl.DataFrame) -> list[str]:
    """Every column except keys and labels, in a fixed order."""
    skip = {Columns.UserIdx, Columns.ItemIdx, Columns.Source, Columns.Stage, "label"}
    return [c for c in df.columns if c not in skip]
