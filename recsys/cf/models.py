"""Wrappers around ``implicit`` that score the whole catalogue, plus a popularity baseline.

implicit runs 30-40 % slower with 2 OpenBLAS threads than with 1 on these machines, so every
call into it is wrapped in ``threadpool_limits(1, "blas")`` (implicit's own advice, see its
``check_blas_config`` warning). Items without a single event in the history get zero factors:
implicit leaves BPR's random initial vectors for them, which would score cold items at random.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_type_hints

import numpy as np
import polars as pl
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys.columns import Columns
from recsys.errors import ConfigError, reading, require_whole
from recsys.kernels import pair_scores
from recsys.recommender import History, ModelUpdate, Recommender, Updatable, fixed_block_matmul

MODEL_FILE = "model.npz"

_Family = TypeVar("_Family", bound=Recommender)


def show_progress(progress: bool | None) -> bool:
    """Whether a fit shows implicit's bar: as asked, or (None) when stderr is a terminal. BPR's
    bar redraws at every iteration whatever tqdm's pace (its postfix), which in a log file is a
    record per iteration."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def read_npz(file: Path) -> dict[str, np.ndarray]:
    """Every array of a model's ``.npz`` (no pickle); an ``InputError`` naming the file if it
    cannot be read."""
    with reading(file), np.load(file, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class _Saved(Recommender):
    """Saves its constructor's arguments (``PARAMS``) in meta.json and its arrays in one npz."""

    PARAMS: ClassVar[tuple[str, ...]] = ()

    def arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        raise NotImplementedError

    def save(self, folder: Path) -> dict[str, Any]:
        folder.mkdir(parents=True)
        np.savez(folder / MODEL_FILE, **self.arrays())
        return {"kind": self.kind, **{k: getattr(self, k) for k in self.PARAMS}}

    @classmethod
    def files(cls, info: Mapping[str, Any]) -> list[str]:
        return [MODEL_FILE]

    @classmethod
    def saved_fields(cls) -> dict[str, Any]:
        """The constructor's arguments in ``PARAMS``, as annotated."""
        hints = get_type_hints(cls.__init__)
        return {k: hints[k] for k in cls.PARAMS}

    @classmethod
    def load(cls, folder: Path, info: Mapping[str, Any]) -> Recommender:
        model = cls(**{k: info[k] for k in cls.PARAMS})
        arrays = read_npz(folder / MODEL_FILE)
        with reading(folder / MODEL_FILE):  # a missing array is this file's fault
            model.restore(arrays)
        return model


def configured_copy(name: str, configured: Recommender | None, family: type[_Family], label: str) -> _Family:
    """A copy of ``configured``, to refit in place of the pipeline's model ``name``
    (``Updatable.refitted``): a ``ConfigError`` naming ``label`` unless it is of ``family``, since a
    refit fits what the config says and this config has no such model to say it."""
    if not isinstance(configured, family):
        raise ConfigError(f"the model's config has no {label} '{name}' to refit")
    return copy.deepcopy(configured)


class _FactorModel(_Saved, Updatable):
    user_factors: np.ndarray
    item_factors: np.ndarray
    writes_into = True
    alpha: float = 1.0  # the fold-in's confidence scale (ALS sets its own)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"user_factors": self.user_factors, "item_factors": self.item_factors}

    def restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.user_factors, self.item_factors = arrays["user_factors"], arrays["item_factors"]

    def for_users(self, history: History, known: np.ndarray) -> _FactorModel:
        """Known users keep their trained factors; the others are folded in (``fold_in``)."""
        uf = np.zeros((history.n_users, self.item_factors.shape[1]), dtype=np.float32)
        old = known >= 0
        uf[old] = self.user_factors[known[old]]
        if len(new := np.flatnonzero(~old)):
            uf[new] = fold_in(self.item_factors, history.matrix[new], self.regularization, self.alpha)
        out = copy.copy(self)
        out.user_factors = uf
        out.note_history(history)
        return out

    def item_space(self) -> np.ndarray:
        return unit_rows(self.item_factors)

    def refitted(self, name: str, configured: Recommender | None, update: ModelUpdate) -> _FactorModel:
        """The configured ALS or BPR (either may follow the other: both are user and item
        factors), continued from these factors for ``warm_iterations`` (``_warm``), which is
        cheaper than a cold fit and lands next to this model."""
        model = configured_copy(name, configured, _FactorModel, "factor model")
        start = None
        if update.warm_iterations is not None:
            model.iterations, start = update.warm_iterations, (self.user_factors, self.item_factors)
        return model.fit(update.history, start=start)

    def folded_in(self, name: str, configured: Recommender | None, update: ModelUpdate) -> _FactorModel:
        """The item factors kept, zero for the new items (nothing has learned them: they score 0,
        as items without events do); the users with new events solved again against them
        (``fold_in``), the others' factors kept."""
        h, touched = update.history, update.touched
        item_f = np.zeros((h.n_items, self.item_factors.shape[1]), dtype=np.float32)
        item_f[: len(self.item_factors)] = self.item_factors
        user_f = np.zeros((h.n_users, item_f.shape[1]), dtype=np.float32)
        user_f[: len(self.user_factors)] = self.user_factors
        user_f[touched] = fold_in(item_f, h.matrix[touched], self.regularization, self.alpha)
        out = copy.copy(self)
        out.user_factors, out.item_factors = user_f, item_f
        return out

    def score_users(self, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return fixed_block_matmul(self.user_factors[users], self.item_factors.T, out)

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int | None = None) -> np.ndarray:
        return pair_scores(self.user_factors, self.item_factors, users, items)

    def _store(self, model, history: History) -> None:
        self.note_history(history)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32).copy()
        self.item_factors[history.item_counts == 0] = 0.0

    @staticmethod
    def _warm(model, history: History, start: tuple[np.ndarray, np.ndarray], user_bias: bool = False) -> None:
        """Start ``model`` from ``start`` (user and item factors of an earlier fit, whose users and
        items are the first rows of ``history``'s): rows for users and items it lacks are zero
        (with BPR's user bias column at 1, as implicit initialises it)."""
        users = np.zeros((history.n_users, start[0].shape[1]), dtype=np.float32)
        items = np.zeros((history.n_items, start[1].shape[1]), dtype=np.float32)
        if user_bias:
            users[:, -1] = 1.0
        users[: len(start[0])] = start[0]
        items[: len(start[1])] = start[1]
        model.user_factors, model.item_factors = users, items


