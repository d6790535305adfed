"""Ranking metrics against a brute-force implementation and torchmetrics' retrieval metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recsys.evaluation.metrics import metric_table, ranking_metrics

KS = (1, 3, 5, 10)


def random_case(seed: int, n_users: int = 60, n_items: int = 40, width: int = 10, pad: bool = False):
    """Random top-``width`` lists and 1..6 relevant items per user, many of them in the lists."""
    rng = np.random.default_rng(seed)
    recommended = np.stack([rng.choice(n_items, width, replace=False) for _ in range(n_users)])
    rel = np.zeros((n_users, n_items), dtype=np.float32)
    for u in range(n_users):
        n_rel = rng.integers(1, 7)
        pool = np.concatenate([recommended[u], rng.choice(n_items, 10)])  # skew relevance into the list
        rel[u, rng.choice(pool, n_rel, replace=False)] = 1.0
        rel[u, rng.integers(n_items)] = 1.0
    if pad:  # shorter lists, padded with -1 (a model with fewer candidates than K)
        for u in range(0, n_users, 3):
            recommended[u, rng.integers(0, width) :] = -1
    return recommended, sp.csr_matrix(rel)


def brute_force(recommended: np.ndarray, relevant: sp.csr_matrix, ks) -> dict[str, np.ndarray]:
    dense = relevant.toarray() > 0
    out: dict[str, list[float]] = {}
    for u, row in enumerate(recommended.tolist()):
        rel = set(np.flatnonzero(dense[u]).tolist())
        hits = [i >= 0 and i in rel for i in row]
        for k in ks:
            top = hits[:k]
            dcg = sum(1.0 / math.log2(p + 2) for p, h in enumerate(top) if h)
            idcg = sum(1.0 / math.log2(p + 2) for p in range(min(len(rel), k)))
            out.setdefault(f"recall_at_{k}", []).append(sum(top) / len(rel))
            out.setdefault(f"ndcg_at_{k}", []).append(dcg / idcg)
            out.setdefault(f"hitrate_at_{k}", []).append(float(any(top)))
            out.setdefault(f"precision_at_{k}", []).append(sum(top) / k)
        first = next((p for p, h in enumerate(hits) if h), None)
        out.setdefault("mrr", []).append(0.0 if first is None else 1.0 / (first + 1))
    return {key: np.array(v) for key, v in out.items()}


@pytest.mark.parametrize("pad", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(seed, pad):
    recommended, relevant = random_case(seed, pad=pad)
    got = ranking_metrics(recommended, relevant, KS)
    expected = brute_force(recommended, relevant, KS)
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, err_msg=key)
    # Not a vacuous comparison: the random case has hits, misses and several relevant items.
    assert 0 < expected["ndcg_at_10"].mean() < 1
    assert np.diff(relevant.indptr).max() > 3


def torchmetrics_values(recommended: np.ndarray, relevant: sp.csr_matrix, k: int, width: int) -> dict[str, float]:
    from torchmetrics.retrieval import (
        RetrievalHitRate,
        RetrievalMRR,
        RetrievalNormalizedDCG,
        RetrievalPrecision,
        RetrievalRecall,
    )

    n_users, n_items = relevant.shape
    # Each list as scores over the whole catalogue: listed items first, in list order; the rest below.
    preds = np.full((n_users, n_items), -1.0)
    rng = np.random.default_rng(0)
    preds -= rng.random((n_users, n_items))
    for u, row in enumerate(recommended):
        preds[u, row] = width - np.arange(width)
    target = relevant.toarray() > 0
    indexes = np.repeat(np.arange(n_users), n_items)
    args = (torch.tensor(preds.ravel()), torch.tensor(target.ravel()))
    kwargs = {"indexes": torch.tensor(indexes)}
    return {
        f"ndcg_at_{k}": float(RetrievalNormalizedDCG(top_k=k)(*args, **kwargs)),
        f"recall_at_{k}": float(RetrievalRecall(top_k=k)(*args, **kwargs)),
        f"hitrate_at_{k}": float(RetrievalHitRate(top_k=k)(*args, **kwargs)),
        f"precision_at_{k}": float(RetrievalPrecision(top_k=k)(*args, **kwargs)),
        "mrr": float(RetrievalMRR(top_k=width)(*args, **kwargs)),
    }


@pytest.mark.parametrize("k", KS)
def test_matches_torchmetrics(k):
    width = 10
    recommended, relevant = random_case(7, width=width)
    ours = ranking_metrics(recommended, relevant, (k,))
    theirs = torchmetrics_values(recommended, relevant, k, width)
    for key, value in theirs.items():
        assert float(np.mean(ours[key])) == pytest.approx(value, rel=1e-5), key


def test_padding_never_counts_as_a_hit():
    # Item 0 is relevant; a -1 must not be read as "the last item" or as item 0.
    relevant = sp.csr_matrix(np.array([[1, 0, 0, 1], [0, 0, 0, 1]], dtype=np.float32))
    recommended = np.array([[-1, -1, -1], [2, -1, -1]])
    m = ranking_metrics(recommended, relevant, (3,))
    assert m["recall_at_3"].tolist() == [0.0, 0.0]
    assert m["ndcg_at_3"].tolist() == [0.0, 0.0]
    assert m["mrr"].tolist() == [0.0, 0.0]


def test_known_values():
    relevant = sp.csr_matrix(np.array([[0, 1, 1, 0, 0]], dtype=np.float32))
    m = ranking_metrics(np.array([[0, 1, 3, 2]]), relevant, (2, 4))
    assert m["recall_at_2"][0] == pytest.approx(0.5)
    assert m["precision_at_2"][0] == pytest.approx(0.5)
    assert m["ndcg_at_2"][0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["ndcg_at_4"][0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    assert m["mrr"][0] == pytest.approx(0.5)


def test_user_without_relevant_items_is_an_error():
    relevant = sp.csr_matrix(np.array([[0, 1], [0, 0]], dtype=np.float32))
    with pytest.raises(ValueError, match="relevant"):
        ranking_metrics(np.array([[1], [0]]), relevant, (1,))


def test_cutoff_longer_than_the_list():
    relevant = sp.csr_matrix(np.array([[1, 1, 1, 1, 0, 0]], dtype=np.float32))
    m = ranking_metrics(np.array([[0, 5]]), relevant, (5,))
    expected = brute_force(np.array([[0, 5]]), relevant, (5,))
    assert m["ndcg_at_5"][0] == pytest.approx(expected["ndcg_at_5"][0])


def test_metric_table_is_the_mean_over_users():
    recommended, relevant = random_case(3)
    per_model = {
        "a": ranking_metrics(recommended, relevant, (5,)),
        "b": ranking_metrics(recommended[:, ::-1], relevant, (5,)),
    }
    table = metric_table(per_model, ["ndcg_at_5", "mrr"])
    assert table["model"].to_list() == ["a", "b"]
    assert table["ndcg_at_5"][0] == pytest.approx(per_model["a"]["ndcg_at_5"].mean())
    assert table["mrr"][1] == pytest.approx(per_model["b"]["mrr"].mean())
