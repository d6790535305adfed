"""Business rules, applied the same way by the export and by the evaluation.

Two kinds of rule:

* **item rules** (allowlist, blocklist, availability window) and **seen filtering** decide which
  items a user may get at all. They are applied as masks *before* any top-N (``mask_scores``,
  ``allowed_items``), so they never leave a list short.
* **list rules** (minimum score, a cap of items per category) look at a ranked list, after which
  the list is cut to K. ``apply_rules_dense`` runs them, in one compiled pass (``list_rules``),
  on ranked ``[users, n]`` blocks (``top_k``'s output, or ``ranked_rows`` of a candidate frame).

The evaluation hook is ``apply_rules(frame, rules, k)``: hand it a long frame of candidates
(``user_idx, item_idx, score``; seen items already excluded) and it returns each user's top-K
after every rule, with ``rank``, plus how many rows each rule removed. It runs the same
``apply_rules_dense`` as the export. For dense score matrices use
``rules.mask_scores(scores, seen_rows)`` first.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.errors import ConfigError, require_number, require_whole
from recsys.jit import njit
from recsys.recommender import mask_items
from recsys.topk import top_k


@dataclass
class BusinessRules:
    """Rules as configured (``conf/rules/default.yaml``).

    Args:
        filter_seen: never recommend an item the user already interacted with.
        allowlist: only these item ids may be recommended (a list, or a path to a file with one
            id per line / an ``item_id`` column). ``None``: every item.
        blocklist: these item ids are never recommended (list or file).
        category_column: item column the per-category cap counts.
        max_per_category: at most this many items of one category in one list (``None``: no cap).
        min_score: drop recommendations scoring below this (``None``: keep all).
        available_from_column / available_until_column: optional item columns (timestamps, null
            = unbounded) limiting when an item may be recommended.
        at: the time the availability window is checked at (``None``: the end of the history the
            model was trained on).
    """

    filter_seen: bool = True
    allowlist: Sequence[str] | str | None = None
    blocklist: Sequence[str] | str | None = None
    category_column: str = "category"
    max_per_category: int | None = None
    min_score: float | None = None
    available_from_column: str = "available_from"
    available_until_column: str = "available_until"
    at: int | None = None

    def describe(self) -> dict:
        return {
            "filter_seen": self.filter_seen,
            "allowlist": _describe_list(self.allowlist),
            "blocklist": _describe_list(self.blocklist),
            "category_column": self.category_column,
            "max_per_category": self.max_per_category,
            "min_score": self.min_score,
            "available_from_column": self.available_from_column,
            "available_until_column": self.available_until_column,
            "at": self.at,
        }

    def compile(self, items: pl.DataFrame, now: int) -> CompiledRules:
        """Bind the rules to a catalogue (``item_id, item_idx, ...`` sorted by item_idx).

        The settings are checked here, the one place every entry point (CLI, pyfunc model,
        Spark) binds them: a value of the wrong type would otherwise surface as a raw polars or
        Python error in the middle of an export (``rules.min_score`` only in the first block)."""
        require_number("rules.min_score", self.min_score, optional=True)
        if self.at is not None and (isinstance(self.at, bool) or not isinstance(self.at, int | np.integer)):
            # int("2024-05-01") was a ValueError traceback; the window compares Unix seconds.
            raise ConfigError(f"rules.at must be a time in whole Unix seconds or null, got {self.at!r}")
        n = items.height
        ids = items[Columns.Item].cast(pl.String)
        item_rules: dict[str, np.ndarray] = {}
        if self.allowlist is not None:
            allowed = set(_read_ids(self.allowlist, "rules.allowlist"))
            item_rules["allowlist"] = ids.is_in(list(allowed)).to_numpy()
        if self.blocklist is not None:
            blocked = set(_read_ids(self.blocklist, "rules.blocklist"))
            item_rules["blocklist"] = ~ids.is_in(list(blocked)).to_numpy()
        at = now if self.at is None else int(self.at)
        window = np.ones(n, dtype=bool)
        has_window = False
        for col, op in ((self.available_from_column, "from"), (self.available_until_column, "until")):
            if col and col in items.columns:
                has_window = True
                s = items[col].cast(pl.Int64)
                v, valid = s.fill_null(0).to_numpy(), s.is_not_null().to_numpy()
                ok = ~valid | ((v <= at) if op == "from" else (v >= at))
                window &= ok
        if has_window:
            item_rules["time_window"] = window
        category = None
        if self.max_per_category is not None:
            # 2.5 would be cut to 2 by the compiled cap, "3" would fail there as a TypeError.
            require_whole("rules.max_per_category", self.max_per_category)
            if self.category_column not in items.columns:
                raise ConfigError(
                    f"rules.max_per_category is set but the items have no '{self.category_column}' column "
                    f"(set rules.category_column; columns: {items.columns})"
                )
            dtype = items.schema[self.category_column]
            if dtype.is_nested():
                # One category per item is what the cap counts (MovieLens' ``genres`` is a list
                # of them): casting a list to a string is a polars error, not a category.
                scalar = [c for c, t in items.schema.items() if not t.is_nested() and c != Columns.ItemIdx]
                raise ConfigError(
                    f"rules.category_column='{self.category_column}' is a {dtype} column, but the per-category "
                    f"cap needs one category per item: name a column holding one value per item "
                    f"(scalar columns: {scalar})"
                )
            category = items[self.category_column].cast(pl.String).fill_null("").cast(pl.Categorical).to_physical()
            category = category.to_numpy().astype(np.int64)
        return CompiledRules(self, item_rules, category, at)


@dataclass
class CompiledRules:
    rules: BusinessRules
    item_rules: dict[str, np.ndarray]  # rule name -> bool [n_items], True = allowed
    category: np.ndarray | None  # category code per item
    at: int
    # What each rule removed, one Counter per thread (``removed``): threads sharing an engine
    # (the batch export's workers, a server's) each count the blocks they compute.
    _counts: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    @property
    def removed(self) -> Counter:
        """Candidates removed per rule, counted by the calling thread since it last cleared them."""
        counts = getattr(self._counts, "removed", None)
        if counts is None:
            counts = self._counts.removed = Counter()
        return counts

    @property
    def score_range(self) -> tuple[float, float] | None:
        """The lowest and highest finite score of the ranked lists the list rules ran on while
        ``min_score`` is set, seen by the calling thread since it last cleared its counts
        (``clear_counts``); ``None`` without ``min_score``. Scores are on the scorer's own scale
        (a LambdaMART raw score for the fused ranker), so a ``min_score`` outside this range
        keeps every row or none: the export's warning names the range."""
        return getattr(self._counts, "score_range", None)

    def clear_counts(self) -> None:
        """Forget what the calling thread counted: ``removed`` and ``score_range``."""
        self.removed.clear()
        self._counts.score_range = None

    def note_scores(self, scores: np.ndarray) -> None:
        """Widen the calling thread's ``score_range`` to the finite values of ``scores``."""
        finite = scores[np.isfinite(scores)]
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            if (seen := self.score_range) is not None:
                lo, hi = min(lo, seen[0]), max(hi, seen[1])
            self._counts.score_range = (lo, hi)

    @property
    def allowed_items(self) -> np.ndarray | None:
        """Bool mask of items the item rules allow (``None``: all)."""
        if not self.item_rules:
            return None
        ok = np.ones(len(next(iter(self.item_rules.values()))), dtype=bool)
        for mask in self.item_rules.values():
            ok &= mask
        return ok

    def count_masked(self, n_users: int, seen: sp.csr_matrix | None) -> None:
        """Account the (user, item) pairs the masks remove, rule by rule, in order."""
        allowed = None
        for name, mask in self.item_rules.items():
            newly = ~mask if allowed is None else (allowed & ~mask)
            if newly.any():
                self.removed[name] += int(newly.sum()) * n_users
            allowed = mask.copy() if allowed is None else (allowed & mask)
        if seen is not None and self.rules.filter_seen:
            if allowed is None:
                self.removed["seen"] += int(seen.nnz)
            else:
                self.removed["seen"] += int(allowed[seen.indices].sum())

    def mask_scores(self, scores: np.ndarray, seen: sp.csr_matrix | None, copy: bool = True) -> np.ndarray:
        """``scores`` ``[n_users, n_items]`` with forbidden items (and seen ones) set to -inf.
        ``copy=False`` masks a writeable float32 array in place (the export's fresh score blocks)."""
        if copy or scores.dtype != np.float32 or not scores.flags.writeable:
            scores = np.array(scores, dtype=np.float32, copy=True)
        return mask_items(scores, self.allowed_items, seen if self.rules.filter_seen else None)


