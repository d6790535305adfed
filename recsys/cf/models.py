"""Wrappers around ``implicit`` that score the whole catalogue, plus a popularity baseline.

implicit runs 30-40 % slower with 2 OpenBLAS threads than with 1 on these machines, so every
call into it is wrapped in ``threadpool_limits(1, "blas")`` (implicit's own advice, see its
``check_blas_config`` warning). Items without a single event in the history get zero factors:
implicit leaves BPR's random initial vectors for them, which would score cold items at random.
"""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys.columns import Columns
from recsys.recommender import History, Recommender


class _FactorModel(Recommender):
    user_factors: np.ndarray
    item_factors: np.ndarray

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return self.user_factors[users] @ self.item_factors.T

    def _store(self, model, history: History) -> None:
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32).copy()
        self.item_factors[history.item_counts == 0] = 0.0


class ALS(_FactorModel):
    """implicit ALS on event-weighted counts; confidence = 1 + alpha * weight."""

    name = "als"

    def __init__(
        self, factors: int = 64, regularization: float = 0.05, alpha: float = 10.0, iterations: int = 15, seed: int = 0
    ) -> None:
        self.factors, self.regularization, self.alpha = factors, regularization, alpha
        self.iterations, self.seed = iterations, seed

    def fit(self, history: History) -> ALS:
        from implicit.cpu.als import AlternatingLeastSquares

        with threadpool_limits(1, "blas"):  # implicit checks the BLAS threads when constructed
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.iterations,
                random_state=self.seed,
            )
            model.fit(history.matrix, show_progress=False)
        self._store(model, history)
        return self


class BPR(_FactorModel):
    """implicit BPR. One thread: its Hogwild updates make multi-threaded runs non-reproducible."""

    name = "bpr"

    def __init__(
        self,
        factors: int = 64,
        learning_rate: float = 0.05,
        regularization: float = 0.01,
        iterations: int = 100,
        seed: int = 0,
    ) -> None:
        self.factors, self.learning_rate, self.regularization = factors, learning_rate, regularization
        self.iterations, self.seed = iterations, seed

    def fit(self, history: History) -> BPR:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        model = BayesianPersonalizedRanking(
            factors=self.factors,
            learning_rate=self.learning_rate,
            regularization=self.regularization,
            iterations=self.iterations,
            num_threads=1,
            random_state=self.seed,
        )
        with threadpool_limits(1, "blas"):
            model.fit(history.matrix, show_progress=False)
        self._store(model, history)
        return self


class ItemKNN(Recommender):
    """Item-item cosine neighbours (implicit's CosineRecommender); user score = sum of similarities."""

    name = "itemknn"

    def __init__(self, neighbours: int = 100, binary: bool = True) -> None:
        self.neighbours, self.binary = neighbours, binary

    def fit(self, history: History) -> ItemKNN:
        from implicit.nearest_neighbours import CosineRecommender

        m = history.matrix.copy()
        if self.binary:
            m.data[:] = 1.0
        model = CosineRecommender(K=self.neighbours)
        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            # implicit converts its own intermediate COO matrix and warns about it.
            warnings.filterwarnings("ignore", message="Method expects CSR input")
            model.fit(m, show_progress=False)
        self.similarity = sp.csr_matrix(model.similarity, dtype=np.float32)
        self.user_items = m.astype(np.float32)
        return self

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return (self.user_items[users] @ self.similarity).toarray()


class Popularity(Recommender):
    """Event-weighted item counts, optionally only over the last ``window_days`` of the history."""

    name = "popularity"

    def __init__(self, window_days: float | None = None) -> None:
        self.window_days = window_days

    def fit(self, history: History) -> Popularity:
        df = history.interactions
        if self.window_days is not None and df.height:
            cut = df[Columns.Timestamp].max() - int(self.window_days * 86400)
            df = df.filter(pl.col(Columns.Timestamp) >= cut)
        counts = np.bincount(
            df[Columns.ItemIdx].to_numpy(), weights=df[Columns.Weight].to_numpy(), minlength=history.n_items
        )
        self.counts = counts.astype(np.float32)
        return self

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts)))
