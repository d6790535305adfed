"""Beyond accuracy: what the lists look like, whatever the users picked.

All measures take top-k lists ``[n_users, k]`` (item indices, -1 = no item) and describe them:

* **coverage**: share of the catalogue that appears in at least one list;
* **novelty**: mean self-information ``-log2 p(i)`` of recommended items, with ``p(i)`` the item's
  share of training events, Laplace-smoothed (``(count + 1) / (events + n_items)``) so a cold item
  has a finite, high value (Zhou et al. 2010, PNAS 107(10));
* **intra-list diversity**: per list, ``1 - mean cosine`` between the text embeddings of every pair
  of its items, averaged over lists (Ziegler et al. 2005);
* **popularity percentile**: mean percentile (0 = least, 100 = most popular, ties averaged) of
  the recommended items' training popularity;
* **Gini of exposure**: inequality of how often each catalogue item is recommended
  (0 = every item equally often, (n-1)/n = always the same item).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from recsys.jit import njit


def gini(exposure: np.ndarray) -> float:
    """Gini coefficient of non-negative counts.

    >>> gini(np.array([5, 5, 5, 5])), gini(np.array([0, 0, 0, 8]))
    (0.0, 0.75)
    """
    x = np.sort(np.asarray(exposure, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float(2 * np.sum(np.arange(1, n + 1) * x) / (n * total) - (n + 1) / n)


def intra_list_diversity(lists: np.ndarray, embeddings: np.ndarray) -> float:
    """Mean over lists (with at least two items) of ``1 - mean pairwise cosine``.

    >>> e = np.eye(3)
    >>> intra_list_diversity(np.array([[0, 1, 2]]), e), intra_list_diversity(np.array([[0, 0]]), e)
    (1.0, 0.0)
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    emb = np.ascontiguousarray(emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12))
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    off_diag = np.zeros(len(lists), dtype=np.float64)
    n = np.zeros(len(lists), dtype=np.float64)
    _pair_cosines(lists, emb, off_diag, n)
    pairs = n * (n - 1)
    ok = pairs > 0
    return float((1.0 - off_diag[ok] / pairs[ok]).mean()) if ok.any() else float("nan")


@njit(cache=True, nogil=True)
def _pair_cosines(lists: np.ndarray, emb: np.ndarray, off_diag: np.ndarray, n: np.ndarray) -> None:
    # Sum of cosines over ordered pairs i != j = |sum_i v_i|^2 - n for n unit vectors: O(k d) per
    # list instead of the k x k Gram matrix, and no [lists, k, d] gather (8 x 6.6 s at 300,000 users).
    total = np.zeros(emb.shape[1], dtype=np.float32)
    for r in range(lists.shape[0]):
        total[:] = 0.0
        count = 0
        for j in range(lists.shape[1]):
            item = lists[r, j]
            if item >= 0:
                count += 1
                total += emb[item]
        off_diag[r] = float(np.dot(total, total)) - count
        n[r] = count


def beyond_accuracy(lists: np.ndarray, train_count: np.ndarray, embeddings: np.ndarray | None) -> dict[str, float]:
    """The measures above for one model's top-k lists; diversity is NaN without embeddings."""
    counts = np.asarray(train_count, dtype=np.float64)
    n_items = len(counts)
    items = lists[lists >= 0]
    p = (counts + 1.0) / (counts.sum() + n_items)
    percentile = (rankdata(counts, method="average") - 1) / max(n_items - 1, 1) * 100
    exposure = np.bincount(items, minlength=n_items)
    return {
        "coverage": float((exposure > 0).sum() / n_items),
        "novelty": float(np.mean(-np.log2(p[items]))) if len(items) else float("nan"),
        "diversity": intra_list_diversity(lists, embeddings) if embeddings is not None else float("nan"),
        "popularity_percentile": float(percentile[items].mean()) if len(items) else float("nan"),
        "gini": gini(exposure),
    }
