"""The candidate set: union of each source's top-N per user, with the rank each source gave.

One implementation for training, evaluation and serving: it works on one block of users at a
time, on score blocks (``ScoreBlock``) that the features then read again instead of scoring
the candidate pairs a second time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.recommender import DerivedScores, History, Recommender, derived_bases, top_k_unseen


def rank_column(source: str) -> str:
    return f"rank_{source}"


class ScoreBlock(Recommender):
    """One model's scores of a block of users against the whole catalogue, computed once and
    shared by candidate generation and the features (``users`` are 0..n-1 of the block).

    A model whose scores are one row for everybody (``Recommender.constant_scores``) keeps that
    row only: its top-N needs no dense block (``constant_top_k``)."""

    def __init__(self, model: Recommender, users: np.ndarray, out: np.ndarray | None = None) -> None:
        """``out``: where to write the block, for the models that can (``writes_into``)."""
        self.name = model.name
        self.blank = model.users_without_history(users)
        self.constant = model.constant_scores()
        if self.constant is not None:
            self.constant = np.asarray(self.constant, dtype=np.float32)
            self.scores = np.broadcast_to(self.constant, (len(users), len(self.constant)))
        elif out is not None and model.writes_into:
            self.scores = model.score_users(users, out=out)
        else:
            self.scores = np.asarray(model.score_users(users), dtype=np.float32)

    @classmethod
    def derived(
        cls, base: ScoreBlock, model: DerivedScores, users: np.ndarray, out: np.ndarray | None = None
    ) -> ScoreBlock:
        """``model``'s block (``Recommender.derived_from``) from ``base``'s, without scoring again."""
        res = cls.__new__(cls)
        res.name, res.constant, res.blank = model.name, None, base.blank
        res.scores = model.derive_into(base.scores, users, out)
        return res

    def fit(self, history: History) -> ScoreBlock:  # pragma: no cover
        return self

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return self.scores[users]

    def users_without_history(self, users: np.ndarray) -> np.ndarray | None:
        return None if self.blank is None else self.blank[users]

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int | None = None) -> np.ndarray:
        if self.constant is not None:
            return self.constant[items]
        return self.scores[users, items]


def score_blocks(
    models: Mapping[str, Recommender],
    names: Collection[str],
    users: np.ndarray,
    buffer: Callable[[str, int], np.ndarray | None] | None = None,
) -> dict[str, ScoreBlock]:
    """``ScoreBlock`` of each model in ``names`` for ``users``; a model whose scores are another's
    rewritten (``Recommender.derived_from``) reuses that model's block. ``buffer(name, rows)``: an
    array to write the block into, or None (the export keeps them from block to block)."""
    bases = derived_bases(models)
    inner = {n: bases[n] for n in names if n in bases}
    blocks: dict[str, ScoreBlock] = {}
    for name in [*inner.values(), *names]:
        m = models[name]
        if name in blocks or m.derived_from is not None:
            continue
        out = buffer(name, len(users)) if buffer and m.writes_into and m.constant_scores() is None else None
        blocks[name] = ScoreBlock(m, users, out)
    for name, base in inner.items():
        out = buffer(name, len(users)) if buffer else None
        blocks[name] = ScoreBlock.derived(blocks[base], models[name], users, out)
    return blocks


def generate_candidates(
    users: np.ndarray,
    sources: Mapping[str, Recommender],
    n_per_source: Mapping[str, int],
    exclude: sp.csr_matrix | None,
    allowed: np.ndarray | None = None,
    in_place: bool = False,
) -> pl.DataFrame:
    """One row per distinct (user_idx, item_idx) that any source puts in its top-N.

    ``sources``: the models, or their ``ScoreBlock`` of exactly these ``users`` (row r for user
    ``users[r]``; ``score_blocks``), which the features then read again. ``exclude``: items no
    list may hold, row u for user u (seen ones, not yet listed ones); ``allowed``: items any list
    may hold (None: all). Columns: user_idx, item_idx, ``rank_<source>`` (1-based, null where that
    source did not propose the item), ``source`` (the first source, in ``n_per_source`` order,
    that proposed it). Sorted by user_idx, item_idx when ``users`` is sorted.

    ``in_place``: mask excluded and forbidden items in the blocks themselves instead of a copy.
    The features only read candidate pairs, which never include those items, so they see the
    same values.
    """
    users = np.asarray(users, dtype=np.int64)
    blocks = {n: sources[n] for n in n_per_source}
    blocks = {n: m if isinstance(m, ScoreBlock) else ScoreBlock(m, users) for n, m in blocks.items()}
    seen = exclude[users] if exclude is not None else None
    n_items = next(iter(blocks.values())).scores.shape[1]
    keys, ranks, srcs = [], [], []
    names = list(n_per_source)
    for s_id, name in enumerate(names):
        items, top = masked_top_k(blocks[name], n_per_source[name], seen, allowed, in_place)
        k = items.shape[1]
        ok = np.isfinite(top).ravel()  # fewer than n allowed items -> -inf padding
        keys.append((np.repeat(users, k) * n_items + items.ravel())[ok])
        ranks.append(np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))[ok])
        srcs.append(np.full(int(ok.sum()), s_id, dtype=np.int8))
    uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
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
    # leaves the first source at each row.
    for s_id in reversed(range(len(names))):
        first[inv[bounds[s_id] : bounds[s_id + 1]]] = s_id
    src_names = pl.Series(Columns.Source, [*names, None], dtype=pl.String)
    cols[Columns.Source] = src_names.gather(first.astype(np.int64))  # no Python string per row
    return pl.DataFrame(list(cols.values()))


def masked_top_k(
    d: ScoreBlock, k: int, seen: sp.csr_matrix | None, allowed: np.ndarray | None, in_place: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``top_k_unseen`` of a score block (its shared row when it has one): the one masking step
    before every top-N (candidates and single-model lists)."""
    return top_k_unseen(d.scores, k, seen, allowed, constant=d.constant, in_place=in_place, blank=d.blank)
