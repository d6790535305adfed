"""``recsys.topk.top_k`` against a plain numpy reference on random blocks: ties, -0.0 and +0.0,
+-inf, NaN, rows of every width from 1 to a few thousand items, k from 0 to beyond the row."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.topk import top_k


def reference(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's items sorted by (score desc, item asc), NaN last, cut at k: a lexicographic sort
    whose last key is the item index, so that no tie is left to the sort's stability."""
    n_rows, n_items = scores.shape
    k = max(0, min(k, n_items))
    items = np.arange(n_items)
    nan = np.isnan(scores)
    value = np.where(nan, 0, -scores.astype(np.float64))  # -0.0 and +0.0 tie as numbers do
    idx = np.array([np.lexsort((items, value[r], nan[r]))[:k] for r in range(n_rows)], dtype=np.int64)
    idx = idx.reshape(n_rows, k)
    return idx, np.take_along_axis(scores, idx, 1)


def random_block(rng: np.random.Generator, kind: int, n: int, m: int) -> np.ndarray:
    """Scores where ties straddle the cut often: few distinct values, mostly zeros (item-kNN),
    -inf masks (seen items), signed zeros, +inf and NaN."""
    if kind == 0:
        s = rng.random((n, m))
    elif kind == 1:
        s = rng.integers(0, 4, (n, m)).astype(np.float64)
    elif kind == 2:
        s = np.where(rng.random((n, m)) < 0.9, 0.0, rng.random((n, m)))
    elif kind == 3:
        s = rng.integers(-2, 3, (n, m)) * 0.0  # +0.0 and -0.0 only
        s[rng.random((n, m)) < 0.3] *= -1
    else:
        s = rng.normal(size=(n, m))
    s[rng.random((n, m)) < rng.choice([0.0, 0.3, 0.95])] = -np.inf
    if rng.random() < 0.3:
        s[rng.random((n, m)) < 0.02] = np.inf
    if rng.random() < 0.3:
        s[rng.random((n, m)) < rng.choice([0.01, 0.5])] = np.nan
    return s.astype(np.float32)


def assert_same(got: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray], msg: str) -> None:
    assert got[0].dtype == np.int64
    np.testing.assert_array_equal(got[0], ref[0], err_msg=msg)
    assert got[1].dtype == ref[1].dtype
    # Bit for bit: the values are the cells' own (a -0.0 stays -0.0).
    np.testing.assert_array_equal(
        got[1].view(np.uint32 if got[1].dtype == np.float32 else np.uint64),
        ref[1].view(np.uint32 if ref[1].dtype == np.float32 else np.uint64),
        err_msg=msg,
    )


@pytest.mark.parametrize("width", ["narrow", "wide"])
def test_top_k_equals_the_reference(width):
    rng = np.random.default_rng(0 if width == "narrow" else 1)
    for trial in range(400 if width == "narrow" else 60):
        n = int(rng.integers(1, 20))
        m = int(rng.integers(1, 60)) if width == "narrow" else int(rng.integers(300, 3000))
        scores = random_block(rng, trial % 5, n, m)
        k = int(rng.choice([rng.integers(0, m + 5), rng.integers(1, max(2, m // 8)), m, m + 3]))
        assert_same(top_k(scores, k), reference(scores, k), f"trial {trial}, {n}x{m}, k={k}")


def test_top_k_of_other_dtypes_and_empty_blocks():
    rng = np.random.default_rng(2)
    for dtype in (np.float64, np.int64):
        scores = rng.integers(0, 5, (7, 40)).astype(dtype)
        for k in (0, 3, 40, 50):
            assert_same(top_k(scores, k), reference(scores, k), f"{dtype.__name__}, k={k}")
    idx, val = top_k(np.zeros((0, 10), dtype=np.float32), 5)
    assert idx.shape == (0, 5) and val.shape == (0, 5)
    idx, val = top_k(np.zeros((3, 0), dtype=np.float32), 5)
    assert idx.shape == (3, 0) and val.shape == (3, 0)


def test_top_k_reads_non_contiguous_blocks():
    rng = np.random.default_rng(3)
    block = random_block(rng, 1, 30, 2000)
    view = block[::2, ::3]
    assert_same(top_k(view, 50), reference(np.ascontiguousarray(view), 50), "strided view")