def apply_rules(frame: pl.DataFrame, rules: CompiledRules, k: int) -> pl.DataFrame:
    """Top-``k`` per user after the rules; adds ``rank`` (from 1). Counts go to ``rules.removed``.

    ``frame``: one row per candidate with ``user_idx, item_idx, score`` (extra columns kept).
    Ties in score are broken by the lower item index, so the result does not depend on row order.
    Rows whose score is not finite (null, NaN, -inf) are no candidates: dropped, not counted.
    The rows come back ordered by user, then rank.
    """
    df = frame.sort(Columns.UserIdx, Columns.ItemIdx)
    users, code = np.unique(df[Columns.UserIdx].to_numpy(), return_inverse=True)
    rows, score = ranked_rows(code, df[Columns.Score].to_numpy(), len(users))
    rank = apply_rules_dense(df[Columns.ItemIdx].to_numpy()[rows], score, rules, k)
    r, c = np.nonzero(rank)  # row-major: by user, and within a user by rank
    return df[rows[r, c]].with_columns(pl.Series(Columns.Rank, rank[r, c], dtype=pl.Int32))


def ranked_rows(users: np.ndarray, scores: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's candidate rows as one padded row of a ``[n_users, most candidates]`` block,
    ordered by (score desc, row asc) -- (score desc, item asc) when the rows of a user are in
    item order. ``users`` (0 .. n_users - 1) must be sorted (candidate frames are).

    Returns the frame row of every cell and its score (-inf in padding cells, which every rule
    drops); ``apply_rules_dense`` then runs on ``items[rows]``.
    """
    counts = np.bincount(users, minlength=n_users)
    width = int(counts.max(initial=0))
    col = np.arange(len(users)) - np.repeat(np.cumsum(counts) - counts, counts)
    dtype = np.float32 if scores.dtype == np.float32 else np.float64
    score = np.full((n_users, width), -np.inf, dtype=dtype)
    rows = np.zeros((n_users, width), dtype=np.int64)
    score[users, col] = scores
    rows[users, col] = np.arange(len(users))
    order, score = top_k(score, width)
    return np.take_along_axis(rows, order, 1), score


# The rules that run on the ranked lists, after the top-N, and so can leave a list shorter than k
# (the item rules and seen filtering are masks before it), in the order ``list_rules`` counts
# them, with the setting behind each count of ``removed``: what the export's warning names.
LIST_RULE_SETTINGS = {
    "item_rules_late": "rules.allowlist/blocklist/availability",
    "min_score": "rules.min_score",
    "category_cap": "rules.max_per_category",
}


def apply_rules_dense(items: np.ndarray, scores: np.ndarray, rules: CompiledRules, k: int) -> np.ndarray:
    """``apply_rules`` on ranked lists: ``items``/``scores`` ``[n_users, n]``, each row already
    ordered by (score desc, item asc) as ``top_k`` returns it. Returns the rank (from 1) of
    every cell, 0 where a rule or the cut at ``k`` removed it; counts go to ``rules.removed``
    (``tests/rank/test_rules.py`` checks both against a plain Python loop).

    One compiled pass over the block (``list_rules``): no long frame, no sort.
    """
    empty = np.zeros(0, dtype=np.int64)
    allowed = rules.allowed_items if rules.allowed_items is not None else np.zeros(0, dtype=bool)
    min_score = np.nan if rules.rules.min_score is None else float(rules.rules.min_score)
    category = np.asarray(rules.category, dtype=np.int64) if rules.category is not None else empty
    cap = int(rules.rules.max_per_category or 0)
    rank, removed = list_rules(
        np.ascontiguousarray(items, dtype=np.int64), np.ascontiguousarray(scores), allowed, min_score, category, cap, k
    )
    if rules.rules.min_score is not None:  # only then: a pass over the block the default rules skip
        rules.note_scores(scores)
    active = (len(allowed) > 0, rules.rules.min_score is not None, rules.category is not None)
    for name, on, n in zip(LIST_RULE_SETTINGS, active, removed.tolist(), strict=True):
        if on:  # an active rule is counted even when it removed nothing (as apply_rules does)
            rules.removed[name] += n
    return rank


@njit(cache=True, nogil=True)
def list_rules(
    items: np.ndarray,
    scores: np.ndarray,
    allowed: np.ndarray,
    min_score: float,
    category: np.ndarray,
    cap: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``apply_rules_dense`` on ranked rows ``items``/``scores`` ``[n, m]``:
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


def _describe_list(v: Sequence[str] | str | None):
    if v is None or isinstance(v, str):
        return v
    return list(v) if len(v) <= 50 else f"{len(v)} ids"


def _read_ids(v: Sequence[str] | str, what: str) -> list[str]:
    if not isinstance(v, str):
        return [str(x) for x in v]
    path = Path(v)
    if not path.is_file():
        raise ConfigError(f"{what}: file not found: {v}")
    if path.suffix == ".parquet":
        df = pl.read_parquet(path)
    elif path.suffix in (".csv", ".tsv"):
        df = pl.read_csv(path, separator="\t" if path.suffix == ".tsv" else ",", infer_schema=False)
    else:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if Columns.Item not in df.columns:
        raise ConfigError(f"{what}: {v} has no '{Columns.Item}' column (columns: {df.columns})")
    return df[Columns.Item].cast(pl.String).to_list()
