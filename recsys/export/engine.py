"""Top-K for one block of users: candidates, features, ranker, rules, explanations.

Used by the batch export (``recsys.export.batch``) and by the MLflow pyfunc model, so both give
the same rows for the same users. Every step works on one block at a time; only the item-side
state (factors, embeddings, item statistics) is shared, computed once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from recsys.columns import Columns
from recsys.errors import ConfigError
from recsys.export.pipeline_model import (
    ConstantScorer,
    EmbeddingScorer,
    FactorScorer,
    PipelineHistories,
    TrainedPipeline,
)
from recsys.export.rules import CompiledRules, apply_rules
from recsys.rank.candidates import rank_column
from recsys.rank.features import build_features, item_statistics
from recsys.recommender import History, Recommender
from recsys.text.encoder import pad_histories

FUSED = "fused"
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


def pair_scores(model: Recommender, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Score of each (user, item) pair, computed per pair (no dense user x catalogue matrix)."""
    if isinstance(model, FactorScorer | EmbeddingScorer):
        u = model.user_factors if isinstance(model, FactorScorer) else model.user_embeddings
        v = model.item_factors if isinstance(model, FactorScorer) else model.item_embeddings
        out = np.empty(len(users), dtype=np.float32)
        step = 65536
        for s in range(0, len(users), step):
            out[s : s + step] = np.einsum("ij,ij->i", u[users[s : s + step]], v[items[s : s + step]])
        return out
    if isinstance(model, ConstantScorer):
        return model.counts[items].astype(np.float32)
    return model.score_pairs(users, items)


class DenseScores(Recommender):
    """One model's scores of a block of users against the whole catalogue, computed once and
    shared by candidate generation and the features (``users`` are 0..n-1 of the block)."""

    def __init__(self, model: Recommender, users: np.ndarray) -> None:
        self.name = model.name
        self.scores = np.asarray(model.score_users(users), dtype=np.float32)

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
) -> pl.DataFrame:
    """``recsys.rank.candidates.generate_candidates`` on precomputed scores, without joins:
    same columns, same rows (``tests/test_export.py`` checks), several times faster."""
    n_items = next(iter(dense.values())).scores.shape[1]
    seen_rows = seen_cols = None
    if seen is not None:
        seen_rows = np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr))
        seen_cols = seen.indices
    keys, ranks, srcs = [], [], []
    names = list(n_per_source)
    for s_id, name in enumerate(names):
        sc = np.array(dense[name].scores[users], dtype=np.float32, copy=True)
        if allowed is not None:
            sc[:, ~allowed] = -np.inf
        if seen_rows is not None:
            sc[seen_rows, seen_cols] = -np.inf
        items, top = fast_top_k(sc, n_per_source[name])
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
    start = 0
    for s_id, name in enumerate(names):
        n = len(keys[s_id])
        pos = inv[start : start + n]
        start += n
        r = np.zeros(len(uniq), dtype=np.int32)
        r[pos] = ranks[s_id]
        present = np.zeros(len(uniq), dtype=bool)
        present[pos] = True
        np.minimum.at(first, pos, s_id)
        cols[rank_column(name)] = pl.Series(rank_column(name), r).set(~pl.Series(present), None)
    src_names = np.asarray([*names, None], dtype=object)
    cols[Columns.Source] = pl.Series(Columns.Source, src_names[first].tolist(), dtype=pl.String)
    return pl.DataFrame(list(cols.values()))


def fast_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``recsys.recommender.top_k`` (same result, ties to the lower item index) about 3x faster:
    ``torch.topk`` finds each row's k-th value, then only the items at or above it are sorted."""
    n_rows, n_items = scores.shape
    k = min(k, n_items)
    if n_rows == 0 or k == 0:
        return np.zeros((n_rows, k), dtype=np.int64), np.zeros((n_rows, k), dtype=np.float32)
    kth = torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), k, dim=1, sorted=False).values.min(dim=1).values
    r, c = np.nonzero(scores >= kth.numpy()[:, None])
    v = scores[r, c]
    order = np.lexsort((c, -v, r))
    r, c = r[order], c[order]
    pos = np.arange(len(r)) - np.searchsorted(r, np.arange(n_rows))[r]
    keep = pos < k
    idx = np.zeros((n_rows, k), dtype=np.int64)
    idx[r[keep], pos[keep]] = c[keep]
    return idx, np.take_along_axis(scores, idx, 1)


