"""Top-K for one block of users: candidates, features, ranker, rules, explanations.

Used by the batch export (``recsys.export.batch``) and by the MLflow pyfunc model, so both give
the same rows for the same users. Every step works on one block at a time; only the item-side
state (factors, embeddings, item statistics) is shared, computed once.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.errors import ConfigError
from recsys.export.kernels import (
    DENSE,
    DOT,
    SPARSE,
    kept_cells,
    nearest_history,
    pair_dots,
)
from recsys.export.pipeline_model import (
    ROW_BLOCK,
    ConstantScorer,
    EmbeddingScorer,
    FactorScorer,
    KNNScorer,
    MaskedScorer,
    PipelineHistories,
    TrainedPipeline,
)
from recsys.export.rules import BusinessRules, CompiledRules, apply_rules_dense, mask_items, ranked_rows
from recsys.rank.candidates import rank_column
from recsys.rank.features import item_statistics, user_statistics
from recsys.recommender import History, Recommender, recent_items
from recsys.topk import top_k

FUSED = "fused"
# History explanations need, per row, the cosine of the recommended item with ~20 history items
# (``kernels.nearest_history``). In wide spaces (the text tower) a cached item x item cosine
# matrix makes that one lookup per pair instead of a 384-wide dot product; in narrow ones
# (ALS/BPR factors) the dot product costs about what the lookup does (measured at width 64), so
# they skip the cache, which costs n_items^2 float32 per space (100 MB at 5,000 items), hence
# also the item limit.
CACHE_MIN_WIDTH = 128
CACHE_MAX_ITEMS = 6000
# Users scored at a time by a single-stage export (``Engine._single``): a multiple of ROW_BLOCK,
# so that the products are the same GEMM calls as over the whole chunk.
SLICE_ROWS = ROW_BLOCK
# The models whose ``score_users`` can write into a given array (``DenseScores(out=)``).
BUFFERED = (FactorScorer, EmbeddingScorer, KNNScorer)
EXPLAIN_COLUMNS = {"explain_item": pl.String, "explain_similarity": pl.Float32, "explain_features": pl.String}


@dataclass
class ExplainOptions:
    """What the explanation columns hold.

    Args:
        enabled: fill ``explain_item`` (the history item most similar to the recommended item in
            the space of the source that found it) and ``explain_similarity``.
        top_features: the ranker features that pushed this row's score most (LightGBM SHAP
            contributions), as ``name:+0.123`` joined by ``;``; 0 turns it off.
        feature_ranks: compute the feature contributions for ranks <= this only (they cost far
            more than the ranking itself); ``None``: every row.
        history_items: most recent history items considered.
    """

    enabled: bool = True
    top_features: int = 3
    feature_ranks: int | None = 3
    history_items: int = 20


# LightGBM treats |x| <= this as 0 (it passes only larger values to the trees): its kZeroThreshold,
# the float 1e-35 read as a double.
_LGB_ZERO = float(np.float32(1e-35))


class PatternTreeShap:
    """LightGBM's ``pred_contrib`` (TreeSHAP, exact), at a fraction of its cost on many rows.

    TreeSHAP of one tree reads a row only through the tree's split decisions (left or right at
    each split node), so rows with the same decisions get the same contributions from that
    tree. Per tree, the rows are grouped by their decision pattern (a few bits per split), LightGBM
    computes the contributions of one row per pattern (``start_iteration=t, num_iteration=1``),
    and every row takes its pattern's values; the trees' values are summed. Same values as one
    ``pred_contrib`` call up to float rounding of the sum over trees (``tests/test_export_fast.py``
    compares); on the export's rows there are about 4x fewer patterns than rows per tree.

    The decisions are LightGBM's ``NumericalDecision`` (NaN and zero as missing values, the
    default direction); a model with categorical splits, or several trees per iteration, falls
    back to the plain call (``self.trees is None``).

    Patterns also repeat across calls (an export's chunks): after three chunks of 4,096 users only
    25-40 % of a chunk's patterns were new. Each tree keeps the contributions of the patterns it
    has computed (only the columns of the features it splits on: the others are exactly 0), up to
    ``max_cached`` floats over all trees, so memory stays bounded however many users pass. A
    pattern's contributions do not depend on which row carried it, so the output is the same
    with or without the cache.
    """

    def __init__(self, booster, num_iteration: int | None, max_cached: int = 4_000_000) -> None:
        self.booster = booster
        self.max_cached = max_cached
        self._cached = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        n_trees = booster.num_trees()
        self.n_iter = n_trees if not num_iteration or num_iteration <= 0 else min(int(num_iteration), n_trees)
        self.trees: list[dict[str, np.ndarray]] | None = []
        if booster.num_model_per_iteration() != 1:
            self.trees = None
            return
        for info in booster.dump_model(num_iteration=self.n_iter)["tree_info"]:
            nodes: list[dict] = []
            stack = [info["tree_structure"]]
            while stack:
                node = stack.pop()
                if "split_index" in node:
                    nodes.append(node)
                    stack += [node["left_child"], node["right_child"]]
            if any(n["decision_type"] != "<=" for n in nodes):
                self.trees = None
                return
            feature = np.array([n["split_feature"] for n in nodes], dtype=np.int64)
            self.trees.append(
                {
                    "feature": feature,
                    "used": np.unique(feature),
                    "threshold": np.array([n["threshold"] for n in nodes], dtype=np.float64),
                    "missing": np.array([n["missing_type"] for n in nodes], dtype=object),
                    "default_left": np.array([bool(n["default_left"]) for n in nodes]),
                }
            )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Contributions ``[rows, features]`` (no expected-value column)."""
        if self.trees is None or len(x) == 0:
            return self.booster.predict(x, num_iteration=self.n_iter, pred_contrib=True)[:, :-1]
        x = np.array(x, dtype=np.float64)
        x[np.abs(x) <= _LGB_ZERO] = 0.0
        nan = np.isnan(x)
        x0 = np.where(nan, 0.0, x)  # NaN is 0 for splits whose missing type is not NaN
        out = np.zeros((len(x), x.shape[1]), dtype=np.float64)
        for t, tree in enumerate(self.trees):
            n_nodes = len(tree["feature"])
            sig = np.zeros((len(x), max(1, (n_nodes + 63) // 64)), dtype=np.uint64)
            for j in range(n_nodes):
                f, missing = tree["feature"][j], tree["missing"][j]
                if missing == "NaN":
                    left = np.where(nan[:, f], tree["default_left"][j], x[:, f] <= tree["threshold"][j])
                elif missing == "Zero":
                    left = np.where(x0[:, f] == 0.0, tree["default_left"][j], x0[:, f] <= tree["threshold"][j])
                else:
                    left = x0[:, f] <= tree["threshold"][j]
                sig[:, j // 64] |= left.astype(np.uint64) << np.uint64(j % 64)
            if sig.shape[1] == 1:
                keys, first, inverse = np.unique(sig[:, 0], return_index=True, return_inverse=True)
                used = tree["used"]
                out[:, used] += self._pattern_values(t, keys, x[first], used)[inverse.ravel()]
            else:  # more than 64 split nodes: no cache
                keys = np.ascontiguousarray(sig).view(np.dtype((np.void, sig.shape[1] * 8)))[:, 0]
                _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
                c = self.booster.predict(x[first], start_iteration=t, num_iteration=1, pred_contrib=True)
                out += c[inverse.ravel(), :-1]
        return out

    def _pattern_values(self, t: int, keys: np.ndarray, rows: np.ndarray, used: np.ndarray) -> np.ndarray:
        """Tree ``t``'s contributions (columns ``used``) for the sorted pattern ``keys``, each
        carried by the matching row of ``rows``: cached ones looked up, the others computed."""
        known_keys, known = self._cache.get(t, (keys[:0], np.empty((0, len(used)))))
        pos = np.minimum(np.searchsorted(known_keys, keys), max(0, len(known_keys) - 1))
        hit = known_keys[pos] == keys if len(known_keys) else np.zeros(len(keys), dtype=bool)
        values = np.empty((len(keys), len(used)))
        values[hit] = known[pos[hit]]
        miss = np.flatnonzero(~hit)
        if len(miss):
            c = self.booster.predict(rows[miss], start_iteration=t, num_iteration=1, pred_contrib=True)
            values[miss] = c[:, used]
            if self._cached + values[miss].size <= self.max_cached:
                self._cached += values[miss].size
                merged = np.concatenate([known_keys, keys[miss]])
                order = np.argsort(merged, kind="stable")
                self._cache[t] = (merged[order], np.concatenate([known, values[miss]])[order])
        return values


def pair_scores(model: Recommender, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Score of each (user, item) pair, computed per pair (no dense user x catalogue matrix)."""
    if isinstance(model, FactorScorer | EmbeddingScorer):
        u = model.user_factors if isinstance(model, FactorScorer) else model.user_embeddings
        v = model.item_factors if isinstance(model, FactorScorer) else model.item_embeddings
        u, v = np.ascontiguousarray(u, dtype=np.float32), np.ascontiguousarray(v, dtype=np.float32)
        return pair_dots(u, v, np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64))
    if isinstance(model, ConstantScorer):
        return model.counts[items].astype(np.float32)
    return model.score_pairs(users, items)


class DenseScores(Recommender):
    """One model's scores of a block of users against the whole catalogue, computed once and
    shared by candidate generation and the features (``users`` are 0..n-1 of the block)."""

    def __init__(self, model: Recommender, users: np.ndarray, out: np.ndarray | None = None) -> None:
        """``out``: where to write the block, for the models that can (``BUFFERED``)."""
        self.name = model.name
        if out is not None and isinstance(model, BUFFERED):
            self.scores = model.score_users(users, out=out)
        else:
            self.scores = np.asarray(model.score_users(users), dtype=np.float32)
        # One score row shared by every user (popularity): its top-N needs no dense block.
        self.constant = np.asarray(model.counts, dtype=np.float32) if isinstance(model, ConstantScorer) else None

    @classmethod
    def masked(cls, base: DenseScores, name: str, forbidden: np.ndarray, out: np.ndarray | None = None) -> DenseScores:
        """``MaskedScorer``'s scores from its inner model's block, without scoring again."""
        res = cls.__new__(cls)
        res.name, res.constant = name, None
        if out is None:
            res.scores = base.scores.copy()
        else:
            np.copyto(out, base.scores)
            res.scores = out
        res.scores[:, forbidden] = -np.inf
        return res

    def fit(self, history: History) -> DenseScores:  # pragma: no cover
        return self

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return self.scores[users]

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int = 2048) -> np.ndarray:
        return self.scores[users, items]


def block_candidates(
    users: np.ndarray,
    dense: Mapping[str, DenseScores],
    n_per_source: Mapping[str, int],
    seen: sp.csr_matrix | None,
    allowed: np.ndarray | None,
    in_place: bool = False,
) -> pl.DataFrame:
    """``recsys.rank.candidates.generate_candidates`` on precomputed scores, without joins:
    same columns, same rows (``tests/test_export.py`` checks), several times faster.

    ``in_place``: mask seen and forbidden items in the dense blocks themselves instead of a copy
    (``users`` must then be every row of them). The features only read candidate pairs, which
    never include those items, so they see the same values.
    """
    n_items = next(iter(dense.values())).scores.shape[1]
    seen = seen[users] if seen is not None else None
    keys, ranks, srcs = [], [], []
    names = list(n_per_source)
    for s_id, name in enumerate(names):
        items, top = masked_top_k(dense[name], users, n_per_source[name], seen, allowed, in_place)
        k = items.shape[1]
        ok = np.isfinite(top).ravel()
        keys.append((np.repeat(users, k) * n_items + items.ravel())[ok])
        ranks.append(np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))[ok])
        srcs.append(np.full(int(ok.sum()), s_id, dtype=np.int8))
    all_keys = np.concatenate(keys)
    uniq, inv = np.unique(all_keys, return_inverse=True)
    first = np.full(len(uniq), len(names), dtype=np.int8)
    cols: dict[str, pl.Series] = {
        Columns.UserIdx: pl.Series(Columns.UserIdx, (uniq // n_items).astype(np.int32)),
        Columns.ItemIdx: pl.Series(Columns.ItemIdx, (uniq % n_items).astype(np.int32)),
    }
    bounds = np.cumsum([0] + [len(x) for x in keys])
    for s_id, name in enumerate(names):
        pos = inv[bounds[s_id] : bounds[s_id + 1]]
        r = np.zeros(len(uniq), dtype=np.int32)
        r[pos] = ranks[s_id]
        present = np.zeros(len(uniq), dtype=bool)
        present[pos] = True
        cols[rank_column(name)] = pl.Series(rank_column(name), r).set(~pl.Series(present), None)
    # A source proposes an item at most once per user, so plain assignment in reverse source order
    # leaves the first source at each row (np.minimum.at did the same, many times slower).
    for s_id in reversed(range(len(names))):
        first[inv[bounds[s_id] : bounds[s_id + 1]]] = s_id
    src_names = pl.Series(Columns.Source, [*names, None], dtype=pl.String)
    cols[Columns.Source] = src_names.gather(first.astype(np.int64))  # no Python string per row
    return pl.DataFrame(list(cols.values()))


def masked_top_k(
    d: DenseScores,
    users: np.ndarray,
    k: int,
    seen: sp.csr_matrix | None,
    allowed: np.ndarray | None,
    in_place: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``top_k`` of ``d``'s rows ``users`` with seen items (row r of ``seen`` is user
    ``users[r]``) and items outside ``allowed`` at -inf: the one masking step before every top-N
    of the export (candidates and single-stage lists).

    ``in_place``: mask ``d.scores`` itself when it can be (writeable, C-ordered, ``users`` every
    row of it) instead of a copy; the caller vouches that nobody else reads those cells.
    """
    if d.constant is not None:  # one shared row: no dense block needed
        return constant_top_k(d.constant, seen, len(users), k, allowed)
    sc = d.scores
    if not (in_place and sc.flags.writeable and sc.flags.c_contiguous and len(users) == len(sc)):
        sc = np.ascontiguousarray(sc[users], dtype=np.float32)  # fancy indexing: a fresh copy
    return top_k(mask_items(sc, allowed, seen), k)


def constant_top_k(
    row: np.ndarray, seen: sp.csr_matrix | None, n_rows: int, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``top_k`` of ``row`` repeated ``n_rows`` times with seen (``seen`` rows) and forbidden
    items at -inf -- the same items and order for every finite cell -- without the dense block.

    ``top_k`` puts the items in one order once; a user's list is then the first k of that order
    it has not seen, found in a window of k + (most items any of these users has seen). Cells
    beyond a user's valid items hold item 0 and -inf (``top_k`` puts other -inf items there;
    every caller drops non-finite cells).
    """
    k = min(k, len(row))
    order = top_k(row[None, :], len(row))[0][0]
    if allowed is not None:
        order = order[allowed[order]]
    order = order[np.isfinite(row[order])]
    most_seen = int(np.diff(seen.indptr).max(initial=0)) if seen is not None else 0
    window = order[: k + most_seen]
    blocked = np.zeros((n_rows, len(window)), dtype=bool)
    if seen is not None and seen.nnz:
        where = np.full(len(row), -1, dtype=np.int64)
        where[window] = np.arange(len(window))
        r = np.repeat(np.arange(n_rows), np.diff(seen.indptr))
        p = where[seen.indices]
        blocked[r[p >= 0], p[p >= 0]] = True
    take = ~blocked & (np.cumsum(~blocked, axis=1) <= k)
    r, c = np.nonzero(take)  # row-major: each row's items in the shared order
    pos = np.arange(len(r)) - np.searchsorted(r, np.arange(n_rows))[r]
    idx = np.zeros((n_rows, k), dtype=np.int64)
    top = np.full((n_rows, k), -np.inf, dtype=np.float32)
    idx[r, pos] = window[c]
    top[r, pos] = row[window[c]]
    return idx, top


def block_features(
    candidates: pl.DataFrame,
    history: History,
    scorers: Mapping[str, Recommender],
    sources: Sequence[str],
    item_stats: pl.DataFrame,
    now: int,
) -> pl.DataFrame:
    """The ranker's features for a block of users: ``recsys.rank.features.build_features`` (the
    columns, their order and types) with the item statistics and reference time of the whole
    training history rather than the block's. ``tests/test_export.py`` checks both agree.

    Computed with numpy on the candidates sorted by (user, item) -- the per-user standardised
    scores as sums over each user's contiguous rows, the statistics as gathers -- instead of
    polars window expressions and joins, at about half their cost. A user with one candidate
    gets NaN z-scores where ``build_features`` has nulls: the ranker reads both as missing.
    """
    keys = [Columns.UserIdx, Columns.ItemIdx]
    users = candidates[Columns.UserIdx].to_numpy().astype(np.int64)
    items = candidates[Columns.ItemIdx].to_numpy().astype(np.int64)
    if np.any(np.diff(users * (int(items.max(initial=0)) + 1) + items) < 0):  # not in (user, item) order
        candidates = candidates.sort(keys)
        users = candidates[Columns.UserIdx].to_numpy().astype(np.int64)
        items = candidates[Columns.ItemIdx].to_numpy().astype(np.int64)
    cols: dict[str, pl.Series] = {c: candidates[c] for c in candidates.columns}
    # Each user's rows are contiguous: per-user sums by np.add.reduceat over the run starts.
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, len(users)])
    scores = {f"score_{name}": pair_scores(model, users, items) for name, model in scorers.items()}
    for name, v in scores.items():
        cols[name] = pl.Series(name, v, dtype=pl.Float32)
    for name, v in scores.items():
        cols[f"{name}_z"] = pl.Series(f"{name}_z", _user_z(v, starts, counts), dtype=pl.Float32)
    n_sources = np.zeros(len(users), dtype=np.int8)
    for s in sources:
        n_sources += candidates[rank_column(s)].is_not_null().to_numpy()
    cols["n_sources"] = pl.Series("n_sources", n_sources)
    for c in item_stats.columns:  # one row per item, in item order
        if c != Columns.ItemIdx:
            cols[c] = item_stats[c].gather(items)
    user_stats = user_statistics(history, now)
    at = np.full(history.n_users, -1, dtype=np.int64)
    at[user_stats[Columns.UserIdx].to_numpy()] = np.arange(user_stats.height)
    rows = pl.Series(at[users]).set(pl.Series(at[users] < 0), None)  # no history: nulls
    for c in user_stats.columns:
        if c != Columns.UserIdx:
            cols[c] = user_stats[c].gather(rows)
    return pl.DataFrame(list(cols.values()))


def _user_z(x: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``(x - mean) / (std + 1e-6)`` within each user's run of rows (sample std, as polars')."""
    if len(x) == 0:
        return x.astype(np.float32)
    xd = x.astype(np.float64)
    mean = np.add.reduceat(xd, starts) / counts
    dev = xd - np.repeat(mean, counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.add.reduceat(dev * dev, starts) / (counts - 1))
        return (dev / (np.repeat(std, counts) + 1e-6)).astype(np.float32)


@dataclass(frozen=True)
class EngineRecipe:
    """How to build an ``Engine`` again in another process (the export's workers): the saved
    pipeline's folder and the arguments, all picklable."""

    folder: str
    rules: BusinessRules
    k: int
    scorer: str = FUSED
    explain: ExplainOptions | None = None
    overfetch: int = 3
    threads: int = 1

    def build(self) -> Engine:
        # A single-stage export reads only its model: no ranker, no text tower for ALS (and so
        # neither lightgbm nor torch imported, in this process or in its workers).
        p = TrainedPipeline.load(self.folder, None if self.scorer == FUSED else [self.scorer])
        engine = Engine(
            p, self.rules.compile(p.items, p.now), self.k, self.scorer, self.explain, self.overfetch, self.threads
        )
        engine.recipe = self
        return engine


class Engine:
    """Recommends for blocks of users from a loaded ``TrainedPipeline``.

    Args:
        pipeline: the trained pipeline.
        rules: business rules bound to the pipeline's catalogue.
        k: list length.
        scorer: ``fused`` (candidates + features + ranker) or the name of one model (single stage).
        explain: explanation options.
        overfetch: single-stage lists are cut at ``overfetch * k`` before the list rules run.
        threads: torch, BLAS and OpenMP threads while recommending (``thread_limits``). The
            work is many mid-sized products and small ops, where extra threads mostly spin: on
            the shared 2-core machine, 2 threads instead of 1 made the text user tower 12x and
            the 256-row score products 3x slower in wall time (CHANGELOG.md, 2026-11-25). For more
            cores, use the batch export's ``workers`` rather than raising it.

    Threads may share an engine (the batch export's workers, a model server's threads): each has
    its own score blocks, rule counts (``rules.removed``) and copy of the ranker (LightGBM's
    predict is not safe for concurrent calls on one booster with different iteration ranges).
    """

    def __init__(
        self,
        pipeline: TrainedPipeline,
        rules: CompiledRules,
        k: int,
        scorer: str = FUSED,
        explain: ExplainOptions | None = None,
        overfetch: int = 3,
        threads: int = 1,
    ) -> None:
        self.p, self.rules, self.k, self.scorer = pipeline, rules, int(k), scorer
        self.threads = int(threads)
        self.explain = explain or ExplainOptions()
        self.overfetch = overfetch
        self.timings: Counter = Counter()  # seconds per stage, summed over blocks (bench/export.py)
        self._timings_lock = threading.Lock()
        # Set by ``Engine.load``: lets the batch export start worker processes with the same engine.
        self.recipe: EngineRecipe | None = None
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        if scorer == FUSED and pipeline.ranker is None:
            raise ConfigError("this pipeline has no ranker: choose a single model as scorer")
        if scorer != FUSED and scorer not in pipeline.model_names:
            raise ConfigError(f"unknown scorer '{scorer}'; choose {FUSED} or one of {pipeline.model_names}")
        # Item-side state, computed once for every block.
        n_users = len(pipeline.users)
        self.item_stats = item_statistics(History(pipeline.history, n_users, pipeline.n_items))
        self.allowed = rules.allowed_items
        self.item_ids = pipeline.item_ids
        self._item_series = pl.Series(self.item_ids.tolist(), dtype=pl.String)
        self._unit = {}
        self._similarity: dict[str, np.ndarray] = {}
        self._knn: dict[str, sp.csr_matrix] = {}
        self._local = threading.local()  # per calling thread: its ``_block`` arrays, ranker copy, SHAP
        self._owner = threading.get_ident()  # the thread that uses the pipeline's own ranker
        self._cache_lock = threading.Lock()  # the item x item caches are built once, by one thread
        for name, f in pipeline.factor_models.items():
            v = f["item_factors"]
            self._unit[name] = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        if pipeline.item_embeddings is not None:
            self._unit[pipeline.text_name] = pipeline.item_embeddings
        for name, tower in pipeline.history_towers.items():
            self._unit[name] = tower.item_embeddings
        self._unit = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in self._unit.items()}

    @classmethod
    def load(
        cls,
        folder: str | Path,
        rules: BusinessRules,
        k: int,
        scorer: str = FUSED,
        explain: ExplainOptions | None = None,
        overfetch: int = 3,
        threads: int = 1,
    ) -> Engine:
        """The engine of the pipeline saved in ``folder``, with ``rules`` compiled against it.
        Unlike the constructor, it can be rebuilt in a worker process (``export_recommendations
        (workers=...)``)."""
        return EngineRecipe(str(Path(folder).resolve()), rules, int(k), scorer, explain, overfetch, threads).build()

    def _item_similarity(self, name: str) -> np.ndarray:
        """Cosine of every item pair in ``name``'s space, computed once per engine: explaining a
        row is then one lookup per history item instead of a product in the embedding width."""
        with self._cache_lock:
            if name not in self._similarity:
                unit = np.ascontiguousarray(self._unit[name], dtype=np.float32)
                self._similarity[name] = unit @ unit.T
            return self._similarity[name]

    def _cached(self, name: str) -> bool:
        """Whether rows of ``name``'s embedding space are explained from the cached item x item
        cosine matrix rather than the batched product (see ``CACHE_MIN_WIDTH``)."""
        return self._unit[name].shape[1] >= CACHE_MIN_WIDTH and self.p.n_items <= CACHE_MAX_ITEMS

    def _knn_sorted(self, name: str) -> sp.csr_matrix:
        """Item-kNN model ``name``'s similarity matrix with sorted column indices (the
        explanations' binary search needs them), float32; sorted once per engine."""
        with self._cache_lock:
            if name not in self._knn:
                s = self.p.knn_models[name].tocsr().astype(np.float32)
                s.sort_indices()
                self._knn[name] = s
            return self._knn[name]

    def _booster(self):
        """The ranker's booster for the calling thread: the pipeline's own for the thread that
        built the engine, a copy for any other. LightGBM's predict sets the iteration range on
        the shared model before reading it (``GBDT::InitPredict``), so concurrent calls with
        different ranges (the ranker's, TreeSHAP's tree by tree) on one booster could mix them."""
        booster = self.p.ranker.booster
        if threading.get_ident() == self._owner:
            return booster
        if getattr(self._local, "booster", None) is None:
            import lightgbm as lgb

            self._local.booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=-1))
        return self._local.booster

    def _tree_shap(self) -> PatternTreeShap:
        """The calling thread's TreeSHAP (its own pattern cache, on its own booster)."""
        if getattr(self._local, "shap", None) is None:
            self._local.shap = PatternTreeShap(self._booster(), self.p.ranker.best_iteration)
        return self._local.shap

    def _ranker_matrix(self, feats: pl.DataFrame) -> np.ndarray:
        """The ranker's features of ``feats`` as a float64 ``[rows, features]`` matrix, nulls as
        NaN (what ``feats.select(...).to_numpy()`` gives), written column by column into memory
        kept from block to block, one per thread: a fresh matrix (~90 MB for 500k candidate rows)
        would be page-faulted in at every chunk, which costs more than the conversion. Column-major, as
        polars gives it: each column is one contiguous write, and LightGBM reads either order."""
        names = self.p.ranker.features
        n, m = feats.height, len(names)
        flat = getattr(self._local, "ranker_x", None)
        if flat is None or len(flat) < n * m:
            flat = self._local.ranker_x = np.empty(n * m, dtype=np.float64)
        x = flat[: n * m].reshape((n, m), order="F")
        for j, name in enumerate(names):
            col = feats[name]
            if col.null_count():
                col = col.cast(pl.Float64).fill_null(np.nan)
            x[:, j] = col.to_numpy()
        return x

    def add_time(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``timings[stage]`` (threads sharing the engine add theirs too)."""
        with self._timings_lock:
            self.timings[stage] += seconds

    def _block(self, model: Recommender, rows: int) -> np.ndarray | None:
        """The ``[rows, items]`` float32 array ``model``'s dense scores are written to (None for
        a model that cannot write into one), kept from block to block: a fresh 80 MB block (4k
        users x 5k items) would be page-faulted in again at every chunk, 15-30 ms per block and
        model. One set per thread: an engine shared by the threads of a
        server (the pyfunc model) must not have two blocks written into the same array."""
        if not isinstance(model, (*BUFFERED, MaskedScorer)):
            return None
        blocks = self._local.__dict__.setdefault("blocks", {})
        buf = blocks.get(model.name)
        if buf is None or len(buf) < rows:
            buf = blocks[model.name] = np.empty((rows, self.p.n_items), dtype=np.float32)
        return buf[:rows]

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.add_time(stage, time.perf_counter() - t0)

    # ---- one block -------------------------------------------------------------------------------

    def recommend(self, ph: PipelineHistories) -> pl.DataFrame:
        """Rows ``user_id, item_id, score, rank, source, explain_*`` sorted by user_id, rank."""
        with thread_limits(self.threads):
            return self._recommend(ph)

    def _recommend(self, ph: PipelineHistories) -> pl.DataFrame:
        with self._timed("user_state"):
            scorers = self.p.scorers(ph, None if self.scorer == FUSED else [self.scorer])
        seen = ph.history.matrix if self.rules.rules.filter_seen else None
        self.rules.count_masked(len(ph.user_ids), ph.history.matrix)
        users = np.arange(len(ph.user_ids), dtype=np.int64)
        if self.scorer == FUSED:
            df = self._fused(users, ph, scorers, seen)
        else:
            df = self._single(users, scorers[self.scorer], seen)
        return self._finish(df, ph, scorers)

    def _fused(self, users, ph, scorers, seen) -> pl.DataFrame:
        p = self.p
        with self._timed("score"):
            # Dense [users, items] blocks for the candidate sources only (and the model a masked
            # source reuses); a model that is only a feature is scored per candidate pair.
            blocks = set(p.n_candidates) | {m.inner.name for m in scorers.values() if isinstance(m, MaskedScorer)}
            dense: dict[str, DenseScores] = {}
            for n, m in scorers.items():
                if isinstance(m, MaskedScorer) and m.inner.name in dense:  # text_new: text's block, masked
                    dense[n] = DenseScores.masked(dense[m.inner.name], n, m.forbidden, self._block(m, len(users)))
                elif n in blocks:
                    dense[n] = DenseScores(m, users, self._block(m, len(users)))
        with self._timed("candidates"):
            cands = block_candidates(users, dense, p.n_candidates, seen, self.allowed, in_place=True)
        with self._timed("features"):
            features = {n: dense.get(n, m) for n, m in scorers.items() if getattr(m, "is_feature", True)}
            feats = block_features(cands, ph.history, features, list(p.n_candidates), self.item_stats, p.now)
        with self._timed("ranker"):
            x = self._ranker_matrix(feats)
            pred = self._booster().predict(x, num_iteration=p.ranker.best_iteration).astype(np.float32)
        with self._timed("rules"):
            rows, score = ranked_rows(feats[Columns.UserIdx].to_numpy(), pred, len(users))
            keep = apply_rules_dense(feats[Columns.ItemIdx].to_numpy()[rows], score, self.rules, self.k)
            _, rows, kept_score, kept_rank = kept_cells(keep, rows, score)
            out = feats.select(Columns.UserIdx, Columns.ItemIdx)[rows].with_columns(
                pl.Series(Columns.Score, kept_score),
                pl.Series(Columns.Rank, kept_rank),
                feats[Columns.Source].gather(rows),
            )
        if self.explain.top_features > 0:
            with self._timed("explain_features"):
                out = self._feature_explanations(out, x, rows)
        return out

    def _single(self, users, model: Recommender, seen) -> pl.DataFrame:
        list_rules = self.rules.rules.min_score is not None or self.rules.category is not None
        n = min(self.p.n_items, self.k * self.overfetch if list_rules else self.k)
        with self._timed("score_topk"):
            # Scored and selected SLICE_ROWS users at a time: the slice's scores are read back
            # by the selection while still in cache, and the chunk's [users, items] block (80 MB
            # at 4k users x 5k items, page-faulted in afresh for every chunk) never exists. Every
            # row's scores are the same as from the whole block (``ROW_BLOCK``-aligned slices).
            items = np.empty((len(users), n), dtype=np.int64)
            top = np.empty((len(users), n), dtype=np.float32)
            for s in range(0, len(users), SLICE_ROWS):
                part = users[s : s + SLICE_ROWS]
                d = DenseScores(model, part)
                # A fresh block (or DenseScores' float32 copy) is masked in place; a block that
                # shares memory with the model is copied first.
                local = np.arange(len(part))
                part_seen = None if seen is None else seen[s : s + len(part)]
                got = masked_top_k(d, local, n, part_seen, self.allowed, in_place=d.scores.flags.owndata)
                items[s : s + len(part)], top[s : s + len(part)] = got
        with self._timed("rules"):
            rank = apply_rules_dense(items, top, self.rules, self.k)
            r, item, score, kept_rank = kept_cells(rank, items, top)
            out = pl.DataFrame(
                {
                    Columns.UserIdx: users[r].astype(np.int32),
                    Columns.ItemIdx: item.astype(np.int32),
                    Columns.Score: score,
                    Columns.Rank: kept_rank,
                }
            )
        return out.with_columns(pl.lit(self.scorer).alias(Columns.Source))

    # ---- explanations ----------------------------------------------------------------------------

    def _feature_explanations(self, df: pl.DataFrame, x: np.ndarray, rows: np.ndarray) -> pl.DataFrame:
        """``x[rows]``: the ranker's feature rows of ``df`` (only the explained ones are read)."""
        p, opt = self.p, self.explain
        sel = df[Columns.Rank].to_numpy() <= (opt.feature_ranks or np.iinfo(np.int32).max)
        names = np.asarray(p.ranker.features, dtype=object)
        text = np.full(df.height, None, dtype=object)
        if sel.any():
            contrib = self._tree_shap()(x[rows[sel]])
            n_top = min(opt.top_features, contrib.shape[1])
            order = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :n_top]
            vals = np.take_along_axis(contrib, order, 1)
            tmp = pl.DataFrame(
                {
                    **{f"n{j}": names[order[:, j]].tolist() for j in range(n_top)},
                    **{f"v{j}": vals[:, j].astype(np.float64) for j in range(n_top)},
                },
                schema={**{f"n{j}": pl.String for j in range(n_top)}, **{f"v{j}": pl.Float64 for j in range(n_top)}},
            )
            parts = [
                pl.concat_str(
                    pl.col(f"n{j}"),
                    pl.lit(":"),
                    pl.when(pl.col(f"v{j}") >= 0).then(pl.lit("+")).otherwise(pl.lit("")),
                    pl.col(f"v{j}").round(3).cast(pl.String),
                )
                for j in range(n_top)
            ]
            joined = tmp.select(pl.concat_str(parts, separator=";").alias("x"))["x"].to_numpy()
            text[sel] = joined
        return df.with_columns(pl.Series("explain_features", text.tolist(), dtype=pl.String))

    def _finish(self, df: pl.DataFrame, ph: PipelineHistories, scorers) -> pl.DataFrame:
        if self.explain.enabled:
            with self._timed("explain_history"):
                item, sim = self._history_explanations(df, ph)
        else:
            item, sim = _no_explanations(df.height)
        if "explain_features" not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.String).alias("explain_features"))
        t0 = time.perf_counter()
        # Ids by gathering from string Series: no Python object per row.
        uidx = df[Columns.UserIdx].cast(pl.Int64)
        user_ids = pl.Series(ph.user_ids, dtype=pl.String)
        out = pl.DataFrame(
            {
                Columns.User: user_ids.gather(uidx),
                Columns.Item: self._item_series.gather(df[Columns.ItemIdx].cast(pl.Int64)),
                Columns.Score: df[Columns.Score].cast(pl.Float64),
                Columns.Rank: df[Columns.Rank].cast(pl.Int32),
                Columns.Source: df[Columns.Source].cast(pl.String),
                "explain_item": self._item_series.gather(pl.Series(item).set(pl.Series(item < 0), None)),
                "explain_similarity": pl.Series(sim, dtype=pl.Float32).fill_nan(None),
                "explain_features": df["explain_features"],
            },
            schema=OUTPUT_SCHEMA,
        )
        # Rows come ordered by (user_idx, rank); sorting by the users' id order on integers gives
        # the (user_id, rank) order without comparing strings.
        # The batch export's blocks hold users already in id order: nothing to sort then.
        by_id = np.argsort(np.asarray(ph.user_ids, dtype=object), kind="stable")
        if not np.array_equal(by_id, np.arange(len(by_id))):
            order = np.empty(len(ph.user_ids), dtype=np.int64)
            order[by_id] = np.arange(len(ph.user_ids))
            key = pl.Series("_key", order).gather(uidx)
            out = out.with_columns(key).sort("_key", Columns.Rank, maintain_order=True).drop("_key")
        self.add_time("output_frame", time.perf_counter() - t0)
        return out

    def _history_explanations(self, df: pl.DataFrame, ph: PipelineHistories) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the history item closest to the recommended item in its source's space
        (item index, -1 for none) and that similarity."""
        best_item, best_sim = _no_explanations(df.height)
        if df.height == 0:
            return best_item, best_sim
        hist = recent_items(ph.history.sequences, self.explain.history_items)
        mask = hist >= 0
        rows_u = df[Columns.UserIdx].to_numpy().astype(np.int64)
        rows_i = df[Columns.ItemIdx].to_numpy().astype(np.int64)
        src = df[Columns.Source]
        none = np.zeros(0, dtype=np.int32)  # the CSR arguments, for the kinds that take none
        if self.scorer != FUSED:  # a single-stage list: one source, every row (no string unique)
            names, whole = [self.scorer], True
        else:
            names = src.unique().drop_nulls().sort().to_list()
            whole = len(names) == 1 and src.null_count() == 0
        for name in names:
            if whole:
                sel, u, i = None, rows_u, rows_i
            else:
                sel = np.flatnonzero((src == name).fill_null(False).to_numpy())
                u, i = rows_u[sel], rows_i[sel]
            if name in self._unit and self._cached(name):
                item, sim = nearest_history(DENSE, self._item_similarity(name), none, none, hist, mask, u, i)
            elif name in self._unit:
                item, sim = nearest_history(DOT, self._unit[name], none, none, hist, mask, u, i)
            elif name in self.p.knn_models:
                s = self._knn_sorted(name)
                item, sim = nearest_history(SPARSE, s.data[:, None], s.indptr, s.indices, hist, mask, u, i)
            else:  # popularity: no history item is responsible
                continue
            if whole:
                return item, sim
            best_item[sel], best_sim[sel] = item, sim
        return best_item, best_sim


def _no_explanations(n: int) -> tuple[np.ndarray, np.ndarray]:
    """History explanations of ``n`` rows that have none: item -1, similarity NaN (null in the output)."""
    return np.full(n, -1, dtype=np.int64), np.full(n, np.nan, dtype=np.float32)


@contextmanager
def thread_limits(n: int) -> Iterator[None]:
    """torch, BLAS and OpenMP at ``n`` threads inside, as ``Engine.recommend`` runs.

    OpenMP's setting is per thread, so each caller sets its own. BLAS (OpenBLAS's pthreads
    pool) is process-wide: threadpoolctl lets only the first thread to limit it do so and makes
    the others' calls no-ops, so threads sharing an engine rely on the thread that started them
    holding this around them (the batch export does). torch's setting is process-wide too: the
    first caller in sets it and the last one out restores it."""
    from threadpoolctl import threadpool_limits

    with _torch_threads(n), threadpool_limits(n):
        yield


_TORCH_LOCK = threading.Lock()
_torch_state: list = [0, None]  # callers inside, the setting the first one found


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    # An export that never loaded a text part never imported torch: nothing to limit.
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    with _TORCH_LOCK:
        if _torch_state[0] == 0:
            _torch_state[1] = torch.get_num_threads()
            torch.set_num_threads(n)
        _torch_state[0] += 1
    try:
        yield
    finally:
        with _TORCH_LOCK:
            _torch_state[0] -= 1
            if _torch_state[0] == 0:
                torch.set_num_threads(_torch_state[1])


OUTPUT_SCHEMA: dict[str, pl.DataType] = {
    Columns.User: pl.String(),
    Columns.Item: pl.String(),
    Columns.Score: pl.Float64(),
    Columns.Rank: pl.Int32(),
    Columns.Source: pl.String(),
    "explain_item": pl.String(),
    "explain_similarity": pl.Float32(),
    "explain_features": pl.String(),
}


def empty_output() -> pl.DataFrame:
    return pl.DataFrame(schema=OUTPUT_SCHEMA)


__all__ = ["FUSED", "OUTPUT_SCHEMA", "Engine", "EngineRecipe", "ExplainOptions", "block_features", "empty_output"]
