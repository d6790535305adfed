"""Top-K for one block of users: candidates, features, ranker, rules, explanations.

Used by the batch export (``recsys.export.batch``) and by the MLflow pyfunc model, so both give
the same rows for the same users. Every step works on one block at a time; only the item-side
state (factors, embeddings, item statistics) is shared, computed once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.errors import ConfigError
from recsys.kernels import kept_cells
from recsys.pipeline_model import PipelineHistories, TrainedPipeline
from recsys.rank.candidates import ScoreBlock, masked_top_k
from recsys.rank.explain import HistoryExplainer, PatternTreeShap, feature_explanations, no_explanations
from recsys.rank.features import item_statistics, user_statistics
from recsys.rank.fused import FusedRecommender
from recsys.rank.rules import BusinessRules, CompiledRules, apply_rules_dense
from recsys.recommender import ROW_BLOCK, BlockBuffers, History, Recommender
from recsys.threads import thread_limits

FUSED = "fused"
# Users scored at a time by a single-stage export (``Engine._single``): a multiple of ROW_BLOCK,
# so that the products are the same GEMM calls as over the whole chunk.
SLICE_ROWS = ROW_BLOCK
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
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:  # 2.5 was taken as 2
            raise ConfigError(f"k must be a whole number >= 1, got {k!r}")
        self.p, self.rules, self.k, self.scorer = pipeline, rules, int(k), scorer
        self.threads = int(threads)
        self.explain = explain or ExplainOptions()
        self.overfetch = overfetch
        self.timings: Counter = Counter()  # seconds per stage, summed over blocks (bench/export.py)
        self._timings_lock = threading.Lock()
        # Set by ``Engine.load``: lets the batch export start worker processes with the same engine.
        self.recipe: EngineRecipe | None = None
        if scorer == FUSED and pipeline.ranker is None:
            raise ConfigError("this pipeline has no ranker: choose a single model as scorer")
        if scorer != FUSED and scorer not in pipeline.model_names:
            raise ConfigError(f"unknown scorer '{scorer}'; choose {FUSED} or one of {pipeline.model_names}")
        self.fused = FusedRecommender(pipeline.n_candidates, pipeline.ranker) if pipeline.ranker else None
        # Item-side state, computed once for every block.
        n_users = len(pipeline.users)
        self.item_stats = item_statistics(History(pipeline.history, n_users, pipeline.n_items))
        self.allowed = rules.allowed_items
        self.item_ids = pipeline.item_ids
        self._item_series = pl.Series(self.item_ids.tolist(), dtype=pl.String)
        self.explainer = HistoryExplainer(pipeline.models, self.explain.history_items)
        self._local = threading.local()  # per calling thread: its ``_block`` arrays, ranker copy, SHAP
        self._owner = threading.get_ident()  # the thread that uses the pipeline's own ranker

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
        """The engine of the pipeline saved in ``folder``, with ``rules`` compiled against it
        (``BusinessRules``, or a mapping of its settings: ``{"filter_seen": True}``).
        Unlike the constructor, it can be rebuilt in a worker process (``export_recommendations
        (workers=...)``)."""
        if isinstance(rules, Mapping):
            rules = BusinessRules(**rules)
        elif not isinstance(rules, BusinessRules):
            raise TypeError(f"rules must be a BusinessRules or a mapping of its settings, got {type(rules).__name__}")
        return EngineRecipe(str(Path(folder).resolve()), rules, k, scorer, explain, overfetch, threads).build()

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

    def _block(self, name: str, rows: int) -> np.ndarray:
        """The ``[rows, items]`` float32 array model ``name``'s dense scores are written to, kept
        from block to block (``BlockBuffers``). One set per thread: an engine shared by the
        threads of a server (the pyfunc model) must not have two blocks written into the same
        array."""
        if getattr(self._local, "blocks", None) is None:
            self._local.blocks = BlockBuffers(self.p.n_items)
        return self._local.blocks(name, rows)

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.add_time(stage, time.perf_counter() - t0)

    # ---- one block -------------------------------------------------------------------------------

    def recommend(self, ph: PipelineHistories, exclude: sp.csr_matrix | None = None) -> pl.DataFrame:
        """Rows ``user_id, item_id, score, rank, source, explain_*`` sorted by user_id, rank.

        ``exclude``: items no list may hold, row r for user r of ``ph``, in place of the seen
        items of ``rules.filter_seen`` (the offline evaluation's per-user exclusions)."""
        with thread_limits(self.threads):
            return self._recommend(ph, exclude)

    def _recommend(self, ph: PipelineHistories, exclude: sp.csr_matrix | None) -> pl.DataFrame:
        with self._timed("user_state"):
            scorers = self.p.scorers(ph, None if self.scorer == FUSED else [self.scorer])
        seen = ph.history.matrix if self.rules.rules.filter_seen else None
        seen = seen if exclude is None else exclude
        self.rules.count_masked(len(ph.user_ids), ph.history.matrix)
        users = np.arange(len(ph.user_ids), dtype=np.int64)
        if self.scorer == FUSED:
            df = self._fused(users, ph, scorers, seen)
        else:
            df = self._single(users, scorers[self.scorer], seen)
        return self._finish(df, ph, scorers)

    def _fused(self, users, ph, scorers, seen) -> pl.DataFrame:
        p = self.p
        user_stats = user_statistics(ph.history, p.now)
        # The chunk is one block: its size is the export's memory bound (``chunk_size``).
        out, x, rows = self.fused.recommend_block(
            users,
            scorers,
            ph.history,
            self.k,
            seen,
            self.allowed,
            self.rules,
            self.item_stats,
            user_stats,
            buffer=self._block,
            matrix=self._ranker_matrix,
            predict=lambda x: p.ranker.predict_matrix(x, booster=self._booster()),
            timer=self._timed,
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
                d = ScoreBlock(model, part)
                # A fresh block (or ScoreBlock's float32 copy) is masked in place; a block that
                # shares memory with the model is copied first.
                part_seen = None if seen is None else seen[s : s + len(part)]
                got = masked_top_k(d, n, part_seen, self.allowed, in_place=d.scores.flags.owndata)
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
        opt = self.explain
        sel = df[Columns.Rank].to_numpy() <= (opt.feature_ranks or np.iinfo(np.int32).max)
        contrib = self._tree_shap()(x[rows[sel]]) if sel.any() else None
        return df.with_columns(feature_explanations(df, contrib, sel, self.p.ranker.features, opt.top_features))

    def _finish(self, df: pl.DataFrame, ph: PipelineHistories, scorers) -> pl.DataFrame:
        if self.explain.enabled:
            with self._timed("explain_history"):
                item, sim = self.explainer(df, ph.history.sequences, None if self.scorer == FUSED else self.scorer)
        else:
            item, sim = no_explanations(df.height)
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


__all__ = ["FUSED", "OUTPUT_SCHEMA", "Engine", "EngineRecipe", "ExplainOptions", "empty_output"]