def block_features(
    candidates: pl.DataFrame,
    history: History,
    scorers: Mapping[str, Recommender],
    sources: Sequence[str],
    item_stats: pl.DataFrame,
    now: int,
) -> pl.DataFrame:
    """The ranker's features for a block of users: ``build_features`` with the item statistics and
    reference time of the whole training history rather than the block's.
    ``tests/test_export.py`` checks both agree on the training users."""
    return build_features(candidates, history, scorers, sources, item_stats, now, pair_scores)


class Engine:
    """Recommends for blocks of users from a loaded ``TrainedPipeline``.

    Args:
        pipeline: the trained pipeline.
        rules: business rules bound to the pipeline's catalogue.
        k: list length.
        scorer: ``fused`` (candidates + features + ranker) or the name of one model (single stage).
        explain: explanation options.
        overfetch: single-stage lists are cut at ``overfetch * k`` before the list rules run.
    """

    def __init__(
        self,
        pipeline: TrainedPipeline,
        rules: CompiledRules,
        k: int,
        scorer: str = FUSED,
        explain: ExplainOptions | None = None,
        overfetch: int = 3,
    ) -> None:
        self.p, self.rules, self.k, self.scorer = pipeline, rules, int(k), scorer
        self.explain = explain or ExplainOptions()
        self.overfetch = overfetch
        self.timings: Counter = Counter()  # seconds per stage, summed over blocks (bench/export.py)
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
        self._unit = {}
        for name, f in pipeline.factor_models.items():
            v = f["item_factors"]
            self._unit[name] = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        if pipeline.item_embeddings is not None:
            self._unit[pipeline.text_name] = pipeline.item_embeddings

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[stage] += time.perf_counter() - t0

    # ---- one block -------------------------------------------------------------------------------

    def recommend(self, ph: PipelineHistories) -> pl.DataFrame:
        """Rows ``user_id, item_id, score, rank, source, explain_*`` sorted by user_id, rank."""
        with self._timed("user_state"):
            scorers = self.p.scorers(ph)
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
            dense = {n: DenseScores(m, users) for n, m in scorers.items()}
        with self._timed("candidates"):
            cands = block_candidates(users, dense, p.n_candidates, seen, self.allowed)
        with self._timed("features"):
            features = {n: d for n, d in dense.items() if getattr(scorers[n], "is_feature", True)}
            feats = block_features(cands, ph.history, features, list(p.n_candidates), self.item_stats, p.now)
        with self._timed("ranker"):
            x = feats.select(p.ranker.features).to_numpy()
            pred = p.ranker.booster.predict(x, num_iteration=p.ranker.best_iteration).astype(np.float32)
        with self._timed("rules"):
            out = apply_rules(feats.with_columns(pl.Series(Columns.Score, pred)), self.rules, self.k)
        if self.explain.top_features > 0:
            with self._timed("explain_features"):
                out = self._feature_explanations(out)
        return out.select(
            Columns.UserIdx,
            Columns.ItemIdx,
            Columns.Score,
            Columns.Rank,
            Columns.Source,
            *(["explain_features"] if "explain_features" in out.columns else []),
        )

    def _single(self, users, model: Recommender, seen) -> pl.DataFrame:
        list_rules = self.rules.rules.min_score is not None or self.rules.category is not None
        n = min(self.p.n_items, self.k * self.overfetch if list_rules else self.k)
        with self._timed("score_topk"):
            scores = self.rules.mask_scores(model.score_users(users), seen)
            items, top = fast_top_k(scores, n)
        ok = np.isfinite(top).ravel()
        frame = pl.DataFrame(
            {
                Columns.UserIdx: np.repeat(users, items.shape[1])[ok].astype(np.int32),
                Columns.ItemIdx: items.ravel()[ok].astype(np.int32),
                Columns.Score: top.ravel()[ok].astype(np.float32),
            }
        )
        with self._timed("rules"):
            out = apply_rules(frame, self.rules, self.k)
        return out.with_columns(pl.lit(self.scorer).alias(Columns.Source))

    # ---- explanations ----------------------------------------------------------------------------

    def _feature_explanations(self, df: pl.DataFrame) -> pl.DataFrame:
        p, opt = self.p, self.explain
        sel = df[Columns.Rank].to_numpy() <= (opt.feature_ranks or np.iinfo(np.int32).max)
        names = np.asarray(p.ranker.features, dtype=object)
        text = np.full(df.height, None, dtype=object)
        if sel.any():
            x = df.filter(pl.Series(sel)).select(p.ranker.features).to_numpy()
            contrib = p.ranker.booster.predict(x, num_iteration=p.ranker.best_iteration, pred_contrib=True)[:, :-1]
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
            item, sim = np.full(df.height, None, dtype=object), np.full(df.height, np.nan, dtype=np.float32)
        if "explain_features" not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.String).alias("explain_features"))
        t0 = time.perf_counter()
        uid = np.asarray(ph.user_ids, dtype=object)
        out = pl.DataFrame(
            {
                Columns.User: uid[df[Columns.UserIdx].to_numpy()].tolist(),
                Columns.Item: self.item_ids[df[Columns.ItemIdx].to_numpy()].tolist(),
                Columns.Score: df[Columns.Score].cast(pl.Float64),
                Columns.Rank: df[Columns.Rank].cast(pl.Int32),
                Columns.Source: df[Columns.Source].cast(pl.String),
                "explain_item": pl.Series(item.tolist(), dtype=pl.String),
                "explain_similarity": pl.Series(sim, dtype=pl.Float32).fill_nan(None),
                "explain_features": df["explain_features"],
            },
            schema=OUTPUT_SCHEMA,
        )
        out = out.sort(Columns.User, Columns.Rank)
        self.timings["output_frame"] += time.perf_counter() - t0
        return out

    def _history_explanations(self, df: pl.DataFrame, ph: PipelineHistories) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the history item closest to the recommended item in its source's space."""
        n = df.height
        best_item = np.full(n, -1, dtype=np.int64)
        best_sim = np.full(n, np.nan, dtype=np.float32)
        if n == 0:
            return np.full(0, None, dtype=object), best_sim
        hist, mask = pad_histories(ph.history.sequences, self.explain.history_items)
        hist, mask = hist.numpy(), mask.numpy()
        rows_u = df[Columns.UserIdx].to_numpy().astype(np.int64)
        rows_i = df[Columns.ItemIdx].to_numpy().astype(np.int64)
        col = df[Columns.Rank].to_numpy().astype(np.int64) - 1
        src = df[Columns.Source].to_numpy()
        grid = np.zeros((len(hist), int(col.max()) + 1), dtype=np.int64)
        grid[rows_u, col] = rows_i
        for name in np.unique(src.astype(str)):
            sel = np.flatnonzero(src == name)
            if name in self._unit:
                arg, val = _nearest_history(self._unit[name], hist, mask, grid)
                arg, val = arg[rows_u[sel], col[sel]], val[rows_u[sel], col[sel]]
            elif name in self.p.knn_models:
                h = hist[rows_u[sel]]
                s = self.p.knn_models[name]
                vals = np.asarray(s[np.maximum(h, 0).ravel(), np.repeat(rows_i[sel], h.shape[1])]).reshape(h.shape)
                sims = np.where(mask[rows_u[sel]], vals, -np.inf).astype(np.float32)
                arg = np.argmax(sims, axis=1)
                val = sims[np.arange(len(sel)), arg]
            else:  # popularity: no history item is responsible
                continue
            ok = np.isfinite(val)
            best_item[sel[ok]] = hist[rows_u[sel[ok]], arg[ok]]
            best_sim[sel[ok]] = val[ok]
        names = np.full(n, None, dtype=object)
        has = best_item >= 0
        names[has] = self.item_ids[best_item[has]]
        return names, best_sim


def _nearest_history(
    unit: np.ndarray, hist: np.ndarray, mask: np.ndarray, grid: np.ndarray, block: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """For every cell of ``grid`` ``[users, K]`` (item indices), the position in the user's
    history of the most similar item (cosine of ``unit`` rows) and that similarity."""
    emb = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))
    arg = np.zeros(grid.shape, dtype=np.int64)
    val = np.full(grid.shape, -np.inf, dtype=np.float32)
    for s in range(0, len(grid), block):
        g = torch.from_numpy(grid[s : s + block])
        h = torch.from_numpy(np.maximum(hist[s : s + block], 0))
        sims = torch.bmm(emb[g], emb[h].transpose(1, 2))  # [b, K, H]
        sims.masked_fill_(~torch.from_numpy(mask[s : s + block])[:, None, :], -torch.inf)
        v, a = sims.max(dim=2)
        arg[s : s + block], val[s : s + block] = a.numpy(), v.numpy()
    return arg, val


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


__all__ = ["FUSED", "OUTPUT_SCHEMA", "Engine", "ExplainOptions", "block_features", "empty_output"]
