"""Row-wise top-k: each row's k best (index, value) pairs, best first, ties to the lower index.

``top_k`` is the one selection every ranked list goes through: model recommendations in
training and evaluation, the export's candidates and single-stage lists, popularity's shared
order. A compiled pass per row keeps the cells above a sampled threshold as 64-bit keys that
sort as (value desc, index asc), selects the k smallest keys and numpy sorts only those. A sort
of the whole row does the same work for every item: on 4,096-user blocks of 1,500-5,000 items
(k = 50-500) a stable ``np.argsort`` took 6-70x longer, ``np.argpartition`` with a tie repair
2-6x longer wherever k was more than a quarter of the row.
"""

from __future__ import annotations

import numba
import numpy as np

from recsys.jit import njit


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a ``[rows, items]`` array: ``(indices int64, values)``, each ``[rows,
    min(k, items)]``, best first, ties broken by the lower item index, NaN after every number
    (the order of a stable ``np.argsort(-scores)``). -inf cells are ranked like any value, so a
    row with fewer than k finite cells ends in -inf (or NaN) cells; callers drop non-finite ones.

    Float32 rows go through the compiled selection (``best_keys``); other dtypes, and rows whose
    k best include a NaN, are sorted with a stable argsort.
    """
    scores = np.asarray(scores)
    n_rows, n_items = scores.shape
    k = max(0, min(int(k), n_items))
    if scores.dtype != np.float32 or n_rows == 0 or k == 0:
        return _sorted_top_k(scores, k)
    scores = np.ascontiguousarray(scores)
    keys = np.empty((n_rows, k), dtype=np.uint64)
    bits = scores.view(np.uint32)
    failed = best_keys(scores, bits, keys)
    keys[failed] = 0  # not set by the kernel: any valid cell until they are ranked below
    keys.sort(axis=1)
    idx, top = decode_keys(keys, bits)
    if len(failed):
        idx[failed], top[failed] = _sorted_top_k(scores[failed], k)
    return idx, top


def _sorted_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(scores, idx, 1)


@numba.njit(inline="always")
def _key(bits, j):
    """The sort key of a cell from its float32 bits and item index: the bits made monotone
    (negatives flipped, -0.0 as +0.0, so that equal values tie) and reversed, above the index."""
    u = np.uint64(bits)
    if u == np.uint64(0x80000000):
        u = np.uint64(0)
    u = (u ^ np.uint64(0xFFFFFFFF)) if u & np.uint64(0x80000000) else (u | np.uint64(0x80000000))
    return ((np.uint64(0xFFFFFFFF) - u) << np.uint64(32)) | np.uint64(j)


@numba.njit(inline="always")
def _select(a, n, k):
    """Reorder ``a[:n]`` so that its ``k`` smallest values come first (in any order) and return
    the k-th smallest: a quickselect whose partition step is branch-free (Lomuto's, with the
    swap done unconditionally and the boundary advanced by the comparison), so its cost does not
    depend on how well the branch predictor guesses random keys."""
    lo, hi = 0, n - 1
    target = k - 1
    while lo < hi:
        mid = (lo + hi) // 2  # median of three, moved to hi as the pivot
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[mid] < a[hi]:
            a[mid], a[hi] = a[hi], a[mid]
        pivot = a[hi]
        store = lo
        for i in range(lo, hi):
            x = a[i]
            a[i] = a[store]
            a[store] = x
            store += x < pivot
        a[hi] = a[store]
        a[store] = pivot
        if store == target:
            break
        if store < target:
            lo = store + 1
        else:
            hi = store - 1
    return a[target]


@njit(cache=True, nogil=True)
def best_keys(scores: np.ndarray, bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """For each row of ``scores`` (float32; ``bits``: its ``view(np.uint32)``), the sort keys of
    its k best cells (k = ``out.shape[1]``), unsorted, in ``out``. Returns the rows where that
    failed (fewer than k cells that are numbers: NaN among the k best), which the caller ranks
    another way.

    A row is read at least twice: every ~n/256-th cell, to take as threshold ``t`` a value with
    about 2k cells above it (the q-th best of those samples), then all cells, keeping those > t
    (branch-free: the index is written whatever the test says and the count advances by its
    result), or, if fewer than k are, those >= t (ties at t). If k or more cells are kept, the k
    best are among them; only those are keyed, and a selection keeps the k smallest keys. If
    not (the samples were unluckily high: a few % of rows at k = 50), q doubles and the row is
    scanned again; once every sample has been tried, every cell that is a number is kept.
    """
    n_rows, n_items = scores.shape
    k = out.shape[1]
    survivors = np.empty(n_items, dtype=np.int64)
    keys = np.empty(n_items, dtype=np.uint64)
    failed = np.zeros(n_rows, dtype=np.bool_)
    stride = max(1, n_items // 256)
    for r in range(n_rows):
        row, row_bits = scores[r], bits[r]
        q = 2 * k // stride + 2
        c = 0
        while c < k:
            m = 0
            for j in range(0, n_items, stride):
                keys[m] = _key(row_bits[j], j)
                m += 1
            q = min(m, q)
            t = row[_select(keys, m, q) & np.uint64(0xFFFFFFFF)]
            c = _cells_above(row, t, survivors, False)
            if c < k:  # ties at t (a block of zeros, -inf): the cells equal to it too
                c = _cells_above(row, t, survivors, True)
            if c < k and q == m:  # every sample tried (k near the row's length): every number
                c = _cells_above(row, np.float32(-np.inf), survivors, True)
                break
            q *= 2
        if c < k:
            failed[r] = True
            continue
        for j in range(c):
            keys[j] = _key(row_bits[survivors[j]], survivors[j])
        if c > k:
            _select(keys, c, k)
        for j in range(k):
            out[r, j] = keys[j]
    return np.flatnonzero(failed)


@numba.njit(inline="always")
def _cells_above(row, t, survivors, or_equal) -> int:
    """Indices of the cells > ``t`` (>= with ``or_equal``) into ``survivors``; their count."""
    c = 0
    if or_equal:
        for j in range(len(row)):
            survivors[c] = j
            c += row[j] >= t
    else:
        for j in range(len(row)):
            survivors[c] = j
            c += row[j] > t
    return c


@njit(cache=True, nogil=True)
def decode_keys(keys: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Item indices and float32 values of sorted sort keys ``[rows, k]`` (``_key`` undone), the
    value read back from the row's own ``bits`` (``scores.view(np.uint32)``) where the key made
    a -0.0 a +0.0, in one pass over the block."""
    n, k = keys.shape
    idx = np.empty((n, k), dtype=np.int64)
    val = np.empty((n, k), dtype=np.uint32)
    for r in range(n):
        for c in range(k):
            key = keys[r, c]
            j = np.int64(key & np.uint64(0xFFFFFFFF))
            u = np.uint32(np.uint64(0xFFFFFFFF) - (key >> np.uint64(32)))
            v = (u & np.uint32(0x7FFFFFFF)) if u & np.uint32(0x80000000) else (u ^ np.uint32(0xFFFFFFFF))
            idx[r, c] = j
            val[r, c] = bits[r, j] if v == 0 else v
    return idx, val.view(np.float32)
