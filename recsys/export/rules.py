"""Business rules, applied the same way by the export and by the evaluation.

Two kinds of rule:

* **item rules** (allowlist, blocklist, availability window) and **seen filtering** decide which
  items a user may get at all. They are applied as masks *before* any top-N (``mask_scores``,
  ``allowed_items``), so they never leave a list short.
* **list rules** (minimum score, a cap of items per category) look at a ranked list, after which
  the list is cut to K. The export runs them on ranked ``[users, n]`` blocks
  (``apply_rules_dense``); ``apply_rules`` is the same rules on a long candidate frame, kept as
  the readable reference that ``tests/test_export_fast.py`` checks the block path against
  (rows, ranks and removal counts).

The evaluation hook is ``apply_rules(frame, rules, k)``: hand it a long frame of candidates
(``user_idx, item_idx, score``; seen items already excluded) and it returns each user's top-K
after every rule, with ``rank``, plus how many rows each rule removed. For dense score matrices
use ``rules.mask_scores(scores, seen_rows)`` first.
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
from recsys.errors import ConfigError
from recsys.export.kernels import list_rules


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
        """Bind the rules to a catalogue (``item_id, item_idx, ...`` sorted by item_idx)."""
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
            if self.max_per_category < 1:
                raise ConfigError(f"rules.max_per_category must be >= 1, got {self.max_per_category}")
            if self.category_column not in items.columns:
                raise ConfigError(
                    f"rules.max_per_category is set but the items have no '{self.category_column}' column "
                    f"(set rules.category_column; columns: {items.columns})"
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


def mask_items(scores: np.ndarray, allowed: np.ndarray | None, seen: sp.csr_matrix | None) -> np.ndarray:
    """``scores`` (masked in place and returned) with items outside ``allowed`` and each row's
    ``seen`` items (row r of ``seen`` is row r of ``scores``) at -inf."""
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    if seen is not None:
        scores[np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr)), seen.indices] = -np.inf
    return scores


def apply_rules(frame: pl.DataFrame, rules: CompiledRules, k: int) -> pl.DataFrame:
    """Top-``k`` per user after the rules; adds ``rank`` (from 1). Counts go to ``rules.removed``.

    ``frame``: one row per candidate with ``user_idx, item_idx, score`` (extra columns kept).
    Ties in score are broken by the lower item index, so the result does not depend on row order.
    """
    df = frame.sort([Columns.UserIdx, Columns.Score, Columns.ItemIdx], descending=[False, True, False])
    ok = rules.allowed_items
    if ok is not None:
        keep = ok[df[Columns.ItemIdx].to_numpy()]
        rules.removed["item_rules_late"] += int((~keep).sum())
        df = df.filter(pl.Series(keep))
    df = df.filter(pl.col(Columns.Score).is_finite())
    if rules.rules.min_score is not None:
        before = df.height
        df = df.filter(pl.col(Columns.Score) >= rules.rules.min_score)
        rules.removed["min_score"] += before - df.height
    if rules.category is not None:
        cat = pl.Series("_cat", rules.category[df[Columns.ItemIdx].to_numpy()])
        before = df.height
        df = (
            df.with_columns(cat)
            .filter(pl.int_range(pl.len()).over(Columns.UserIdx, "_cat") < rules.rules.max_per_category)
            .drop("_cat")
        )
        rules.removed["category_cap"] += before - df.height
    df = df.with_columns((pl.int_range(pl.len()).over(Columns.UserIdx) + 1).cast(pl.Int32).alias(Columns.Rank))
    return df.filter(pl.col(Columns.Rank) <= k)


def apply_rules_dense(items: np.ndarray, scores: np.ndarray, rules: CompiledRules, k: int) -> np.ndarray:
    """``apply_rules`` on ranked lists: ``items``/``scores`` ``[n_users, n]``, each row already
    ordered by (score desc, item asc) as ``top_k`` returns it. Returns the rank (from 1) of
    every cell, 0 where a rule or the cut at ``k`` removed it; counts go to ``rules.removed``
    exactly as ``apply_rules`` counts them on the same rows (``tests/test_export_fast.py``).

    One compiled pass over the block (``recsys.export.kernels.list_rules``): no long frame, no sort.
    """
    empty = np.zeros(0, dtype=np.int64)
    allowed = rules.allowed_items if rules.allowed_items is not None else np.zeros(0, dtype=bool)
    min_score = np.nan if rules.rules.min_score is None else float(rules.rules.min_score)
    category = np.asarray(rules.category, dtype=np.int64) if rules.category is not None else empty
    cap = int(rules.rules.max_per_category or 0)
    rank, removed = list_rules(
        np.ascontiguousarray(items, dtype=np.int64), np.ascontiguousarray(scores), allowed, min_score, category, cap, k
    )
    active = (len(allowed) > 0, rules.rules.min_score is not None, rules.category is not None)
    for name, on, n in zip(("item_rules_late", "min_score", "category_cap"), active, removed.tolist(), strict=True):
        if on:  # an active rule is counted even when it removed nothing (as apply_rules does)
            rules.removed[name] += n
    return rank


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
