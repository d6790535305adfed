"""Impression metrics (the MIND protocol): AUC, MRR, nDCG@5, nDCG@10 per impression, averaged.

An impression is one list of candidates shown to a user, each clicked or not; a model scores
every candidate, and each metric is computed within the impression and then averaged over
impressions. The definitions follow MIND's official ``evaluate.py``
(https://github.com/msnews/MIND), with binary labels:

* **AUC**: probability that a clicked candidate outscores a non-clicked one, ties counting one
  half (``sklearn.metrics.roc_auc_score``). Impressions without a click or without a non-click
  have no AUC and are skipped for it.
* **MRR**: ``sum(clicked / rank) / n_clicked``, i.e. the reciprocal rank averaged over *all*
  clicked candidates of the impression, not only the first one.
* **nDCG@k**: ``DCG@k / ideal DCG@k`` with gain 1 for a click and discount ``1/log2(rank+1)``.

MRR and nDCG need a click and are skipped for impressions without one. Where scores tie, the
non-clicked candidates are ranked first (pessimistic), so a model cannot gain from the order in
which candidates happen to be listed; MIND's script leaves ties to ``np.argsort``'s unstable
order. AUC is not affected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from recsys.columns import Columns


def impression_metrics(
    candidates: pl.DataFrame,
    score: str = Columns.Score,
    ks: Sequence[int] = (5, 10),
) -> pl.DataFrame:
    """Per impression: ``n_candidates``, ``n_clicked``, ``auc``, ``mrr`` and ``ndcg_at_k``.

    Parameters
    ----------
    candidates:
        One row per candidate: ``impression_id``, ``clicked`` (bool) and the model's ``score``.
    score:
        Name of the score column; scores must be finite.
    ks:
        Cut-offs for nDCG.

    Returns
    -------
    pl.DataFrame
        One row per impression, sorted by ``impression_id``; a metric is null where it is not
        defined (no click; for AUC also no non-click).

    Examples
    --------
    >>> df = pl.DataFrame({"impression_id": [1, 1, 1], "clicked": [False, True, False], "score": [0.9, 0.5, 0.1]})
    >>> m = impression_metrics(df).row(0, named=True)
    >>> m["auc"], m["mrr"], round(m["ndcg_at_5"], 4)
    (0.5, 0.5, 0.6309)
    """
    for col in (Columns.Impression, Columns.Clicked, score):
        if col not in candidates.columns:
            raise ValueError(f"impression_metrics needs a '{col}' column; got {candidates.columns}")
    s = candidates[score].cast(pl.Float64)
    if s.is_null().any() or not np.isfinite(s.to_numpy()).all():
        raise ValueError(f"column '{score}' has null, NaN or infinite scores")
    df = candidates.select(pl.col(Columns.Impression), pl.col(Columns.Clicked).cast(pl.Boolean), s.alias("_s"))
    clicked = pl.col(Columns.Clicked)
    n_pos = clicked.sum().cast(pl.Float64)
    n_neg = (~clicked).sum().cast(pl.Float64)
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive cut-offs, got {ks}")
    max_k = ks[-1]
    # 1-based rank within the impression, best score first; on ties a click comes last.
    df = df.sort(Columns.Impression, "_s", Columns.Clicked, descending=[False, True, False]).with_columns(
        (pl.int_range(pl.len()).over(Columns.Impression) + 1).alias("_rank"),
        # Ascending rank with ties averaged: the Mann-Whitney form of AUC.
        pl.col("_s").rank("average").over(Columns.Impression).alias("_arank"),
    )
    discount = 1.0 / (pl.col("_rank").cast(pl.Float64) + 1.0).log(2)
    # Ideal DCG@k for n clicks: the first min(n, k) discounts summed.
    ideal = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, max_k + 2)))])

    aggs = [
        pl.len().alias("n_candidates"),
        n_pos.alias("n_clicked"),
        ((pl.col("_arank").filter(clicked).sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).alias("auc"),
        ((1.0 / pl.col("_rank").filter(clicked)).sum() / n_pos).alias("mrr"),
    ]
    aggs += [discount.filter(clicked & (pl.col("_rank") <= k)).sum().alias(f"_dcg{k}") for k in ks]
    out = df.group_by(Columns.Impression).agg(aggs).sort(Columns.Impression)
    n_clicked = out["n_clicked"].to_numpy().astype(np.int64)
    has_click = pl.col("n_clicked") > 0
    cols = [
        pl.when(has_click & (pl.col("n_clicked") < pl.col("n_candidates"))).then(pl.col("auc")).alias("auc"),
        pl.when(has_click).then(pl.col("mrr")).alias("mrr"),
    ]
    for k in ks:
        idcg = ideal[np.minimum(n_clicked, k)]
        ndcg = out[f"_dcg{k}"].to_numpy() / np.where(idcg > 0, idcg, 1.0)
        cols.append(pl.when(has_click).then(pl.Series(ndcg)).alias(f"ndcg_at_{k}"))
    return out.with_columns(cols).select(
        Columns.Impression,
        pl.col("n_candidates").cast(pl.Int64),
        pl.col("n_clicked").cast(pl.Int64),
        "auc",
        "mrr",
        *[f"ndcg_at_{k}" for k in ks],
    )


def summarize(per_impression: pl.DataFrame) -> dict[str, float]:
    """Mean of each metric over the impressions where it is defined, with the counts used.

    >>> df = pl.DataFrame({"impression_id": [1, 1, 2, 2], "clicked": [True, False, False, False],
    ...                    "score": [0.2, 0.1, 0.3, 0.4]})
    >>> s = summarize(impression_metrics(df))
    >>> s["auc"], s["mrr"], s["n_impressions"], s["n_impressions_clicked"]
    (1.0, 1.0, 2, 1)
    """
    metrics = [c for c in per_impression.columns if c in ("auc", "mrr") or c.startswith("ndcg_at_")]
    out: dict[str, float] = {}
    for c in metrics:
        col = per_impression[c].drop_nulls()
        out[c] = float(col.mean()) if col.len() else float("nan")
    out["n_impressions"] = per_impression.height
    out["n_impressions_auc"] = int(per_impression["auc"].is_not_null().sum())
    out["n_impressions_clicked"] = int((per_impression["n_clicked"] > 0).sum())
    return out


def stage_impressions(
    impressions: pl.DataFrame, targets: pl.DataFrame, history: pl.DataFrame
) -> tuple[pl.DataFrame, dict[str, int]]:
    """The impressions a stage is judged on, and how many rows each rule removed.

    Kept: impressions of users with a held-out event, shown at or after that user's first held-out
    event (earlier ones are the past the models learned from). Dropped: candidates already in the
    user's ``history`` -- with per-event splits another click of the same impression can be in the
    history, and a model would be scored on recalling it, not on predicting it.
    """
    keys = [Columns.UserIdx, Columns.ItemIdx]
    first = targets.group_by(Columns.UserIdx).agg(pl.col(Columns.Timestamp).min().alias("_held_out_from"))
    first = first.with_columns(pl.col(Columns.UserIdx).cast(pl.Int64))
    imps = impressions.with_columns(pl.col(k).cast(pl.Int64) for k in keys)
    shown = imps.join(first, on=Columns.UserIdx, how="inner")
    later = shown.filter(pl.col(Columns.Timestamp) >= pl.col("_held_out_from")).drop("_held_out_from")
    seen = history.select(pl.col(k).cast(pl.Int64) for k in keys).unique().with_columns(pl.lit(True).alias("_seen"))
    marked = later.join(seen, on=keys, how="left", maintain_order="left")
    kept = marked.filter(pl.col("_seen").is_null()).drop("_seen")
    counts = {
        "rows": impressions.height,
        "rows_of_held_out_users": shown.height,
        "rows_before_held_out": shown.height - later.height,
        "rows_already_in_history": later.height - kept.height,
        "rows_kept": kept.height,
        "impressions_kept": kept[Columns.Impression].n_unique(),
    }
    return kept, counts
