"""Ranking metrics on top-K lists against each user's held-out items (binary relevance).

``recommended`` is an ``[n_users, K]`` array of item indices, best first, padded with -1;
``relevant`` is a CSR matrix ``[n_users, n_items]`` whose row j holds user j's held-out items.
MRR is computed over the whole list given (``K`` = the longest cut-off asked, 100 by default),
so an item ranked below it counts as 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.jit import njit


def relevance_matrix(targets: pl.DataFrame, users: np.ndarray, n_items: int) -> sp.csr_matrix:
    """Row j = the held-out items of ``users[j]``."""
    pos = {int(u): j for j, u in enumerate(users)}
    rows = np.array([pos[int(u)] for u in targets[Columns.UserIdx].to_numpy()], dtype=np.int64)
    m = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, targets[Columns.ItemIdx].to_numpy())),
        shape=(len(users), n_items),
    )
    m.sum_duplicates()
    return m


def hits_matrix(recommended: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """Boolean ``[n_users, K]``: is the item at that position relevant for that user."""
    recommended = np.ascontiguousarray(recommended)
    relevant = sp.csr_matrix(relevant)
    out = np.zeros(recommended.shape, dtype=bool)
    _hits(recommended, relevant.indptr, relevant.indices, relevant.data, out)
    return out


@njit(cache=True, nogil=True)
def _hits(recommended: np.ndarray, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, out: np.ndarray) -> None:
    # Each list cell against its user's few held-out items, in place: indexing the sparse matrix
    # by (row, item) pairs built several int64 copies of every cell (~1 GB at 300,000 users).
    for r in range(recommended.shape[0]):
        lo, hi = indptr[r], indptr[r + 1]
        for j in range(recommended.shape[1]):
            item = recommended[r, j]
            if item < 0:
                continue
            for p in range(lo, hi):
                if indices[p] == item and data[p] > 0:
                    out[r, j] = True
                    break


def ranking_metrics(
    recommended: np.ndarray, relevant: sp.csr_matrix, ks: Sequence[int] = (10, 20)
) -> dict[str, np.ndarray]:
    """Per-user Recall@k, NDCG@k, HitRate@k, Precision@k for each k, and MRR.

    >>> import numpy as np, scipy.sparse as sp
    >>> rel = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 0, 0]]))
    >>> m = ranking_metrics(np.array([[1, 2], [2, 3]]), rel, ks=(1,))
    >>> m["ndcg_at_1"].tolist(), m["mrr"].tolist()
    ([1.0, 0.0], [1.0, 0.0])
    """
    hits = hits_matrix(recommended, relevant)
    full = metrics_from_hits(hits, np.diff(relevant.indptr), ks)
    names = ("recall", "ndcg", "hitrate", "precision")
    out = {f"{name}_at_{k}": full[f"{name}_at_{k}"] for k in ks for name in names}
    first = np.where(hits.any(1), hits.argmax(1), -1)
    out["mrr"] = np.divide(1.0, first + 1.0, out=np.zeros(len(first)), where=first >= 0)
    return out


def metric_table(per_model: Mapping[str, Mapping[str, np.ndarray]], columns: Sequence[str]) -> pl.DataFrame:
    """One row per model, mean of each metric over users."""
    return pl.DataFrame(
        [{"model": name, **{c: float(np.mean(m[c])) for c in columns}} for name, m in per_model.items()]
    )


def accuracy_metrics(
    recommended: np.ndarray, relevant: sp.csr_matrix, ks: Sequence[int] = (5, 10, 20, 50)
) -> dict[str, np.ndarray]:
    """Per-user Recall, NDCG, HitRate, Precision, MRR and MAP at every cut-off in ``ks``.

    ``mrr_at_k`` is the reciprocal rank of the first relevant item if it lies in the top k, else 0.
    ``map_at_k`` is RecBole's MAP@K: ``sum_{i<=k} precision@i * rel_i / min(n_relevant, k)``.
    Users need at least one relevant item.

    >>> import numpy as np, scipy.sparse as sp
    >>> rel = sp.csr_matrix(np.array([[0, 1, 0, 1], [1, 0, 0, 0]]))
    >>> m = accuracy_metrics(np.array([[1, 2, 3], [2, 3, 0]]), rel, ks=(2, 3))
    >>> m["map_at_3"].tolist(), m["mrr_at_2"].tolist(), m["mrr_at_3"].tolist()
    ([0.8333333333333333, 0.3333333333333333], [1.0, 0.0], [1.0, 0.3333333333333333])
    """
    return metrics_from_hits(hits_matrix(recommended, relevant), np.diff(relevant.indptr), ks)


def metrics_from_hits(hits: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """``accuracy_metrics`` from a hit matrix ``[n_users, K]`` and each user's number of relevant
    items (segments reuse one hit matrix with some hits masked out)."""
    n_rel = np.asarray(n_relevant, dtype=np.float64)
    if np.any(n_rel <= 0):
        raise ValueError("every evaluated user needs at least one relevant item")
    width = hits.shape[1]
    discounts = 1.0 / np.log2(np.arange(2, max(width, *ks) + 2))
    ideal_cum = np.cumsum(discounts)
    first = np.where(hits.any(1), hits.argmax(1), width)
    n_hit_cum = np.cumsum(hits, 1)
    precision_at_i = n_hit_cum / np.arange(1, width + 1)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        h = hits[:, :k]
        n_hit = h.sum(1)
        out[f"recall_at_{k}"] = n_hit / n_rel
        out[f"ndcg_at_{k}"] = (h * discounts[: h.shape[1]]).sum(1) / ideal_cum[np.minimum(n_rel, k).astype(int) - 1]
        out[f"mrr_at_{k}"] = np.where(first < k, 1.0 / (first + 1.0), 0.0)
        out[f"hitrate_at_{k}"] = (n_hit > 0).astype(np.float64)
        out[f"precision_at_{k}"] = n_hit / k
        out[f"map_at_{k}"] = (precision_at_i[:, :k] * h).sum(1) / np.minimum(n_rel, k)
    return out


def curves(hits: np.ndarray, n_relevant: np.ndarray) -> dict[str, np.ndarray]:
    """Mean Recall@K and NDCG@K for every K = 1..width (the curves of the report's plots)."""
    n_rel = np.asarray(n_relevant, dtype=np.float64)[:, None]
    width = hits.shape[1]
    discounts = 1.0 / np.log2(np.arange(2, width + 2))
    ideal_cum = np.cumsum(discounts)
    ks = np.arange(1, width + 1)
    ideal = ideal_cum[np.minimum(n_rel, ks[None, :]).astype(int) - 1]
    return {
        "k": ks,
        "recall": (np.cumsum(hits, 1) / n_rel).mean(0),
        "ndcg": (np.cumsum(hits * discounts, 1) / ideal).mean(0),
    }
