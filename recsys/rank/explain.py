"""Why a row was recommended: the history item closest to it in the space of the model that
proposed it (``HistoryExplainer``), and the ranker features that pushed its score most
(``feature_explanations``, from LightGBM's TreeSHAP computed once per decision pattern of each
tree, ``PatternTreeShap``)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.kernels import DENSE, DOT, SPARSE, nearest_history
from recsys.recommender import Recommender, recent_items

# History explanations need, per row, the cosine of the recommended item with ~20 history items
# (``kernels.nearest_history``). In wide spaces (the text tower) a cached item x item cosine
# matrix makes that one lookup per pair instead of a 384-wide dot product; in narrow ones
# (ALS/BPR factors) the dot product costs about what the lookup does (measured at width 64), so
# they skip the cache, which costs n_items^2 float32 per space (100 MB at 5,000 items), hence
# also the item limit.
CACHE_MIN_WIDTH = 128
CACHE_MAX_ITEMS = 6000


def no_explanations(n: int) -> tuple[np.ndarray, np.ndarray]:
    """History explanations of ``n`` rows that have none: item -1, similarity NaN (null in the output)."""
    return np.full(n, -1, dtype=np.int64), np.full(n, np.nan, dtype=np.float32)


def nearest_space(space: np.ndarray | sp.csr_matrix | None) -> tuple[int, np.ndarray, np.ndarray, np.ndarray] | None:
    """``kernels.nearest_history``'s (kind, table, indptr, indices) for a model's ``item_space``;
    None: none (popularity: no history item is responsible). A wide dense space of a catalogue
    up to ``CACHE_MAX_ITEMS`` gets its item x item cosine matrix (``DENSE``)."""
    none = np.zeros(0, dtype=np.int32)
    if space is None:
        return None
    if sp.issparse(space):
        return SPARSE, space.data[:, None], space.indptr, space.indices
    if space.shape[1] >= CACHE_MIN_WIDTH and len(space) <= CACHE_MAX_ITEMS:
        return DENSE, space @ space.T, none, none
    return DOT, space, none, none


class HistoryExplainer:
    """Per row, the history item closest to the recommended item in the space of the row's
    source (``Recommender.item_space``), and that similarity. Each space is built once, on first
    use, and shared by the threads that call it."""

    def __init__(self, models: Mapping[str, Recommender], history_items: int = 20) -> None:
        self.models, self.history_items = models, history_items
        self._spaces: dict[str, tuple | None] = {}
        self._lock = threading.Lock()

    def _space(self, name: str) -> tuple[int, np.ndarray, np.ndarray, np.ndarray] | None:
        """``nearest_history``'s (kind, table, indptr, indices) for model ``name``; None: none
        (popularity: no history item is responsible)."""
        with self._lock:
            if name not in self._spaces:
                self._spaces[name] = nearest_space(self.models[name].item_space())
            return self._spaces[name]

    def __call__(
        self, df: pl.DataFrame, sequences: Sequence[np.ndarray], source: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``df``: rows ``user_idx, item_idx, source``; ``sequences``: each user's history.
        ``source``: every row's, when one model made the lists (a single-stage export): the
        rows' sources are then not read."""
        best_item, best_sim = no_explanations(df.height)
        if df.height == 0:
            return best_item, best_sim
        hist = recent_items(sequences, self.history_items)
        mask = hist >= 0
        rows_u = df[Columns.UserIdx].to_numpy().astype(np.int64)
        rows_i = df[Columns.ItemIdx].to_numpy().astype(np.int64)
        src = df[Columns.Source]
        if source is not None:
            names, whole = [source], True
        else:
            names = src.unique().drop_nulls().sort().to_list()
            whole = len(names) == 1 and src.null_count() == 0  # one source: every row, no selection
        for name in names:
            if (space := self._space(name)) is None:
                continue
            if whole:
                return nearest(space, hist, mask, rows_u, rows_i)
            sel = np.flatnonzero((src == name).fill_null(False).to_numpy())
            best_item[sel], best_sim[sel] = nearest(space, hist, mask, rows_u[sel], rows_i[sel])
        return best_item, best_sim


def nearest(space: tuple, hist: np.ndarray, mask: np.ndarray, users: np.ndarray, items: np.ndarray):
    """``nearest_history`` in ``space``; in an item-kNN space (``SPARSE``) an item that is no
    neighbour of any of the recent history items has no explanation. Item-kNN scores the whole
    history, while the explanation reads its last ``history_items``: for a heavy user none of
    those may be a neighbour, and the kernel's tie rule then named the first of them at
    similarity 0, an unrelated item (MovieLens: 5 of 2,052 item-kNN rows)."""
    item, sim = nearest_history(*space, hist, mask, users, items)
    if space[0] == SPARSE:
        unrelated = ~(sim > 0)
        item[unrelated], sim[unrelated] = -1, np.nan
    return item, sim


def feature_explanations(
    df: pl.DataFrame, contributions: np.ndarray, selected: np.ndarray, names: Sequence[str], top: int
) -> pl.Series:
    """``explain_features`` of ``df``'s rows: for the ``selected`` ones (whose TreeSHAP
    ``contributions`` are given, in order), the ``top`` features by absolute contribution as
    ``name:+0.123`` joined by ``;``; null for the others."""
    names = np.asarray(names, dtype=object)
    text = np.full(df.height, None, dtype=object)
    if selected.any():
        n_top = min(top, contributions.shape[1])
        order = np.argsort(-np.abs(contributions), axis=1, kind="stable")[:, :n_top]
        vals = np.take_along_axis(contributions, order, 1)
        tmp = pl.DataFrame(
            {
                **{f"n{j}": names[order[:, j]].tolist() for j in range(n_top)},
                **{f"v{j}": vals[:, j].astype(np.float64) for j in range(n_top)},
            },
            schema={**{f"n{j}": pl.String for j in range(n_top)}, **{f"v{j}": pl.Float64 for j in range(n_top)}},
        )
        # Three decimals always ("+0.320", not "+0.32"), from whole thousandths, so that a value
        # that rounds to zero reads "+0.000" (a rounded float printed "-0.0").
        milli = [(pl.col(f"v{j}") * 1000).round(0).cast(pl.Int64) for j in range(n_top)]
        parts = [
            pl.concat_str(
                pl.col(f"n{j}"),
                pl.lit(":"),
                pl.when(m >= 0).then(pl.lit("+")).otherwise(pl.lit("-")),
                (m.abs() // 1000).cast(pl.String),
                pl.lit("."),
                (m.abs() % 1000).cast(pl.String).str.zfill(3),
            )
            for j, m in enumerate(milli)
        ]
        text[selected] = tmp.select(pl.concat_str(parts, separator=";").alias("x"))["x"].to_numpy()
    return pl.Series("explain_features", text.tolist(), dtype=pl.String)


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
    ``pred_contrib`` call up to float rounding of the sum over trees (``tests/export/test_export_fast.py``
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
