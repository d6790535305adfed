"""The one interface every scorer implements (CF models, popularity, the text tower).

A recommender is fitted on a ``History`` (the events it may see) and then scores users against
the whole catalogue. ``recommend`` and ``score_pairs`` are derived from ``score_users`` so each
model writes one method; ``tests/test_recommenders.py`` runs every implementation through the
same known-answer checks.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.topk import top_k

# BLAS and torch pick kernels by the number of rows, and different kernels round differently in
# the last bit, which can swap two near-tied items. Every user-side product is therefore computed
# in blocks of exactly this many rows (zero-padded), so a user's scores do not depend on which
# block, or how large a block, it was scored in: evaluation and every export chunk agree.
ROW_BLOCK = 256

# Cells (users x items) of one model's score block: the users of a block are as many as keep
# each model's block near 64 MB of float32 (4,096 users at 4,000 items), and at least 256, so
# that a block's memory does not grow with the catalogue (2,048 users at 150,000 items held
# 1.2 GB per copy of the block).
BLOCK_CELLS = 16_000_000


def block_rows(n_items: int, most: int = 4096) -> int:
    """Users per block for a catalogue of ``n_items``: a multiple of 256 in [256, ``most``]."""
    return int(np.clip(BLOCK_CELLS // max(n_items, 1) // 256 * 256, 256, max(256, most)))


class BlockBuffers:
    """The ``[rows, n_items]`` float32 arrays that models' score blocks are written into, one per
    model name, kept from block to block (``buffer`` of ``score_blocks``; ``Recommender``'s own
    blocks). A fresh block is page-faulted in again every time: at 150,000 items a 256-user block
    is 154 MB, and faulting it in cost several times the pass that fills it (docs/design.md,
    "Scale"). One set per thread: two blocks in flight must not share an array.
    """

    def __init__(self, n_items: int) -> None:
        self.n_items = int(n_items)
        self._arrays: dict[str, np.ndarray] = {}

    def __call__(self, name: str, rows: int) -> np.ndarray:
        """Model ``name``'s array for a block of ``rows`` users (its first ``rows`` rows)."""
        buf = self._arrays.get(name)
        if buf is None or len(buf) < rows:
            buf = self._arrays[name] = np.empty((rows, self.n_items), dtype=np.float32)
        return buf[:rows]


def fixed_block_matmul(u: np.ndarray, vt: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``u @ vt`` computed ``ROW_BLOCK`` rows at a time, the last block zero-padded (into ``out``
    if given: float32, C-ordered, of the result's shape)."""
    u = np.asarray(u, dtype=np.float32)
    vt = np.asarray(vt, dtype=np.float32)
    if out is None:
        out = np.empty((len(u), vt.shape[1]), dtype=np.float32)
    pad = np.zeros((ROW_BLOCK, u.shape[1]), dtype=np.float32)
    for s in range(0, len(u), ROW_BLOCK):
        block = u[s : s + ROW_BLOCK]
        if len(block) < ROW_BLOCK:
            pad[:] = 0.0
            pad[: len(block)] = block
            out[s : s + len(block)] = (pad @ vt)[: len(block)]
        else:
            np.matmul(block, vt, out=out[s : s + ROW_BLOCK])  # same GEMM, no temporary
    return out


def mask_items(scores: np.ndarray, allowed: np.ndarray | None, seen: sp.csr_matrix | None) -> np.ndarray:
    """``scores`` (masked in place and returned) with items outside ``allowed`` and each row's
    ``seen`` items (row r of ``seen`` is row r of ``scores``) at -inf: the one masking step before
    every top-N (evaluated lists, candidates, exported lists)."""
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    if seen is not None:
        scores[np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr)), seen.indices] = -np.inf
    return scores


