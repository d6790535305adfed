"""Compiled (numba) loops of the export's per-row work: history explanations and list rules.

Each replaced whole-block numpy or torch passes (gathers of ``[rows, history]`` item vectors or
similarities, a mask per column) that materialised large temporaries; a row at a time in
compiled code, the work stays in cache. Each keeps the result of the code it replaced (first
position on ties, removal counts): ``tests/test_export_fast.py`` compares them.

The kernels are compiled on first use and cached on disk (``cache=True``); they run on one thread,
like the rest of the export (its parallelism is worker processes).
"""

from __future__ import annotations

import numba
import numpy as np

# How ``nearest_history`` gets the similarity of history item j to item i.
DOT, DENSE, SPARSE = 0, 1, 2


@numba.njit(cache=True, nogil=True, fastmath=True)
def nearest_history(
    kind: int,
    table: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    hist: np.ndarray,
    mask: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row r: the position in user ``users[r]``'s history (``hist``/``mask`` ``[users, H]``)
    of the item most similar to item ``items[r]``, and that similarity (-inf where the history is
    empty). The first position wins ties. The similarity of history item j to item i is

    * ``DOT``: the dot product of rows i and j of ``table`` (unit item vectors);
    * ``DENSE``: ``table[i, j]`` (a cached item x item cosine matrix);
    * ``SPARSE``: entry (j, i) of the CSR matrix ``indptr``/``indices`` with its values as the
      column ``table`` (sorted indices; absent = 0): an item-kNN model's neighbours.
    """
    n = len(users)
    arg = np.zeros(n, dtype=np.int64)
    val = np.full(n, -np.inf, dtype=np.float32)
    for r in range(n):
        u, i = users[r], items[r]
        best, at = np.float32(-np.inf), 0
        for h in range(hist.shape[1]):
            if not mask[u, h]:
                continue
            j = hist[u, h]
            if kind == DOT:
                s = np.float32(0.0)
                for d in range(table.shape[1]):
                    s += table[i, d] * table[j, d]
            elif kind == DENSE:
                s = table[i, j]
            else:
                lo, hi = indptr[j], indptr[j + 1]
                p = lo + np.searchsorted(indices[lo:hi], i)
                s = table[p, 0] if p < hi and indices[p] == i else np.float32(0.0)
            if s > best:
                best, at = s, h
        arg[r], val[r] = at, best
    return arg, val


@numba.njit(cache=True, nogil=True)
def list_rules(
    items: np.ndarray,
    scores: np.ndarray,
    allowed: np.ndarray,
    min_score: float,
    category: np.ndarray,
    cap: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``recsys.export.rules.apply_rules_dense`` on ranked rows ``items``/``scores`` ``[n, m]``:
    the rank (from 1) of every cell kept, 0 elsewhere, and how many cells the item rules (cells
    of items outside ``allowed``), ``min_score`` and the category cap removed, in that order of
    precedence. Rules are off when given empty: ``allowed`` or ``category`` of length 0, a NaN
    ``min_score``."""
    n, m = items.shape
    rank = np.zeros((n, m), dtype=np.int32)
    removed = np.zeros(3, dtype=np.int64)
    use_cap = len(category) > 0
    count = np.zeros(category.max() + 1 if use_cap else 1, dtype=np.int32)
    for r in range(n):
        kept = 0
        for c in range(m):
            s = scores[r, c]
            if not np.isfinite(s):
                continue
            i = items[r, c]
            if len(allowed) and not allowed[i]:
                removed[0] += 1
                continue
            if s < min_score:  # False for a NaN min_score
                removed[1] += 1
                continue
            if use_cap:
                g = category[i]
                if count[g] >= cap:
                    removed[2] += 1
                    continue
                count[g] += 1
            kept += 1
            if kept <= k:
                rank[r, c] = kept
        if use_cap:
            for c in range(m):
                count[category[items[r, c]]] = 0
    return rank, removed
