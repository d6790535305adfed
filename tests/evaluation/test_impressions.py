"""Impression metrics (MIND protocol) against hand-computed values and independent references."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from recsys.columns import Columns
from recsys.evaluation.impressions import impression_metrics, summarize

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def frame(impressions: dict[str, tuple[list[int], list[float]]]) -> pl.DataFrame:
    rows = [
        (imp, bool(label), float(score))
        for imp, (labels, scores) in impressions.items()
        for label, score in zip(labels, scores, strict=True)
    ]
    return pl.DataFrame(rows, schema=[Columns.Impression, Columns.Clicked, Columns.Score], orient="row")


HAND = {
    # ranks 1..4 = clicked, -, -, clicked
    "A": ([1, 0, 0, 1], [0.9, 0.8, 0.3, 0.1]),
    # the click ties with a non-click: AUC counts the tie as 1/2, the ranking puts the click last
    "B": ([0, 1, 0], [0.2, 0.2, 0.5]),
    # no click: no metric at all
    "C": ([0, 0], [0.4, 0.6]),
    # only clicks: no AUC, perfect ranking
    "D": ([1, 1], [0.3, 0.7]),
    # the click ranked 6th: outside nDCG@5, inside nDCG@10
    "E": ([0, 0, 0, 0, 0, 1, 0], [7, 6, 5, 4, 3, 2, 1]),
}
L2 = math.log2
EXPECTED = {
    "A": (0.5, (1 + 1 / 4) / 2, (1 + 1 / L2(5)) / (1 + 1 / L2(3)), (1 + 1 / L2(5)) / (1 + 1 / L2(3))),
    "B": (0.25, 1 / 3, 1 / L2(4), 1 / L2(4)),
    "C": (None, None, None, None),
    "D": (None, 0.75, 1.0, 1.0),
    "E": (1 / 6, 1 / 6, 0.0, 1 / L2(7)),
}


def test_hand_computed_impressions():
    out = impression_metrics(frame(HAND))
    assert out[Columns.Impression].to_list() == list("ABCDE")
    assert out["n_candidates"].to_list() == [4, 3, 2, 2, 7]
    assert out["n_clicked"].to_list() == [2, 1, 0, 2, 1]
    for row in out.iter_rows(named=True):
        got = (row["auc"], row["mrr"], row["ndcg_at_5"], row["ndcg_at_10"])
        want = EXPECTED[row[Columns.Impression]]
        assert got == pytest.approx(want), row[Columns.Impression]
    s = summarize(out)
    assert s["auc"] == pytest.approx((0.5 + 0.25 + 1 / 6) / 3)
    assert s["mrr"] == pytest.approx((0.625 + 1 / 3 + 0.75 + 1 / 6) / 4)
    assert (s["n_impressions"], s["n_impressions_auc"], s["n_impressions_clicked"]) == (5, 3, 4)


def test_row_order_does_not_matter():
    df = frame(HAND)
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=3)
    assert impression_metrics(df).equals(impression_metrics(shuffled))


# MIND's evaluate.py (https://github.com/msnews/MIND), the reference these metrics follow.
def mind_dcg(y_true, y_score, k):
    order = np.argsort(y_score)[::-1]
    y_true = np.take(y_true, order[:k])
    return np.sum((2**y_true - 1) / np.log2(np.arange(len(y_true)) + 2))


def mind_mrr(y_true, y_score):
    order = np.argsort(y_score)[::-1]
    y_true = np.take(y_true, order)
    return np.sum(y_true / (np.arange(len(y_true)) + 1)) / np.sum(y_true)


def random_impressions(rng, n: int, tie_levels: int | None = None):
    out = {}
    for i in range(n):
        size = int(rng.integers(2, 40))
        labels = (rng.random(size) < rng.uniform(0.05, 0.5)).astype(int)
        labels[rng.integers(size)] = 1  # at least one click, as in MIND
        scores = rng.random(size) if tie_levels is None else rng.integers(0, tie_levels, size).astype(float)
        out[f"imp{i:03d}"] = (labels.tolist(), scores.tolist())
    return out


def test_matches_mind_reference_and_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    imps = random_impressions(rng, 200)  # continuous scores: no ties, so the references agree exactly
    out = impression_metrics(frame(imps)).sort(Columns.Impression)
    for row in out.iter_rows(named=True):
        labels, scores = (np.asarray(x) for x in imps[row[Columns.Impression]])
        if 0 < labels.sum() < len(labels):
            assert row["auc"] == pytest.approx(roc_auc_score(labels, scores))
        else:
            assert row["auc"] is None
        assert row["mrr"] == pytest.approx(mind_mrr(labels, scores))
        for k in (5, 10):
            assert row[f"ndcg_at_{k}"] == pytest.approx(mind_dcg(labels, scores, k) / mind_dcg(labels, labels, k))


def test_auc_with_ties_matches_a_brute_force_pairwise_count():
    rng = np.random.default_rng(1)
    imps = random_impressions(rng, 200, tie_levels=4)
    out = impression_metrics(frame(imps))
    for row in out.iter_rows(named=True):
        labels, scores = (np.asarray(x) for x in imps[row[Columns.Impression]])
        pos, neg = scores[labels == 1], scores[labels == 0]
        if len(neg) == 0:
            assert row["auc"] is None
            continue
        pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert row["auc"] == pytest.approx(pairs / (len(pos) * len(neg)))
        assert row["auc"] == pytest.approx(roc_auc_score(labels, scores))


def test_rejects_missing_columns_and_bad_scores():
    df = frame(HAND)
    with pytest.raises(ValueError, match="score"):
        impression_metrics(df.drop(Columns.Score))
    with pytest.raises(ValueError, match="NaN"):
        impression_metrics(df.with_columns(pl.lit(float("nan")).alias(Columns.Score)))


def test_on_the_real_mind_sample_with_popularity_scores():
    root = SHARED / "mind-small-sample"
    if not root.is_dir():
        pytest.skip("../shared/data not present: real-data tests need the shared data sets")
    from recsys.data import MindDataSource

    data = MindDataSource(root).load()
    # Popularity over all clicks, the scored ones included: this checks the plumbing, not quality.
    counts = data.interactions.group_by(Columns.ItemIdx).len("n")
    cand = data.impressions.join(counts, on=Columns.ItemIdx, how="left").with_columns(
        pl.col("n").fill_null(0).cast(pl.Float64).alias(Columns.Score)
    )
    s = summarize(impression_metrics(cand))
    assert s["n_impressions"] == 2396
    assert s["n_impressions_clicked"] == 166 and s["n_impressions_auc"] == 119
    for m in ("auc", "mrr", "ndcg_at_5", "ndcg_at_10"):
        assert 0.0 <= s[m] <= 1.0


def test_stage_impressions_keep_later_impressions_of_held_out_users_and_drop_seen_candidates():
    from recsys.evaluation.impressions import stage_impressions

    imps = pl.DataFrame(
        {
            Columns.Impression: [1, 1, 2, 2, 2, 3],
            Columns.UserIdx: [0, 0, 0, 0, 0, 1],
            Columns.ItemIdx: [5, 6, 5, 7, 8, 5],
            Columns.Timestamp: [10, 10, 30, 30, 30, 30],
            Columns.Clicked: [True, False, True, False, False, True],
        }
    )
    targets = pl.DataFrame({Columns.UserIdx: [0], Columns.ItemIdx: [5], Columns.Timestamp: [30]})
    history = pl.DataFrame({Columns.UserIdx: [0, 0], Columns.ItemIdx: [6, 8]})
    kept, counts = stage_impressions(imps, targets, history)
    # Impression 1 is before user 0's held-out event, impression 3 belongs to a user without one,
    # and item 8 of impression 2 is already in user 0's history.
    assert kept[Columns.Impression].to_list() == [2, 2] and kept[Columns.ItemIdx].to_list() == [5, 7]
    assert counts == {
        "rows": 6,
        "rows_of_held_out_users": 5,
        "rows_before_held_out": 2,
        "rows_already_in_history": 1,
        "rows_kept": 2,
        "impressions_kept": 1,
    }
