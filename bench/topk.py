"""Row-wise top-k: ``recsys.topk.top_k`` against a stable ``np.argsort`` of each row, in one process.

    python bench/topk.py                 # 4,096-row blocks, ~1 min on 2 cores
    python bench/topk.py --rows 1024 --rounds 3

The argsort gives the same result (best first, ties to the lower item index, NaN last) and is the
reference ``tests/rank/test_topk.py`` checks ``top_k`` against. Each case is a float32 block shaped like
one the export or the evaluation ranks: ALS-like scores with a few seen items at -inf, item-kNN's
mostly-zero rows, popularity counts (ties everywhere), a small catalogue with k near its size.
Both functions run on one thread, alternating, ``--rounds`` times; the table gives the median
microseconds per row and their ratio, and checks that the two results are equal.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from recsys.errors import run_script
from recsys.topk import top_k


def argsort_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(scores, idx, 1)


def cases(rows: int, rng: np.random.Generator) -> list[tuple[str, np.ndarray, int]]:
    users = rng.normal(size=(rows, 64)).astype(np.float32)
    als = users @ rng.normal(size=(5000, 64)).astype(np.float32).T
    als[rng.random(als.shape) < 0.002] = -np.inf  # seen items
    knn = np.where(rng.random((rows, 5000)) < 0.9, 0.0, rng.random((rows, 5000))).astype(np.float32)
    popularity = np.repeat(rng.integers(0, 50, (1, 5000)).astype(np.float32), rows, axis=0)
    small = users[:, :32] @ rng.normal(size=(1500, 32)).astype(np.float32).T
    return [
        ("ALS-like, 5,000 items", als, 100),
        ("ALS-like, 5,000 items", als, 300),
        ("90 % zeros (item-kNN), 5,000 items", knn, 300),
        ("popularity counts, 5,000 items", popularity, 100),
        ("1,500 items", small, 50),
        ("1,500 items", small, 500),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    blocks = cases(args.rows, rng)
    top_k(blocks[0][1][:4], 10)  # compile (or load) the kernels before timing
    print(f"{args.rows} rows per block, median of {args.rounds} alternating rounds, one thread\n")
    print("| block | k | top_k us/row | stable argsort us/row | argsort / top_k |")
    print("|---|---|---|---|---|")
    for name, scores, k in blocks:
        times: dict[str, list[float]] = {"top_k": [], "argsort": []}
        for r in range(args.rounds):
            order = (("top_k", top_k), ("argsort", argsort_top_k))
            for key, fn in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn(scores, k)
                times[key].append(time.perf_counter() - start)
        got, ref = top_k(scores, k), argsort_top_k(scores, k)
        if not (np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])):
            raise SystemExit(f"top_k and the argsort differ on {name}, k={k}")
        fast, slow = (float(np.median(times[key])) / len(scores) * 1e6 for key in ("top_k", "argsort"))
        print(f"| {name} | {k} | {fast:.1f} | {slow:.1f} | {slow / fast:.1f}x |")


if __name__ == "__main__":
    run_script(main)