class ALS(_FactorModel):
    """implicit ALS on event-weighted counts; confidence = 1 + alpha * weight.

    ``progress``: implicit's progress bar over the iterations (as for BPR and item-kNN), like the
    other long steps of a run; None (the default): when stderr is a terminal (``show_progress``).
    """

    name = "als"
    kind = "ALS"
    PARAMS = ("factors", "regularization", "alpha", "iterations", "seed")

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 10.0,
        iterations: int = 15,
        seed: int = 0,
        progress: bool | None = None,
    ) -> None:
        self.factors, self.regularization, self.alpha = factors, regularization, alpha
        self.iterations, self.seed, self.progress = iterations, seed, progress

    def fit(self, history: History, start: tuple[np.ndarray, np.ndarray] | None = None) -> ALS:
        """``start``: continue from these user and item factors (``_warm``) instead of random ones."""
        from implicit.cpu.als import AlternatingLeastSquares

        with threadpool_limits(1, "blas"):  # implicit checks the BLAS threads when constructed
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.iterations,
                random_state=self.seed,
            )
            if start is not None:
                self._warm(model, history, start)
            model.fit(history.matrix, show_progress=show_progress(self.progress))
        self._store(model, history)
        return self


class BPR(_FactorModel):
    """implicit BPR. One thread: its Hogwild updates make multi-threaded runs non-reproducible."""

    name = "bpr"
    kind = "BPR"
    PARAMS = ("factors", "learning_rate", "regularization", "iterations", "seed")

    def __init__(
        self,
        factors: int = 64,
        learning_rate: float = 0.05,
        regularization: float = 0.01,
        iterations: int = 100,
        seed: int = 0,
        progress: bool | None = None,
    ) -> None:
        self.factors, self.learning_rate, self.regularization = factors, learning_rate, regularization
        self.iterations, self.seed, self.progress = iterations, seed, progress

    def fit(self, history: History, start: tuple[np.ndarray, np.ndarray] | None = None) -> BPR:
        """``start``: continue from these user and item factors (``_warm``) instead of random ones."""
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        model = BayesianPersonalizedRanking(
            factors=self.factors,
            learning_rate=self.learning_rate,
            regularization=self.regularization,
            iterations=self.iterations,
            num_threads=1,
            random_state=self.seed,
        )
        if start is not None:
            self._warm(model, history, start, user_bias=True)
        with threadpool_limits(1, "blas"):
            model.fit(history.matrix, show_progress=show_progress(self.progress))
        self._store(model, history)
        return self