def top_k_unseen(
    scores: np.ndarray,
    k: int,
    seen: sp.csr_matrix | None,
    allowed: np.ndarray | None = None,
    *,
    constant: np.ndarray | None = None,
    in_place: bool = False,
    blank: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``top_k`` of every row of ``scores`` with each row's ``seen`` items (row r of ``seen`` is
    row r of ``scores``) and items outside ``allowed`` at -inf: the one top-N after masking, for
    evaluated lists, candidates and exported lists. ``blank``: rows with no list at all (the
    users the model has no history of, ``Recommender.users_without_history``).

    ``constant``: the one row every user of the block gets (``Recommender.constant_scores``);
    its lists come from that row (``constant_top_k``) without reading the dense block, which may
    be a broadcast view. ``in_place``: mask ``scores`` itself when it can be (writeable,
    C-ordered float32) instead of a copy; the caller vouches that nobody else reads those cells.
    Any other block is copied C-ordered: ``top_k`` reads rows, and a column-ordered block (a
    broadcast row's copy keeps the broadcast's order) cost 16x more per cell at 150,000 items.
    """
    if constant is not None:
        items, top = constant_top_k(constant, seen, len(scores), k, allowed)
    else:
        if not (in_place and scores.flags.writeable and scores.flags.c_contiguous and scores.dtype == np.float32):
            scores = np.array(scores, dtype=np.float32, order="C", copy=True)
        items, top = top_k(mask_items(scores, allowed, seen), k)
    if blank is not None and blank.any():
        top[blank] = -np.inf  # every caller drops the non-finite cells
    return items, top


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


def recent_items(histories: Sequence[np.ndarray], n: int) -> np.ndarray:
    """``[len(histories), n]`` int64: the last ``n`` items of each history, most recent first,
    padded with -1."""
    out = np.full((len(histories), n), -1, dtype=np.int64)
    for row, h in enumerate(histories):
        tail = np.asarray(h[-n:])[::-1]
        out[row, : len(tail)] = tail
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

    @cached_property
    def user_counts(self) -> np.ndarray:
        """Events per user (0: a user this history holds nothing of)."""
        return np.bincount(self.interactions[Columns.UserIdx].to_numpy(), minlength=self.n_users)

    def extend(self, more: pl.DataFrame) -> History:
        """This history plus ``more`` events (e.g. train + validation for the test stage); its
        ``user_now`` is unset (the next stage sets its own)."""
        df = pl.concat([self.interactions, more]).sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True)
        return History(df, self.n_users, self.n_items)


class Recommender(ABC):
    """Fit on a history, score users against every item.

    A model that can be served also saves and loads itself (``save``, ``files``, ``load``: its
    own files in a folder, numpy or safetensors, never pickle) and scores histories it was not
    fitted on (``for_users``). The saved pipeline (``recsys.pipeline_model``) is a list of
    such models, each under its ``kind``.
    """

    name: str = "recommender"
    #: the name a saved pipeline's meta.json gives this model's kind (None: cannot be saved)
    kind: ClassVar[str | None] = None
    #: whether the fusion ranker gets this model's score as a feature (all but pure candidate sources)
    is_feature: bool = True
    #: whether ``score_users`` takes ``out=``: a float32 ``[len(users), n_items]`` array to fill
    #: (without ``out``, such a model returns a fresh array, never memory it keeps)
    writes_into: bool = False
    #: whether ``fit`` takes ``item_text=``: the text tower's ``[n_items, d]`` item vectors
    #: (SASRec's ``text_init_std``); ``HybridPipeline.fit_cf`` passes them
    reads_item_text: bool = False

    @property
    def derived_from(self) -> Recommender | None:
        """The model whose scores this one rewrites (``DerivedScores``: ``text_new``,
        ``text_popular``): its score block is derived from that model's, not computed again."""
        return None

    def constant_scores(self) -> np.ndarray | None:
        """The one score row every user gets, when there is one (popularity); else None."""
        return None

    #: per user of the history last fitted or served (``fit``, ``for_users``), whether it holds
    #: no event of that user; None: the model does not read users' histories (popularity)
    without_history: np.ndarray | None = None

    def note_history(self, history: History) -> None:
        """Remember which users ``history`` holds no event of: a model that scores a user from
        their history has nothing to score them by, and gives them no list and no feature
        (``users_without_history``), instead of a row of equal scores whose ties the top-N
        would break by item index."""
        self.without_history = history.user_counts == 0

    def users_without_history(self, users: np.ndarray) -> np.ndarray | None:
        """Which of ``users`` this model has nothing to score by (``note_history``), or None
        when it scores them all."""
        if self.without_history is None:
            return None
        blank = self.without_history[np.asarray(users, dtype=np.int64)]
        return blank if blank.any() else None

    @abstractmethod
    def fit(self, history: History) -> Recommender: ...

    def check_catalogue(self, n_items: int) -> None:
        """Raise a ``ConfigError`` when this model cannot be fitted on ``n_items`` items. ``fit``
        asks it, and so do the training job and ``recsys.update`` before any long work (the text
        tower's fine-tuning, the new items' encoding). Default: any catalogue."""
        return None

    def fit_memory_gb(self, n_items: int) -> float:
        """The memory (GB) this model's fit holds, beyond the data, while it runs on ``n_items``
        items: the job's estimate (``recsys.profiling.estimate_peak_gb``) adds the largest to what
        it holds while CF is fitted. Default: none worth counting (the per-event and per-item
        costs of the estimate cover ALS, BPR and the item-kNNs)."""
        return 0.0

    def save(self, folder: Path) -> dict[str, Any]:
        """Write this model's files into ``folder`` (which it creates) and return its entry for
        the pipeline's meta.json: ``kind`` and what ``load`` needs besides the files."""
        raise TypeError(f"a {type(self).__name__} cannot be saved in a pipeline")

    @classmethod
    def files(cls, info: Mapping[str, Any]) -> list[str]:
        """The files ``load`` reads from the folder, given what ``save`` returned."""
        return []

    @classmethod
    def saved_fields(cls) -> dict[str, Any]:
        """The entries of what ``save`` returned that ``load`` reads, with their JSON types (the
        saved pipeline checks them before anything is loaded)."""
        return {}

    @classmethod
    def load(cls, folder: Path, info: Mapping[str, Any]) -> Recommender:
        """The model ``save`` wrote into ``folder`` (``info``: what it returned)."""
        raise TypeError(f"a {cls.__name__} cannot be loaded from a pipeline")

    def for_users(self, history: History, known: np.ndarray) -> Recommender:
        """This model scoring the users of ``history`` (numbered 0..n-1, as ``history`` numbers
        them), for serving: ``known[u]`` is user u's index among the users the model was fitted
        on when ``history`` holds exactly that user's stored events, else -1. Default: the model
        reads nothing user-specific (popularity)."""
        return self

    def item_space(self) -> np.ndarray | sp.csr_matrix | None:
        """What explains a recommendation by the closest history item: unit item vectors
        (dense) or an item x item similarity (sparse); None: no history item is responsible."""
        return None

    @abstractmethod
    def score_users(self, users: np.ndarray) -> np.ndarray:
        """Scores of shape ``[len(users), n_items]`` (float32); higher is better."""

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """Score of each ``(users[j], items[j])`` pair, from ``score_users`` blocks of ``chunk``
        users (default: ``block_rows`` of the catalogue, found from the first block).

        The pairs are grouped by user once, so each block reads only its own pairs: the cost is
        the blocks' users x items plus the pairs, not pairs x blocks. Models whose score of a
        pair is cheaper than a catalogue row (factor and embedding models) override it.
        """
        out = np.empty(len(users), dtype=np.float32)
        items = np.asarray(items)
        uniq, inverse = np.unique(users, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        # Each block's pairs: the positions in ``order`` whose user falls in [start, stop).
        sorted_users = inverse[order]
        for start, stop, scores in self._score_blocks(uniq, chunk):
            sel = order[np.searchsorted(sorted_users, start) : np.searchsorted(sorted_users, stop)]
            out[sel] = scores[inverse[sel] - start, items[sel]]
        return out

    def _score_blocks(
        self, users: np.ndarray, chunk: int | None, constant: np.ndarray | None = None
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, score_users(users[start:stop]))`` over ``users``, ``chunk`` users at a
        time, or (``None``) ``ROW_BLOCK`` first and then ``block_rows`` of the catalogue those
        scores show: the block's memory stays near ``BLOCK_CELLS`` cells whatever the catalogue.
        ``constant``: the model's one shared row, broadcast instead of scored. A model that
        ``writes_into`` given memory writes every block after the first into the same array:
        each block is read before the next is scored, and the caller may mask it in place."""
        start, step = 0, chunk or ROW_BLOCK
        buffers = None  # a model that writes into given memory reuses one block's (BlockBuffers)
        while start < len(users):
            stop = min(start + step, len(users))
            if constant is not None:
                scores = np.broadcast_to(constant, (stop - start, len(constant)))
            elif buffers is not None:
                scores = self.score_users(users[start:stop], out=buffers(self.name, stop - start))
            else:
                scores = self.score_users(users[start:stop])
            yield start, stop, scores
            start = stop
            if chunk is None:
                step = block_rows(scores.shape[1])
            if buffers is None and constant is None and self.writes_into and start < len(users):
                buffers = BlockBuffers(scores.shape[1])

    def recommend(
        self,
        users: np.ndarray,
        k: int,
        exclude: sp.csr_matrix | None = None,
        chunk: int | None = None,
        progress: Callable[[int], Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per user, best first, skipping items set in ``exclude`` rows; scored
        ``chunk`` users at a time (default: ``block_rows`` of the catalogue). ``progress`` is
        called with each block's number of users once it is done (a progress bar's ``update``)."""
        users = np.asarray(users, dtype=np.int64)
        constant = self.constant_scores()
        if constant is not None:
            constant = np.asarray(constant, dtype=np.float32)
        all_items, all_scores = [], []
        for start, stop, scores in self._score_blocks(users, chunk, constant):
            block = users[start:stop]
            seen = None if exclude is None else exclude[block]
            # A block the model wrote into memory of its own (a fresh array or the kept one)
            # is masked in place; one that shares memory with the model is copied first.
            mine = self.writes_into or scores.flags.owndata
            blank = self.users_without_history(block)
            items, top = top_k_unseen(scores, k, seen, constant=constant, in_place=mine, blank=blank)
            all_items.append(items)
            all_scores.append(top)
            if progress is not None:
                progress(stop - start)
        if not all_items:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        return np.concatenate(all_items), np.concatenate(all_scores)


@dataclass(frozen=True)
class ModelUpdate:
    """What ``recsys.update`` brings each ``Updatable`` model of a saved pipeline: the same for
    every model, so that each takes from it what its own update needs."""

    #: every event, the pipeline's then the new ones, over the grown users and items (those the
    #: pipeline knew keep their indices, the new ones follow)
    history: History
    #: the users (indices of ``history``) with new events: those a fold-in solves again
    touched: np.ndarray
    #: a refit continues from the pipeline's model for this many iterations (epochs) instead of a
    #: cold fit with the configured ones; None: a cold fit
    warm_iterations: int | None = None
    #: the refreshed text tower's ``[n_items, d]`` item vectors (None: the pipeline has none):
    #: where SASRec places the items its network never saw, and where a cold refit that starts
    #: from text starts
    item_text: np.ndarray | None = None


class Updatable(Recommender):
    """A model that ``recsys.update`` brings up to date with new events and items: the CF models
    and popularity (the text towers take the refreshed texts instead, and the derived models are
    rebuilt over their bases). What a model keeps and what it learns again is its own business,
    so each answers the update's two modes (``cf_mode``) itself and the update asks every one
    alike, whatever its class; ``tests/test_recommenders.py`` checks every implementation by the
    same test."""

    @abstractmethod
    def refitted(self, name: str, configured: Recommender | None, update: ModelUpdate) -> Recommender:
        """``cf_mode=refit``: a copy of ``configured`` (the unfitted model the pipeline's config
        names ``name``, as training made it; left as it is) fitted on every event of ``update``,
        continued from this model for ``update.warm_iterations`` where it can be: a refit fits
        what the config says, so a ``ConfigError`` when ``configured`` cannot stand in for this
        model."""

    @abstractmethod
    def folded_in(self, name: str, configured: Recommender | None, update: ModelUpdate) -> Recommender:
        """``cf_mode=fold_in``: this model grown to ``update``'s users and items, what it learned
        kept (no new fit of it: cheaper than ``refitted``), scoring the new items as best it can
        without learning them. ``name`` and ``configured`` as for ``refitted``, for the models
        that read them."""


class DerivedScores(Recommender):
    """A model whose scores are another model's (``base``, the text tower) rewritten: ``derive``
    turns ``base``'s score block into this model's in place, so a block of users is scored once
    for both (``recsys.rank.candidates.score_blocks``).

    A candidate source, not a ranker feature (its scores are the base's and statistics the
    ranker has already), hence ``is_feature = False``. Saved without files: the saved pipeline
    records the base's name (``restricts``) and the model is refitted on the stored history
    when loaded (``from_saved``)."""

    is_feature = False
    #: the constructor's arguments besides ``base``, with their JSON types: what ``save`` records
    PARAMS: ClassVar[dict[str, type]] = {}

    def __init__(self, base: Recommender) -> None:
        self.base = base

    def save(self, folder: Path) -> dict[str, Any]:
        return {"kind": self.kind, **{p: t(getattr(self, p)) for p, t in self.PARAMS.items()}}

    @classmethod
    def saved_fields(cls) -> dict[str, Any]:
        # ``restricts``: the base model's name, which the saved pipeline adds.
        return {**cls.PARAMS, "restricts": str}

    @classmethod
    def from_saved(cls, base: Recommender, info: Mapping[str, Any]) -> DerivedScores:
        """The unfitted model over ``base`` that ``save`` described (``info``)."""
        return cls(base, **{p: info[p] for p in cls.PARAMS})

    @property
    def derived_from(self) -> Recommender:
        return self.base

    @abstractmethod
    def derive(self, scores: np.ndarray, users: np.ndarray) -> np.ndarray:
        """This model's scores of ``users`` from ``scores`` (``base``'s float32 block of the same
        users, which it may overwrite): returns ``scores``."""

    def derive_into(self, base: np.ndarray, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """This model's scores of ``users`` from ``base`` (the base model's block of the same
        users, left as it is), written into ``out`` (float32, ``base``'s shape) if given."""
        if out is None:
            return self.derive(np.array(base, dtype=np.float32, copy=True), users)
        np.copyto(out, base)
        return self.derive(out, users)

    def over(self, base: Recommender) -> DerivedScores:
        """The same model, fitted state kept, over ``base`` (the base served for a block of users)."""
        out = copy.copy(self)
        out.base = base
        return out

    def item_space(self) -> np.ndarray | sp.csr_matrix | None:
        # A derived source's items are explained in its base's space (text-embedding cosine).
        return self.base.item_space()

    def users_without_history(self, users: np.ndarray) -> np.ndarray | None:
        return self.base.users_without_history(users)

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return self.derive_into(self.base.score_users(users), users)


class NewItemText(DerivedScores):
    """A model (the text tower) restricted to items with at most ``max_events`` events in the
    history (as of each user's cut where the history has per-user cuts, ``fit``).

    A candidate source for cold start: new items compete with hundreds of warm items of the same
    topic in the plain text ranking and rarely reach its top-N; here they compete only with each
    other, and the ranker decides how many of them deserve a slot.
    """

    name = "text_new"
    kind = "NewItemText"
    PARAMS = {"max_events": int}
    user_now: np.ndarray | None = None  # the fitted history's per-user cuts (None: its end for all)
    warm_from: np.ndarray | None = None  # per item, when it stops being new (with ``user_now``)

    def __init__(self, base: Recommender, max_events: int = 0) -> None:
        super().__init__(base)
        self.max_events = max_events

    def fit(self, history: History) -> NewItemText:
        """``base`` must already be fitted on the same history. Where the history has per-user
        cuts (``History.user_now``), an item is new for a user while it has at most
        ``max_events`` events as of that user's cut, as every other statistic is counted: other
        users' later events must not take it out of an earlier user's pool."""
        self.warm = history.item_counts > self.max_events  # as of the history's end
        self.user_now = history.user_now
        self.warm_from = None
        if self.user_now is not None:
            # Each item's time of its (max_events + 1)-th event: warm for a user cut at or after it.
            # The events sorted by item, then time: item i's run starts at the sum of the counts
            # before it, and an item warm at the end (``warm``) has that event.
            by_item = history.interactions.select(Columns.ItemIdx, Columns.Timestamp).sort(
                Columns.ItemIdx, Columns.Timestamp
            )
            times = by_item[Columns.Timestamp].to_numpy()
            start = np.concatenate([[0], np.cumsum(history.item_counts)[:-1]])
            self.warm_from = np.full(history.n_items, np.iinfo(np.int64).max, dtype=np.int64)
            self.warm_from[self.warm] = times[start[self.warm] + self.max_events]
        return self

    def _warm_for(self, users: np.ndarray, items: np.ndarray | slice = slice(None)) -> np.ndarray:
        """``[len(users), items]``: whether each item is warm as of each user's cut."""
        cut = self.user_now[np.asarray(users, dtype=np.int64)]
        return self.warm_from[items][None, :] <= cut[:, None]

    def derive(self, scores: np.ndarray, users: np.ndarray) -> np.ndarray:
        if self.warm_from is None:
            scores[:, self.warm] = -np.inf
        else:
            scores[self._warm_for(users)] = -np.inf
        return scores

    def derive_into(self, base: np.ndarray, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if self.warm_from is None:
            cold = np.flatnonzero(~self.warm)
        elif len(users):  # new for some user of the block: new as of the earliest cut
            cold = np.flatnonzero(self.warm_from > self.user_now[np.asarray(users, dtype=np.int64)].min())
        else:
            cold = np.zeros(0, dtype=np.int64)
        if len(cold) > len(self.warm) // 8:  # many new items: a copy and a mask cost less
            return super().derive_into(base, users, out)
        # Few new items (1 % at 100x): the block is -inf but for their columns, never copied
        # whole and then masked (3x the time there).
        out = np.empty(base.shape, dtype=np.float32) if out is None else out
        out.fill(-np.inf)
        part = base[:, cold]  # a copy
        if self.warm_from is not None:
            part[self._warm_for(users, cold)] = -np.inf
        out[:, cold] = part
        return out


class PopularText(DerivedScores):
    """The text tower's estimate of how likely a user is to pick each item: its score over its
    temperature plus the item's log event count (as of the user's cut where the history has
    per-user cuts).

    The tower learns preference over popularity (``text.module.popularity_debias``: its training
    logits carry each candidate's log share of the targets), so its own ranking leaves popularity
    out; adding the log count back gives the full softmax's logit, ``log P(item | user)`` up to a
    per-user constant. A candidate source for large catalogues: where each text class holds
    thousands of items, the ones a user will pick are mostly its popular ones.
    """

    name = "text_popular"
    kind = "PopularText"
    PARAMS = {"temperature": float}

    def __init__(self, base: Recommender, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"PopularText needs the text tower's temperature > 0, got {temperature}")
        super().__init__(base)
        self.temperature = float(temperature)

    def fit(self, history: History) -> PopularText:
        """``base`` must already be fitted on the same history."""
        from recsys.cf.models import Popularity

        popularity = Popularity().fit(history)
        counts = popularity.constant_scores()  # one row for everybody unless per-user cuts
        self.log_counts = None if counts is None else np.log1p(counts).astype(np.float32)
        # The events themselves only where each user's counts are as of their own cut.
        self.popularity = popularity if counts is None else None
        return self

    def derive(self, scores: np.ndarray, users: np.ndarray) -> np.ndarray:
        scores *= np.float32(1.0 / self.temperature)
        if self.log_counts is not None:
            scores += self.log_counts
        else:
            scores += np.log1p(self.popularity.score_users(users)).astype(np.float32)
        return scores


class NearestText(DerivedScores):
    """The cosine of an item with the closest of the user's last ``history_items`` history items
    in a text tower's item space: how much the item looks like one thing the user took, where the
    tower's own score says how much it looks like the user's recency-weighted mix. A product
    often follows one of several interests (a second roll of the grit just bought, beside the
    lab glass bought before); the mean of both says neither. It is the similarity the history
    explanations report (``recsys.rank.explain``, ``kernels.nearest_history``), so a row's
    ``explain_history`` names the item this feature measured.

    A ranker feature over a tower (``rank.text_nearest_feature``), not a candidate source by
    default; saved without files, like the other models over the text tower, and refitted on the
    stored history when loaded. Users without history get NaN (missing, to the ranker).
    """

    name = "text_nearest"
    kind = "NearestText"
    is_feature = True
    PARAMS = {"history_items": int}

    def __init__(self, base: Recommender, history_items: int = 20) -> None:
        if history_items < 1:
            raise ValueError(f"NearestText history_items must be >= 1, got {history_items}")
        super().__init__(base)
        self.history_items = history_items
        # (the vectors, their ``nearest_space``): one dict shared by the copies ``over`` and
        # ``for_users`` make, so serving builds a catalogue's cosine matrix once, not per block.
        self._spaces: dict[str, tuple[np.ndarray, tuple]] = {}

    def fit(self, history: History) -> NearestText:
        """The last ``history_items`` items of every user of ``history`` (``base`` scores the
        same users)."""
        self.recent = recent_items(history.sequences, self.history_items)
        return self

    def for_users(self, history: History, known: np.ndarray) -> NearestText:
        return copy.copy(self).fit(history)

    def space(self) -> tuple:
        """``nearest_history``'s view of the base's item vectors, built once per base."""
        from recsys.rank.explain import nearest_space

        vectors = self.base.item_space()
        built = self._spaces.get("space")
        if built is None or built[0] is not vectors:
            built = (vectors, nearest_space(np.ascontiguousarray(vectors, dtype=np.float32)))
            self._spaces["space"] = built
        return built[1]

    def score_users(self, users: np.ndarray) -> np.ndarray:
        n_items = len(self.space()[1])
        return self.derive(np.empty((len(users), n_items), dtype=np.float32), users)

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int | None = None) -> np.ndarray:
        from recsys.kernels import nearest_history

        hist = self.recent
        users = np.asarray(users, dtype=np.int64)
        return nearest_history(*self.space(), hist, hist >= 0, users, np.asarray(items, dtype=np.int64))[1]

    def derive_into(self, base: np.ndarray, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        # The base's block is never read (these scores are no rewrite of it): not copied either.
        return self.derive(np.empty(base.shape, dtype=np.float32) if out is None else out, users)

    def derive(self, scores: np.ndarray, users: np.ndarray) -> np.ndarray:
        """Every item's score for ``users``, written over ``scores`` (whatever it holds): the
        maximum over the history positions of the cosine rows of those history items."""
        from recsys.kernels import DENSE

        kind, table = self.space()[:2]
        hist = self.recent[np.asarray(users, dtype=np.int64)]
        scores.fill(-np.inf)
        for h in range(hist.shape[1]):
            rows = np.flatnonzero(hist[:, h] >= 0)
            if len(rows) == 0:
                break  # histories are filled from position 0
            items = hist[rows, h]
            sims = table[items] if kind == DENSE else table[items] @ table.T
            scores[rows] = np.maximum(scores[rows], sims)
        return scores


def derived_bases(models: Mapping[str, Recommender]) -> dict[str, str]:
    """Each model of ``models`` whose scores another one's rewrite (``Recommender.derived_from``)
    -> that one's name, in ``models``' order."""
    name = {id(m): n for n, m in models.items()}
    return {n: name[id(m.derived_from)] for n, m in models.items() if m.derived_from is not None}


def derived_models(text: Recommender, temperature: float, history: History) -> dict[str, DerivedScores]:
    """The candidate sources derived from the (fitted) text tower, fitted on ``history``
    (``DERIVED_SOURCES``, in that order)."""
    return {m.name: m.fit(history) for m in (NewItemText(text), PopularText(text, temperature))}


def nearest_name(tower: str) -> str:
    """The name of the ``NearestText`` over the text tower named ``tower``."""
    return f"{tower}_nearest"


def nearest_models(towers: Mapping[str, Recommender], history: History, history_items: int) -> dict[str, NearestText]:
    """``NearestText`` over each fitted text tower of ``towers`` (``nearest_name``), fitted on
    ``history`` (``rank.text_nearest_feature``)."""
    return {nearest_name(name): NearestText(m, history_items).fit(history) for name, m in towers.items()}


#: the names ``derived_models`` gives, known before any model is fitted (the job's config check)
DERIVED_SOURCES = (NewItemText.name, PopularText.name)
