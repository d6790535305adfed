"""The fused recommender: candidates -> features -> LambdaMART ranker -> rules.

One code path for training (the ranker's rows), evaluation (the test-stage lists) and serving
(``recsys.export.engine.Engine``, behind the batch export, the pyfunc model and Spark): every
step works on one block of users at a time, with each candidate source's scores of the block
computed once and read by both the candidates and the features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.errors import ConfigError
from recsys.kernels import kept_cells
from recsys.progress import user_bar
from recsys.rank.candidates import ScoreBlock, generate_candidates, score_blocks
from recsys.rank.features import GAP, build_features, item_statistics, user_statistics
from recsys.rank.ranker import LambdaMARTRanker
from recsys.rank.rules import CompiledRules, apply_rules_dense, ranked_rows
from recsys.recommender import BlockBuffers, History, Recommender, block_rows

Timer = Callable[[str], contextlib.AbstractContextManager]
# Shown each block's users and its sources' score blocks, after the candidates (which may have
# masked a block's excluded items in place).
BlockReader = Callable[[np.ndarray, Mapping[str, ScoreBlock]], None]


def _no_timer(stage: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class FusedRecommender:
    """Candidates from several recommenders, their features, and the ranker that orders them.

    Args:
        n_candidates: per source, how many of its top items enter the candidate set.
        ranker: the LambdaMART ranker (trained by ``recsys.pipeline.FusionStage``).
        score_gaps: build each score's gap to the user's best candidate as a feature
            (``rank.score_gap_feature``); None: whatever the fitted ranker reads, so that a saved
            pipeline serves with the features it learned from.
    """

    def __init__(
        self, n_candidates: Mapping[str, int], ranker: LambdaMARTRanker, score_gaps: bool | None = None
    ) -> None:
        self.n_candidates = dict(n_candidates)
        self.ranker = ranker
        self._score_gaps = score_gaps

    @property
    def score_gaps(self) -> bool:
        if self._score_gaps is not None:
            return self._score_gaps
        features = getattr(self.ranker, "features", None) or []
        return any(f.endswith(GAP) for f in features)

    def check_sources(self, models: Mapping[str, Recommender]) -> None:
        if unknown := set(self.n_candidates) - set(models):
            raise ConfigError(f"rank.n_candidates names unknown sources {sorted(unknown)}; known: {sorted(models)}")

    def blocks(
        self, users: np.ndarray, n_items: int, block_users: int | None = None, desc: str = "users"
    ) -> Iterator[np.ndarray]:
        """``users`` in blocks of ``block_users`` (default: ``block_rows(n_items)``), counted on a
        progress bar named ``desc`` (``recsys.progress.user_bar``: large loops only) as each
        block is done."""
        step = block_users or block_rows(n_items)
        with user_bar(desc, len(users), n_items) as bar:
            for s in range(0, len(users), step):
                yield users[s : s + step]
                bar.update(min(step, len(users) - s))

    def features(
        self,
        users: np.ndarray,
        models: Mapping[str, Recommender],
        history: History,
        exclude: sp.csr_matrix | None,
        allowed: np.ndarray | None = None,
        include: pl.DataFrame | None = None,
        item_stats: pl.DataFrame | None = None,
        user_stats: pl.DataFrame | None = None,
        buffer: Callable[[str, int], np.ndarray | None] | None = None,
        timer: Timer = _no_timer,
        keep: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
        on_blocks: BlockReader | None = None,
    ) -> pl.DataFrame:
        """Candidates and features of one block of ``users`` (sorted rows of ``history`` and
        ``exclude``).

        ``exclude``: items no list may hold per user (seen ones, not yet listed ones); ``allowed``:
        items any list may hold (None: all). ``include``: extra ``(user_idx, item_idx)`` pairs
        added to the candidate set, with null ``rank_<source>`` where no source proposed them.
        ``item_stats``/``user_stats``: as ``build_features`` takes them (pass them when calling
        block by block, computed once). ``keep``: applied to the candidates before their
        features are built (the ranker's training adds labels and drops users it cannot learn from).
        ``on_blocks(users, blocks)``: shown the sources' score blocks once the features are built
        (the evaluation takes those models' own lists from them instead of scoring them again).
        """
        self.check_sources(models)
        users = np.asarray(users, dtype=np.int64)
        with timer("score"):
            blocks = score_blocks(models, list(self.n_candidates), users, buffer)
        with timer("candidates"):
            # Masking in place is safe only when every pair the features read is a candidate.
            cands = generate_candidates(users, blocks, self.n_candidates, exclude, allowed, in_place=include is None)
            if include is not None:
                keys = [Columns.UserIdx, Columns.ItemIdx]
                extra = include.filter(pl.col(Columns.UserIdx).is_in(users.tolist())).unique()
                cands = cands.join(extra, on=keys, how="full", coalesce=True).sort(keys)
            if keep is not None:
                cands = keep(cands)
        with timer("features"):
            # A source's block answers for its candidates; every other model scores the pairs.
            by_row = {n: _GlobalRows(b, users) for n, b in blocks.items()}
            scorers = {n: by_row.get(n, m) for n, m in models.items() if m.is_feature}
            feats = build_features(
                cands, history, scorers, list(self.n_candidates), item_stats, user_stats, self.score_gaps
            )
        if on_blocks is not None:
            on_blocks(users, blocks)
        return feats

    def recommend(
        self,
        users: np.ndarray,
        models: Mapping[str, Recommender],
        history: History,
        k: int,
        exclude: sp.csr_matrix | None,
        allowed: np.ndarray | None = None,
        rules: CompiledRules | None = None,
        now: int | None = None,
        block_users: int | None = None,
        timer: Timer = _no_timer,
        on_blocks: BlockReader | None = None,
    ) -> pl.DataFrame:
        """Top-``k`` of every user in ``users`` (sorted): ``user_idx, item_idx, score, rank, source``
        ordered by user, then rank; ties in score go to the lower item index. Blocks of
        ``block_users`` users at a time (``recommend_block``); ``on_blocks``: as ``features``."""
        self.check_sources(models)
        item_stats, user_stats = self.statistics(history, now)
        buffer = BlockBuffers(history.n_items)
        parts = [
            self.recommend_block(
                b,
                models,
                history,
                k,
                exclude,
                allowed,
                rules,
                item_stats,
                user_stats,
                buffer,
                timer=timer,
                on_blocks=on_blocks,
            )[0]
            for b in self.blocks(np.asarray(users, dtype=np.int64), history.n_items, block_users, "fused ranking")
        ]
        return pl.concat(parts) if parts else empty_lists()

    @staticmethod
    def statistics(history: History, now: int | None = None) -> tuple[pl.DataFrame | None, pl.DataFrame]:
        """The item and user statistics of ``history`` as of ``now`` (default: its end), once for
        all blocks (no item statistics where ``history`` has per-user cuts: computed per row)."""
        item_stats = None if history.user_now is not None else item_statistics(history)
        return item_stats, user_statistics(history, now)

    def recommend_block(
        self,
        users: np.ndarray,
        models: Mapping[str, Recommender],
        history: History,
        k: int,
        exclude: sp.csr_matrix | None,
        allowed: np.ndarray | None,
        rules: CompiledRules | None,
        item_stats: pl.DataFrame | None,
        user_stats: pl.DataFrame,
        buffer: Callable[[str, int], np.ndarray | None] | None = None,
        matrix: Callable[[pl.DataFrame], np.ndarray] | None = None,
        predict: Callable[[np.ndarray], np.ndarray] | None = None,
        timer: Timer = _no_timer,
        on_blocks: BlockReader | None = None,
    ) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
        """One block of ``recommend``; also returns the ranker's feature matrix ``x`` and, per
        output row, its row of ``x`` (the export explains rows from them).

        ``matrix``/``predict``: how the features become the ranker's input and its scores
        (default: ``ranker.features`` as float64 with nulls as NaN; the booster at its best
        iteration): the export passes its own, with buffers kept from block to block.
        """
        feats = self.features(
            users, models, history, exclude, allowed, None, item_stats, user_stats, buffer, timer, on_blocks=on_blocks
        )
        with timer("ranker"):
            x = (matrix or self.ranker.matrix)(feats)
            pred = np.asarray((predict or self.ranker.predict_matrix)(x), dtype=np.float32)
        with timer("rules"):
            out, rows = ranked_candidates(feats, pred, users, k, rules)
        return out, x, rows


def ranked_candidates(
    feats: pl.DataFrame, pred: np.ndarray, users: np.ndarray, k: int, rules: CompiledRules | None = None
) -> tuple[pl.DataFrame, np.ndarray]:
    """Each user's top-``k`` candidates of ``feats`` by ``pred`` (ties: lower item index first)
    after ``rules``: ``user_idx, item_idx, score, rank, source`` by user, then rank, and the row
    of ``feats`` of each. ``users``: sorted, every user of ``feats``; ``feats`` in (user, item)
    order."""
    local = np.searchsorted(users, feats[Columns.UserIdx].to_numpy())
    rows, score = ranked_rows(local, np.asarray(pred, dtype=np.float32), len(users))
    if rules is None:
        col = np.arange(rows.shape[1])
        rank = np.where(np.isfinite(score) & (col < k), col + 1, 0).astype(np.int32)
    else:
        rank = apply_rules_dense(feats[Columns.ItemIdx].to_numpy()[rows], score, rules, k)
    _, rows, kept_score, kept_rank = kept_cells(rank, rows, score)
    out = feats.select(Columns.UserIdx, Columns.ItemIdx)[rows].with_columns(
        pl.Series(Columns.Score, kept_score),
        pl.Series(Columns.Rank, kept_rank),
        feats[Columns.Source].gather(rows),
    )
    return out, rows


class _GlobalRows(Recommender):
    """A block's ``ScoreBlock`` read with the users' own indices (the candidate frame's);
    ``users``: the block's users, sorted (row r of the block is ``users[r]``)."""

    def __init__(self, block: Recommender, users: np.ndarray) -> None:
        self.block, self.users = block, users

    def fit(self, history: History) -> _GlobalRows:  # pragma: no cover
        return self

    def score_users(self, users: np.ndarray) -> np.ndarray:  # pragma: no cover
        return self.block.score_users(np.searchsorted(self.users, users))

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int | None = None) -> np.ndarray:
        return self.block.score_pairs(np.searchsorted(self.users, users), items)

    def users_without_history(self, users: np.ndarray) -> np.ndarray | None:
        return self.block.users_without_history(np.searchsorted(self.users, users))


def empty_lists() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            Columns.UserIdx: pl.Int32,
            Columns.ItemIdx: pl.Int32,
            Columns.Score: pl.Float32,
            Columns.Rank: pl.Int32,
            Columns.Source: pl.String,
        }
    )


def ranked_arrays(lists: pl.DataFrame, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``recommend``'s rows as ``[len(users), k]`` int32 items (-1 = none), scores and sources; row
    ``j`` is ``users[j]`` (``users`` sorted)."""
    items = np.full((len(users), k), -1, dtype=np.int32)
    scores = np.full((len(users), k), -np.inf, dtype=np.float32)
    sources = np.full((len(users), k), "", dtype=object)
    row = np.searchsorted(users, lists[Columns.UserIdx].to_numpy())
    col = lists[Columns.Rank].to_numpy() - 1
    items[row, col] = lists[Columns.ItemIdx].to_numpy()
    scores[row, col] = lists[Columns.Score].to_numpy()
    # One str object per source name, not per row (30 M rows at 300,000 users x 100).
    src = lists[Columns.Source].fill_null("")
    names = src.unique().sort().to_list()
    sources[row, col] = np.asarray(names, dtype=object)[src.cast(pl.Enum(names)).to_physical().to_numpy()]
    return items, scores, sources