class ItemKNN(_Saved, Updatable):
    """Item-item cosine neighbours (implicit's CosineRecommender); user score = sum of similarities.

    ``recency_decay`` (0 < d <= 1) weights the user's history items by ``d ** k``, k = how many
    distinct items the user touched after it (0 for the last one), so the scores lean towards
    neighbours of what the user did last. ``None`` sums every history item alike. Either way the
    similarities themselves come from the whole (binary) history.
    """

    name = "itemknn"
    kind = "ItemKNN"
    PARAMS = ("neighbours", "binary", "recency_decay")

    def __init__(
        self,
        neighbours: int = 100,
        binary: bool = True,
        recency_decay: float | None = None,
        progress: bool | None = None,
    ) -> None:
        if neighbours < 1:
            raise ValueError(f"{type(self).__name__} neighbours must be >= 1, got {neighbours}")
        if recency_decay is not None and not 0.0 < recency_decay <= 1.0:
            raise ValueError(f"{type(self).__name__} recency_decay must be in (0, 1] or null, got {recency_decay}")
        self.neighbours, self.binary, self.recency_decay = neighbours, binary, recency_decay
        self.progress = progress

    def fit(self, history: History) -> ItemKNN:
        from implicit.nearest_neighbours import CosineRecommender

        m = history.matrix.copy()
        if self.binary:
            m.data[:] = 1.0
        model = CosineRecommender(K=self.neighbours)
        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            # implicit converts its own intermediate COO matrix and warns about it.
            warnings.filterwarnings("ignore", message="Method expects CSR input")
            model.fit(m, show_progress=show_progress(self.progress))
        self.similarity = sp.csr_matrix(model.similarity, dtype=np.float32)
        self.user_items = user_rows(history, self.recency_decay, self.binary)
        self.note_history(history)
        return self

    writes_into = True

    def score_users(self, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is not None:
            out.fill(0.0)  # toarray adds the product's entries into it
        return (self.user_items[users] @ self.similarity).toarray(out=out)

    def arrays(self) -> dict[str, np.ndarray]:
        s = self.similarity
        return {"data": s.data, "indices": s.indices, "indptr": s.indptr, "shape": np.asarray(s.shape)}

    def restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        a = arrays
        self.similarity = sp.csr_matrix((a["data"], a["indices"], a["indptr"]), shape=tuple(a["shape"]))

    def for_users(self, history: History, known: np.ndarray) -> ItemKNN:
        out = copy.copy(self)
        out.user_items = user_rows(history, self.recency_decay, self.binary)
        out.note_history(history)
        return out

    def item_space(self) -> sp.csr_matrix:
        s = self.similarity.astype(np.float32)  # a copy: sorted for the explanations' binary search
        s.sort_indices()
        return s

    def refitted(self, name: str, configured: Recommender | None, update: ModelUpdate) -> ItemKNN:
        """The configured item-kNN (cosine, sequential or EASE: each an item x item similarity, so
        any may follow any) fitted anew: a similarity has nothing to continue from."""
        return configured_copy(name, configured, ItemKNN, "item-kNN model").fit(update.history)

    def folded_in(self, name: str, configured: Recommender | None, update: ModelUpdate) -> ItemKNN:
        """The similarities kept, padded with empty rows and columns for the new items (they score
        0 until a refit); the users' rows are read from their histories when served
        (``for_users``)."""
        s, n = self.similarity.tocoo(), update.history.n_items
        out = copy.copy(self)
        out.similarity = sp.csr_matrix((s.data, (s.row, s.col)), shape=(n, n))
        return out


class SequentialKNN(ItemKNN):
    """Item-kNN whose neighbours are what users moved on to: item j -> item i counts the users
    who consumed i within ``window`` events after j (weight 1/distance), scaled by
    ``1 / sqrt(events_j * events_i)`` like a cosine, top ``neighbours`` per item. Directional,
    unlike ItemKNN's cosine: with ``recency_decay`` it scores "what usually comes next" after
    the user's last items. Scored and served exactly as an ItemKNN (history row x similarity).
    """

    name = "itemknn_next"
    # Saved and loaded as an ItemKNN (its kind): the window only matters when fitting.

    def __init__(self, neighbours: int = 100, window: int = 3, recency_decay: float | None = 0.5) -> None:
        if window < 1:
            raise ValueError(f"SequentialKNN window must be >= 1, got {window}")
        super().__init__(neighbours=neighbours, binary=True, recency_decay=recency_decay)
        self.window = window

    def fit(self, history: History) -> SequentialKNN:
        df = history.interactions  # sorted by user, timestamp
        users = df[Columns.UserIdx].to_numpy()
        items = df[Columns.ItemIdx].to_numpy().astype(np.int64)
        src, dst, w = [], [], []
        for gap in range(1, self.window + 1):
            same = (users[:-gap] == users[gap:]) & (items[:-gap] != items[gap:])
            src.append(items[:-gap][same])
            dst.append(items[gap:][same])
            w.append(np.full(int(same.sum()), 1.0 / gap, dtype=np.float32))
        n = history.n_items
        counts = sp.csr_matrix((np.concatenate(w), (np.concatenate(src), np.concatenate(dst))), shape=(n, n))
        counts.sum_duplicates()
        coo = counts.tocoo()
        events = np.maximum(history.item_counts, 1).astype(np.float64)
        coo.data = (coo.data / np.sqrt(events[coo.row] * events[coo.col])).astype(np.float32)
        self.similarity = top_per_row(coo, self.neighbours)
        self.user_items = user_rows(history, self.recency_decay)
        self.note_history(history)
        return self


class EASE(ItemKNN):
    """Steck's EASE ("Embarrassingly Shallow Autoencoders", WWW 2019): the item-item weights
    ``B`` that best rebuild each user's (binary) row from the user's other items, in closed form:
    ``P = (X^T X + regularization * I)^-1``, ``B_ij = -P_ij / P_jj``, ``B_jj = 0``. Unlike a
    cosine, the weights are learned jointly (an item's neighbours explain away each other) and
    may be negative. The ``neighbours`` largest weights of each item are kept, so it is scored,
    saved and served exactly as an ItemKNN (history row x weights); ``recency_decay`` weights
    the history as ItemKNN's does.

    The fit inverts a dense items x items matrix in place: ``8 * n_items ** 2`` bytes and
    ``n_items ** 3`` time (on 2 cores: 4,385 items 2.3 s; the inversion alone at 10,000 items 26 s,
    so 20,000 items take 3.2 GB and about 3.5 min). Catalogues past ``max_items`` are refused
    before that work starts.
    """

    name = "ease"
    # Saved and loaded as an ItemKNN (its kind): the regularization only matters when fitting.

    def __init__(
        self,
        regularization: float = 50.0,
        neighbours: int = 200,
        recency_decay: float | None = None,
        max_items: int = 20_000,
    ) -> None:
        # ConfigError: one line and exit 2 from the entry points, before anything is fitted.
        if not regularization > 0:
            raise ConfigError(f"EASE regularization must be > 0, got {regularization}")
        require_whole("EASE max_items", max_items)
        super().__init__(neighbours=neighbours, binary=True, recency_decay=recency_decay)
        self.regularization, self.max_items = float(regularization), max_items

    def check_catalogue(self, n_items: int) -> None:
        n = n_items
        if n > self.max_items:  # a ConfigError: one line and exit 2, before the inversion
            raise ConfigError(
                f"EASE inverts a dense items x items matrix: {n:,} items need about {8 * n * n / 1e9:.1f} GB "
                f"and {2 * n**3:.1e} flops, past its max_items ({self.max_items:,}); drop it from cf for this "
                "catalogue (item-kNN scales) or raise max_items if the machine holds it"
            )

    def fit_memory_gb(self, n_items: int) -> float:
        # The dense Gram matrix in float64, inverted in place, and its float32 source: 12 bytes an
        # entry (measured: 0.25 / 0.76 GB at 4,000 / 8,000 items, 20,000 users).
        return 12 * n_items**2 / 1e9

    def fit(self, history: History) -> EASE:
        import scipy.linalg

        self.check_catalogue(history.n_items)
        x = history.matrix.copy()
        x.data[:] = 1.0
        gram = (x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self.regularization
        weights = scipy.linalg.inv(gram, overwrite_a=True, check_finite=False)
        weights /= -np.diag(weights).copy()  # B_ij = -P_ij / P_jj: column j divided by P_jj
        np.fill_diagonal(weights, 0.0)
        self.similarity = top_per_dense_row(weights, self.neighbours)
        self.user_items = user_rows(history, self.recency_decay)
        self.note_history(history)
        return self


def unit_rows(v: np.ndarray) -> np.ndarray:
    """``v``'s rows scaled to unit length (all-zero rows stay zero), float32 C-ordered: the item
    space of a model that scores by dot products with item vectors."""
    return np.ascontiguousarray(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def top_per_dense_row(m: np.ndarray, k: int, chunk: int = 1024) -> sp.csr_matrix:
    """The ``k`` largest entries of each row of a dense matrix, as float32 CSR (columns sorted),
    a chunk of rows at a time: never the ``n ** 2`` (row, column, value) triples of a COO copy."""
    n_rows, n_cols = m.shape
    k = min(k, n_cols)
    cols = np.empty((n_rows, k), dtype=np.int32)
    for start in range(0, n_rows, chunk):
        block = m[start : start + chunk]
        top = (
            np.argpartition(-block, k - 1, axis=1)[:, :k] if k < n_cols else np.tile(np.arange(n_cols), (len(block), 1))
        )
        cols[start : start + chunk] = np.sort(top, axis=1)
    vals = np.take_along_axis(m, cols, axis=1).astype(np.float32)
    indptr = np.arange(0, n_rows * k + 1, k, dtype=np.int64)
    out = sp.csr_matrix((vals.ravel(), cols.ravel(), indptr), shape=m.shape)
    out.eliminate_zeros()  # an item without events has an all-zero row
    return out


def top_per_row(m: sp.coo_matrix, k: int) -> sp.csr_matrix:
    """The ``k`` largest entries of each row (ties: lower column first), as float32 CSR."""
    order = np.lexsort((m.col, -m.data, m.row))
    row, col, val = m.row[order], m.col[order], m.data[order]
    start = np.searchsorted(row, np.arange(m.shape[0]))
    keep = np.arange(len(row)) - start[row] < k
    out = sp.csr_matrix((val[keep], (row[keep], col[keep])), shape=m.shape, dtype=np.float32)
    out.sort_indices()
    return out


def user_rows(history: History, recency_decay: float | None = None, binary: bool = True) -> sp.csr_matrix:
    """An item-kNN's user x item rows (float32): ``recency_rows`` with a decay, else the history
    matrix, binary or with its event weights. Training and serving both build them here."""
    if recency_decay is not None:
        return recency_rows(history, recency_decay)
    m = history.matrix.astype(np.float32)  # a copy
    if binary:
        m.data[:] = 1.0
    return m


def recency_rows(history: History, decay: float) -> sp.csr_matrix:
    """User x item, ``decay ** k`` where k counts the distinct items the user touched after this
    one (a repeated item counts at its last occurrence). Ties in time keep the stored row order."""
    df = history.interactions  # sorted by user, timestamp
    last = (
        df.select(Columns.UserIdx, Columns.ItemIdx)
        .with_row_index("order")
        .group_by(Columns.UserIdx, Columns.ItemIdx)
        .agg(pl.col("order").max())
        .sort(Columns.UserIdx, "order")
        .with_columns(pl.int_range(pl.len()).reverse().over(Columns.UserIdx).alias("after"))
    )
    weights = np.power(np.float64(decay), last["after"].to_numpy()).astype(np.float32)
    m = sp.csr_matrix(
        (weights, (last[Columns.UserIdx].to_numpy(), last[Columns.ItemIdx].to_numpy())),
        shape=(history.n_users, history.n_items),
    )
    m.sort_indices()
    return m


class Popularity(_Saved, Updatable):
    """Event-weighted item counts: all of them, or only the last ``window_days`` of the history,
    each event weighted ``0.5 ** (age_days / half_life_days)`` if a half-life is set.

    ``recent_popularity`` in the default config is this with a window; the plain ``popularity``
    counts everything. Where the stage sets per-user cuts (``History.user_now``), each user gets
    the counts as of their own cut, so under leave-last-out no user is scored with other users'
    later events. ``counts`` (what the saved pipeline serves) are as of the history's end.
    """

    name = "popularity"
    kind = "Popularity"
    PARAMS = ("window_days", "half_life_days")
    user_now = None  # a loaded model serves ``counts`` to everybody

    def arrays(self) -> dict[str, np.ndarray]:
        return {"counts": np.asarray(self.counts, dtype=np.float32)}

    def restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.counts = arrays["counts"]
        self.n_items = len(self.counts)

    def __init__(self, window_days: float | None = None, half_life_days: float | None = None) -> None:
        if window_days is not None and window_days <= 0:
            raise ValueError(f"Popularity window_days must be > 0 or null, got {window_days}")
        if half_life_days is not None and half_life_days <= 0:
            raise ValueError(f"Popularity half_life_days must be > 0 or null, got {half_life_days}")
        self.window_days, self.half_life_days = window_days, half_life_days

    def fit(self, history: History) -> Popularity:
        df = history.interactions
        ts = df[Columns.Timestamp].to_numpy().astype(np.int64)
        order = np.argsort(ts, kind="stable")
        self._ts = ts[order]
        self._items = df[Columns.ItemIdx].to_numpy().astype(np.int64)[order]
        self._w = df[Columns.Weight].to_numpy().astype(np.float64)[order]
        self.n_items = history.n_items
        self.user_now = history.user_now
        end = int(self._ts[-1]) if len(self._ts) else 0
        self.counts = self.counts_at(np.array([end], dtype=np.int64))[0]
        return self

    def counts_at(self, times: np.ndarray) -> np.ndarray:
        """``[len(times), n_items]`` float32: the (windowed, decayed) counts as of each time."""
        uniq, inverse = np.unique(np.asarray(times, dtype=np.int64), return_inverse=True)
        rows = np.empty((len(uniq), self.n_items), dtype=np.float32)
        # float64 sums for at most this many times at once: a bounded temporary however many users.
        step = 256
        for s in range(0, len(uniq), step):
            at = uniq[s : s + step]
            if self.window_days is None:
                rows[s : s + step] = self._decayed_sums(at)
                continue
            # Events in (t - window, t] = those up to t minus those up to t - window, the latter
            # decayed over the extra window (0.5 ** (window / half-life)).
            window = int(self.window_days * 86400)
            both = self._decayed_sums(np.concatenate([at, at - window - 1]))
            shift = 1.0 if self.half_life_days is None else 0.5 ** ((window + 1) / (self.half_life_days * 86400))
            part = both[: len(at)] - shift * both[len(at) :]
            part[part < 1e-6] = 0.0  # rounding left by the subtraction: no event in the window
            rows[s : s + step] = part
        return rows[inverse]

    def _decayed_sums(self, times: np.ndarray) -> np.ndarray:
        """Per time ``t``: sum over events at or before ``t`` of ``weight * 0.5 ** ((t - ts) / h)``."""
        order = np.argsort(times, kind="stable")
        out = np.zeros((len(times), self.n_items), dtype=np.float64)
        run = np.zeros(self.n_items, dtype=np.float64)
        h = None if self.half_life_days is None else self.half_life_days * 86400
        prev_t, prev_i = None, 0
        for j in order:
            t = int(times[j])
            upto = int(np.searchsorted(self._ts, t, side="right"))
            if h is not None and prev_t is not None:
                run *= 0.5 ** ((t - prev_t) / h)
            if upto > prev_i:
                w = self._w[prev_i:upto]
                if h is not None:
                    w = w * 0.5 ** ((t - self._ts[prev_i:upto]) / h)
                run += np.bincount(self._items[prev_i:upto], weights=w, minlength=self.n_items)
            out[j] = run
            prev_t, prev_i = t, max(prev_i, upto)
        return out

    def constant_scores(self) -> np.ndarray | None:
        return self.counts if self.user_now is None else None

    def refitted(self, name: str, configured: Recommender | None, update: ModelUpdate) -> Popularity:
        """Counted again on every event, by the configured Popularity's window and half-life (or
        the defaults, when the config has none): counting is cheap and the new events are what
        it counts."""
        return copy.deepcopy(configured if isinstance(configured, Popularity) else Popularity()).fit(update.history)

    def folded_in(self, name: str, configured: Recommender | None, update: ModelUpdate) -> Popularity:
        """As ``refitted``: counts kept would leave the new items and events out."""
        return self.refitted(name, configured, update)

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int | None = None) -> np.ndarray:
        if self.user_now is None:
            return self.counts[np.asarray(items, dtype=np.int64)].astype(np.float32)
        return super().score_pairs(users, items, chunk)

    def score_users(self, users: np.ndarray) -> np.ndarray:
        if self.user_now is None:
            return np.broadcast_to(self.counts, (len(users), len(self.counts)))
        return self.counts_at(self.user_now[np.asarray(users, dtype=np.int64)])


def fold_in(item_factors: np.ndarray, user_items: sp.csr_matrix, regularization: float, alpha: float) -> np.ndarray:
    """ALS user factors for histories nobody trained on: one exact least-squares solve per user,
    by implicit's public ``recalculate_user`` (the solve its ALS makes for every user in its last
    half-iteration, confidence ``alpha * weight``), so a known user's folded-in vector is close
    to its trained one.
    """
    from implicit.cpu.als import AlternatingLeastSquares

    y = np.ascontiguousarray(item_factors, dtype=np.float32)
    ui = sp.csr_matrix(user_items, dtype=np.float32)
    ui.sort_indices()
    if ui.shape[0] == 0:
        return np.zeros((0, y.shape[1]), dtype=np.float32)
    with threadpool_limits(1, "blas"):  # implicit warns when BLAS has a thread pool of its own
        als = AlternatingLeastSquares(
            factors=y.shape[1], regularization=float(regularization), alpha=float(alpha), num_threads=1
        )
        als.item_factors = y
        return np.asarray(als.recalculate_user(np.arange(ui.shape[0]), ui), dtype=np.float32)
