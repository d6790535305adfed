"""The one interface every scorer implements (CF models, popularity, the text tower).

A recommender is fitted on a ``History`` (the events it may see) and then scores users against
the whole catalogue. ``recommend`` and ``score_pairs`` are derived from ``score_users`` so each
model writes one method; ``tests/test_recommenders.py`` runs every implementation through the
same known-answer checks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.topk import top_k


def recent_items(histories: Sequence[np.ndarray], n: int) -> np.ndarray:
    """``[len(histories), n]`` int64: the last ``n`` items of each history, most recent first,
    padded with -1."""
    out = np.full((len(histories), n), -1, dtype=np.int64)
    for row, h in enumerate(histories):
        tail = np.asarray(h[-n:])[::-1]
        out[row, : len(tail)] = tail
    return out


def pair_dots(left: np.ndarray, right: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``left[rows[j]] . right[cols[j]]`` for every j (float32): a ranker feature costs its pairs
    x the width, not a catalogue row per user. In slices of pairs, so the gathered vectors stay a
    bounded temporary however many candidate rows there are."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    out = np.empty(len(rows), dtype=np.float32)
    step = max(1, (1 << 22) // max(1, left.shape[1]))  # about 16 MB of each operand at a time
    for s in range(0, len(rows), step):
        out[s : s + step] = np.einsum("ij,ij->i", left[rows[s : s + step]], right[cols[s : s + step]])
    return out


@dataclass
class History:
    """The events a model may learn from: one stage's train part, never its targets."""

    interactions: pl.DataFrame  # sorted by user_idx, timestamp
    n_users: int
    n_items: int
    # Per user, the last moment (timestamp) whose events that user's time-dependent scores and
    # features may count; None: the end of the history, for everybody. A per-user split sets it
    # to just before each user's held-out event (``recsys.pipeline.stage_history``).
    user_now: np.ndarray | None = None

    @cached_property
    def matrix(self) -> sp.csr_matrix:
        """User x item, summed event weights (a purchase counts more than a click)."""
        df = self.interactions
        m = sp.csr_matrix(
            (
                df[Columns.Weight].to_numpy().astype(np.float32),
                (df[Columns.UserIdx].to_numpy(), df[Columns.ItemIdx].to_numpy()),
            ),
            shape=(self.n_users, self.n_items),
        )
        m.sum_duplicates()
        return m

    @cached_property
    def sequences(self) -> list[np.ndarray]:
        """Per user, item indices in time order (empty for users without history)."""
        df = self.interactions
        users = df[Columns.UserIdx].to_numpy()
        items = df[Columns.ItemIdx].to_numpy().astype(np.int64)
        bounds = np.searchsorted(users, np.arange(self.n_users + 1))
        return [items[bounds[u] : bounds[u + 1]] for u in range(self.n_users)]

    @cached_property
    def item_counts(self) -> np.ndarray:
        return np.bincount(self.interactions[Columns.ItemIdx].to_numpy(), minlength=self.n_items)

    def extend(self, more: pl.DataFrame) -> History:
        """This history plus ``more`` events (e.g. train + validation for the test stage); its
        ``user_now`` is unset (the next stage sets its own)."""
        df = pl.concat([self.interactions, more]).sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True)
        return History(df, self.n_users, self.n_items)


class Recommender(ABC):
    """Fit on a history, score users against every item."""

    name: str = "recommender"
    #: whether the fusion ranker gets this model's score as a feature (all but pure candidate sources)
    is_feature: bool = True

    @abstractmethod
    def fit(self, history: History) -> Recommender: ...

    @abstractmethod
    def score_users(self, users: np.ndarray) -> np.ndarray:
        """Scores of shape ``[len(users), n_items]`` (float32); higher is better."""

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """Score of each ``(users[j], items[j])`` pair, from ``score_users`` blocks of ``chunk`` users.

        The pairs are grouped by user once, so each block reads only its own pairs: the cost is
        the blocks' users x items plus the pairs, not pairs x blocks. Models whose score of a
        pair is cheaper than a catalogue row (factor and embedding models) override it.
        """
        out = np.empty(len(users), dtype=np.float32)
        items = np.asarray(items)
        uniq, inverse = np.unique(users, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        starts = np.arange(0, len(uniq), chunk)
        bounds = np.searchsorted(inverse[order], np.r_[starts, len(uniq)])
        for b, start in enumerate(starts):
            scores = self.score_users(uniq[start : start + chunk])
            sel = order[bounds[b] : bounds[b + 1]]
            out[sel] = scores[inverse[sel] - start, items[sel]]
        return out

    def recommend(
        self,
        users: np.ndarray,
        k: int,
        exclude: sp.csr_matrix | None = None,
        chunk: int = 2048,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per user, best first, skipping items set in ``exclude`` rows."""
        users = np.asarray(users, dtype=np.int64)
        all_items, all_scores = [], []
        for start in range(0, len(users), chunk):
            block = users[start : start + chunk]
            scores = self.score_users(block).astype(np.float32, copy=True)
            if exclude is not None:
                rows = exclude[block]
                scores[np.repeat(np.arange(len(block)), np.diff(rows.indptr)), rows.indices] = -np.inf
            items, top = top_k(scores, k)
            all_items.append(items)
            all_scores.append(top)
        if not all_items:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        return np.concatenate(all_items), np.concatenate(all_scores)
