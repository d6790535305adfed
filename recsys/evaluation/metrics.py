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


def hits_matrix(recommended: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """Boolean ``[n_users, K]``: is the item at that position relevant for that user."""
    rows = np.repeat(np.arange(recommended.shape[0]), recommended.shape[1])
    cols = recommended.ravel()
    valid = cols >= 0
    out = np.zeros(recommended.size, dtype=bool)
    out[valid] = np.asarray(relevant[rows[valid], cols[valid]]).ravel() > 0
    return out.reshape(recommended.shape)


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
    n_rel = np.diff(relevant.indptr).astype(np.float64)
    if np.any(n_rel == 0):
        raise ValueError("every evaluated user needs at least one relevant item")
    # Long enough for the ideal DCG of any cut-off, even one beyond the list's length.
    discounts = 1.0 / np.log2(np.arange(2, max(hits.shape[1], *ks) + 2))
    out: dict[str, np.ndarray] = {}
    for k in ks:
        h = hits[:, :k]
        n_hit = h.sum(1)
        ideal = np.cumsum(discounts[:k])[np.minimum(n_rel, k).astype(int) - 1]
        out[f"recall_at_{k}"] = n_hit / n_rel
        out[f"ndcg_at_{k}"] = (h * discounts[: h.shape[1]]).sum(1) / ideal
        out[f"hitrate_at_{k}"] = (n_hit > 0).astype(np.float64)
        out[f"precision_at_{k}"] = n_hit / k
    first = np.where(hits.any(1), hits.argmax(1), -1)
    out["mrr"] = np.divide(1.0, first + 1.0, out=np.zeros(len(first)), where=first >= 0)
    return out


def metric_table(per_model: Mapping[str, Mapping[str, np.ndarray]], columns: Sequence[str]) -> pl.DataFrame:
    """One row per model, mean of each metric over users."""
    return pl.DataFrame(
        [{"model": name, **{c: float(np.mean(m[c])) for c in columns}} for name, m in per_model.items()]
    )
