"""The hybrid recommender, stage by stage, with no stage seeing the events it is judged on.

Two stages share one protocol:

* **validation stage** -- history = train. CF models are fitted on it, the text tower is
  fine-tuned on it (and early-stopped on the validation events), and the ranker learns to
  order each user's candidates so that the validation item comes first. With
  ``rank.label_stages`` > 1 it also learns from earlier stages inside train (each user's last
  training moment held out, CF refitted before it; the text tower was fine-tuned on those events,
  which held out lost on validation: ``earlier_stages``).
* **test stage** -- history = train + validation. CF models are refitted on it, the text tower
  reads the longer histories (its weights stay as trained), the ranker trained above orders
  the candidates, and every model is scored on the test events, which nothing has seen.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.data.dataset import Dataset, listing_times
from recsys.data.split import Split, moments_from_end
from recsys.errors import ConfigError, InputError, require_whole
from recsys.evaluation.metrics import metric_table, ranking_metrics, relevance_matrix
from recsys.progress import user_bar
from recsys.rank.candidates import ScoreBlock, masked_top_k
from recsys.rank.features import feature_columns
from recsys.rank.fused import BlockReader, FusedRecommender, ranked_arrays
from recsys.rank.ranker import LambdaMARTRanker
from recsys.recommender import BlockBuffers, History, Recommender, top_k

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    users: np.ndarray
    recommended: dict[str, np.ndarray]  # model -> [n_users, K] item indices
    scores: dict[str, np.ndarray]
    sources: np.ndarray  # fused: which candidate source found each item
    metrics: dict[str, dict[str, np.ndarray]]
    table: pl.DataFrame
    timings: dict[str, float] = field(default_factory=dict)

    def keep_lists(self, names: Iterable[str]) -> None:
        """Let go of every other model's lists (``recommended`` and ``scores``); the metrics stay.
        The job does once the evaluation bundle holds them: at 300,000 users the 8 models' top-100
        lists are 1.9 GB, read back from the bundle by the report."""
        keep = set(names)
        self.recommended = {n: v for n, v in self.recommended.items() if n in keep}
        self.scores = {n: v for n, v in self.scores.items() if n in keep}


class Exclusion:
    """Per user, the items no model may propose at a stage: the seen ones (a sparse matrix) and
    those listed after the user's cut (``listed[item] > cut[user]``), built for the rows asked for
    (``exclusion[rows]``, a CSR matrix), never for every user at once. Stored per user, the
    not-yet-listed items alone were 225 M entries at 30k users and 150k items."""

    def __init__(self, seen: sp.csr_matrix, listed: np.ndarray, cut: np.ndarray) -> None:
        self.seen, self.cut = seen, cut
        self.shape = seen.shape
        self.order = np.argsort(listed, kind="stable")  # items by listing time
        self.times = listed[self.order]

    def __getitem__(self, rows) -> sp.csr_matrix:
        # Each row's future items are a tail of ``order``: gathered, not compared item by item.
        start = np.searchsorted(self.times, self.cut[rows], side="right")
        n_future = len(self.order) - start
        cols = np.concatenate([self.order[s:] for s in start]) if len(start) else np.zeros(0, dtype=np.int64)
        indptr = np.r_[0, np.cumsum(n_future)]
        future = sp.csr_matrix((np.ones(len(cols), np.float32), cols, indptr), shape=(len(start), self.shape[1]))
        out = (self.seen[rows] + future).tocsr()
        out.data[:] = 1.0
        return out

    def tocsr(self) -> sp.csr_matrix:
        """Every row at once (small data: tests, a saved copy)."""
        return self[np.arange(self.shape[0])]


def stage_exclusion(history: History, items: pl.DataFrame, targets: pl.DataFrame) -> sp.csr_matrix | Exclusion:
    """Items no model may propose to a user at this stage: those in the user's history, and
    those not yet listed (``available_from``) when the user's first held-out event happened
    (an ``Exclusion``, which builds the rows it is asked for).

    Knowing *when* a user comes back is not knowing *what* they pick: a live system recommends
    from the catalogue of that moment too.
    """
    seen = history.matrix.copy()
    seen.data[:] = 1.0
    listed = listing_times(items)
    if listed is None:
        return seen
    listed = np.nan_to_num(listed, nan=-np.inf)
    at = targets.group_by(Columns.UserIdx).agg(pl.col(Columns.Timestamp).min())
    cut = np.full(seen.shape[0], np.inf)  # users without a target: nothing is in their future
    cut[at[Columns.UserIdx].to_numpy()] = at[Columns.Timestamp].to_numpy()
    return Exclusion(seen, listed, cut)


def stage_history(history: History, targets: pl.DataFrame) -> History:
    """``history`` with each user's ``user_now``: just before the user's first target event.

    Under a per-user split (leave-last-out) users are judged at different times, and the
    history holds other users' events from after a user's held-out one; time-dependent features
    and statistics (popularity, item recency, user idle time) then count only events up to each
    user's own cut. Under a global cut every target lies after the history, and ``user_now``
    stays unset (the history's end, for everybody), unless the history holds undated events
    whose stand-in times pass the cut (MIND's history clicks, ``Columns.Dated``): then each
    user's cut leaves the stand-ins after it out of the time-dependent features (they happened
    earlier, but when is unknown, so they are not counted rather than counted as recent).
    """
    df = history.interactions
    if not df.height or not targets.height:
        return history
    end = int(df[Columns.Timestamp].max())
    first = targets.group_by(Columns.UserIdx).agg(pl.col(Columns.Timestamp).min())
    now = np.full(history.n_users, end, dtype=np.int64)
    users = first[Columns.UserIdx].to_numpy().astype(np.int64)
    now[users] = np.minimum(first[Columns.Timestamp].to_numpy().astype(np.int64) - 1, end)
    if np.all(now == end):
        return history
    return History(df, history.n_users, history.n_items, user_now=now)


def earlier_stages(train: pl.DataFrame, n: int) -> list[tuple[pl.DataFrame, pl.DataFrame]]:
    """``n`` more labelled stages for the ranker inside ``train`` (sorted by user, then time):
    stage ``k`` holds out each user's ``k``-th last training moment as the target (the events
    sharing that timestamp, as ``LeaveLastOutSplit`` holds them out) and keeps the events
    before it as the history (a target needs at least one earlier moment). Returned as
    ``(history events, targets)`` for k = 1..n.

    One held-out event per user is few labels where candidate recall is low (10x the generated
    data: a third of the users teach the ranker). The text tower is fine-tuned on these events
    too: holding them out of its training did not keep the ranker from over-trusting it, it cost
    fused validation NDCG@10 (docs/design.md, "Labels from two stages").

    >>> df = pl.DataFrame({"user_idx": [0, 0, 0, 1], "item_idx": [1, 2, 3, 1], "timestamp": [1, 2, 3, 1]})
    >>> [(h["item_idx"].to_list(), t["item_idx"].to_list()) for h, t in earlier_stages(df, 2)]
    [([1, 2], [3]), ([1], [2])]
    >>> tied = pl.DataFrame({"user_idx": [0] * 4, "item_idx": [1, 2, 3, 4], "timestamp": [1, 2, 3, 3]})
    >>> [(h["item_idx"].to_list(), t["item_idx"].to_list()) for h, t in earlier_stages(tied, 1)]
    [([1, 2], [3, 4])]
    """
    train = train.with_columns(moments_from_end())
    back = pl.col("_from_end")  # 0 = the user's last moment
    size = pl.col(Columns.Timestamp).n_unique().over(Columns.UserIdx)
    return [
        (train.filter(back >= k).drop("_from_end"), train.filter((back == k - 1) & (size > k)).drop("_from_end"))
        for k in range(1, n + 1)
    ]


@dataclass
class LabelledStage:
    """What the ranker learns from at one stage: the users, the models fitted on ``history``,
    the held-out ``targets`` and what no model may propose (``exclude``)."""

    users: np.ndarray
    models: Mapping[str, Recommender]
    history: History
    targets: pl.DataFrame
    exclude: sp.csr_matrix | None = None


def earlier_labelled_stages(
    train: pl.DataFrame,
    n: int,
    data: Dataset,
    as_of: bool,
    models: Callable[[History, pl.DataFrame], Mapping[str, Recommender]],
) -> Iterator[LabelledStage]:
    """The ``n`` stages of ``earlier_stages`` as the ranker learns from them, built one at a time
    (a stage's models are fitted only when it is reached): each stage's history (with every
    user's cut when ``as_of``, as ``stage_history``), ``models(history, targets)`` and its exclusions. The
    training job and ``bench/fusion_sweep.py`` both build them here."""
    for events, targets in earlier_stages(train, n):
        history = History(events, data.n_users, data.n_items)
        history = stage_history(history, targets) if as_of else history
        fitted = models(history, targets)
        users = targets[Columns.UserIdx].unique().sort().to_numpy()
        yield LabelledStage(users, fitted, history, targets, stage_exclusion(history, data.items, targets))


class FusionStage:
    """Trains the fused recommender's ranker and runs it at a stage (``FusedRecommender``).

    Args:
        n_candidates: per source, how many of its top items enter the candidate set.
        ranker: the fusion ranker (trained in ``fit``).
        max_train_users: the ranker learns from at most this many validation users whose target
            is among their candidates, the only users that teach it (None: every user). The
            users are taken in a seeded random order, candidates built a chunk at a time, until
            that many are found: the cost follows the labels wanted, whatever share of users has
            one (at 100x the generated data 6 %, at 1x 77 %).
        seed: of that order.
        label_stages: labelled stages the ranker learns from: the validation events, and
            ``label_stages - 1`` earlier ones inside train (``earlier_stages``).
        max_earlier_users: the same cap for each earlier stage (None: every user).
        max_earlier_examined: each earlier stage looks for them among at most this many users of
            the seeded order (None: all). Building candidates is what a stage costs, and where few
            users have a target among their candidates (100x: a few %), finding
            ``max_earlier_users`` would take a pass over every user.
    """

    # Where each step of ``FusedRecommender`` counts in ``timings``.
    PARTS = {"score": "candidates_features", "candidates": "candidates_features", "features": "candidates_features"}

    def __init__(
        self,
        n_candidates: Mapping[str, int],
        ranker: LambdaMARTRanker,
        max_train_users: int | None = None,
        seed: int = 0,
        label_stages: int = 1,
        max_earlier_users: int | None = None,
        max_earlier_examined: int | None = None,
        score_gaps: bool = False,
    ) -> None:
        caps = {
            "max_train_users": max_train_users,
            "max_earlier_users": max_earlier_users,
            "max_earlier_examined": max_earlier_examined,
        }
        for name, cap in caps.items():
            require_whole(f"rank.{name}", cap, optional=True)
        require_whole("rank.label_stages", label_stages)
        if not isinstance(score_gaps, bool):
            raise ConfigError(f"rank.score_gap_feature must be true or false, got {score_gaps!r}")
        self.fused = FusedRecommender(n_candidates, ranker, score_gaps)
        self.max_train_users = max_train_users
        self.seed = seed
        self.label_stages = label_stages
        self.max_earlier_users = max_earlier_users
        self.max_earlier_examined = max_earlier_examined
        # Users the ranker learned from (a target among their candidates) and users whose
        # candidates were built to find them, summed over the labelled stages.
        self.train_users = 0
        self.examined_users = 0
        self.stages_used = 0  # labelled stages the ranker learned from (see ``fit``)
        # Of the users of the last labelled frame(s) with candidates, how many had a target among them.
        self.recall_counts = (0, 0)
        # Seconds spent per part, summed over calls: bench/scale.py reports where the stage goes.
        self.timings: dict[str, float] = {"candidates_features": 0.0, "ranker_train": 0.0, "ranker_predict": 0.0}

    @property
    def candidate_recall_val(self) -> float:
        """The share of users with candidates that have a target among them (``recall_counts``)."""
        with_candidates, hit = self.recall_counts
        return hit / max(with_candidates, 1)

    @property
    def n_candidates(self) -> dict[str, int]:
        return self.fused.n_candidates

    @property
    def ranker(self) -> LambdaMARTRanker:
        return self.fused.ranker

    @contextlib.contextmanager
    def _timer(self, step: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        part = self.PARTS.get(step, "ranker_predict")
        self.timings[part] = self.timings.get(part, 0.0) + time.perf_counter() - t0

    def frame(
        self,
        users: np.ndarray,
        models: Mapping[str, Recommender],
        history: History,
        exclude: sp.csr_matrix | None = None,
        include: pl.DataFrame | None = None,
        keep: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
    ) -> pl.DataFrame:
        """Candidates and features of ``users`` (sorted), block by block; ``exclude`` defaults to
        the history (seen items).

        ``include``: extra ``(user_idx, item_idx)`` pairs (Int32) added to the candidate set, with
        null ``rank_<source>`` where no source proposed them. ``keep``: applied to each block's
        candidates before their features are built (labels, a filter).
        """
        self.fused.check_sources(models)
        exclude = history.matrix if exclude is None else exclude
        item_stats, user_stats = self.fused.statistics(history)
        if include is not None:  # sorted once, each block takes its own rows
            include = include.unique().sort(Columns.UserIdx)
            at = include[Columns.UserIdx].to_numpy()
        parts, buffer = [], BlockBuffers(history.n_items)
        for b in self.fused.blocks(np.asarray(users, dtype=np.int64), history.n_items, desc="candidates and features"):
            extra = None
            if include is not None:
                lo, hi = np.searchsorted(at, b[0], "left"), np.searchsorted(at, b[-1], "right")
                extra = include.slice(int(lo), int(hi - lo))
            parts.append(
                self.fused.features(
                    b, models, history, exclude, None, extra, item_stats, user_stats, buffer, self._timer, keep=keep
                )
            )
        return pl.concat(parts)

    def fit(self, validation: LabelledStage, earlier: Iterable[LabelledStage] = ()) -> FusionStage:
        """Train the ranker on the ``validation`` stage and the ``earlier`` ones (``label_stages``
        in all; an iterable, so that a caller can build each stage's models only when it is
        reached and drop them after). The earlier stages are reached only while the validation
        stage has fewer than ``max_train_users`` taught users (``stages_used``: how many ran)."""
        frames, taught, examined = [], 0, 0
        rest, stage, k = iter(earlier), validation, 0
        while stage is not None:
            users = np.asarray(stage.users, dtype=np.int64)
            if k and not len(users):
                log.warning("labelled stage %d has no users (none has %d training events): skipped", k, k + 1)
            else:
                if k:  # an earlier stage: its own caps, on taught and on examined users
                    cap, look = self.max_earlier_users, self.max_earlier_examined
                else:
                    cap, look = self.max_train_users, None
                df = self.taught_frame(users, stage.models, stage.history, stage.targets, stage.exclude, cap, look)
                frames.append(df.with_columns(pl.lit(k, dtype=pl.Int8).alias(Columns.Stage)))
                taught, examined = taught + self.train_users, examined + self.examined_users
                if k == 0:
                    recall_counts = self.recall_counts  # candidate_recall_val: the validation stage's
                self.stages_used = k + 1
            if self.max_train_users is not None and taught >= self.max_train_users:
                # The earlier stages make up for a validation stage short of labels; one that fills
                # max_train_users has enough (100x the generated data: an earlier stage cost 10
                # min and moved nothing). ``rest`` is lazy: a skipped stage's CF is never fitted.
                if k + 1 < self.label_stages:
                    filled = "the validation stage" if k == 0 else f"labelled stages 0-{k}"
                    skipped = self.label_stages - k - 1
                    log.info(
                        "%s filled rank.max_train_users=%d (%d taught users): %d earlier stage(s) skipped",
                        filled, self.max_train_users, taught, skipped,
                    )  # fmt: skip
                break
            stage, k = next(rest, None), k + 1
            if stage is not None and k >= self.label_stages:
                raise ValueError(f"more labelled stages than rank.label_stages={self.label_stages}")
        else:
            if k != self.label_stages:
                raise ValueError(f"{k} labelled stages given, rank.label_stages={self.label_stages}")
        self.recall_counts, self.train_users, self.examined_users = recall_counts, taught, examined
        df = pl.concat(frames)
        recall = self.candidate_recall_val
        log.info("ranker training: %d candidate rows, candidate recall of the targets %.3f", df.height, recall)
        t0 = time.perf_counter()
        self.ranker.fit(df, feature_columns(df.drop("label")))
        self.timings["ranker_train"] += time.perf_counter() - t0
        return self

    def taught_frame(
        self,
        users: np.ndarray,
        models: Mapping[str, Recommender],
        history: History,
        targets: pl.DataFrame,
        exclude: sp.csr_matrix | None,
        cap: int | None,
        max_examined: int | None = None,
    ) -> pl.DataFrame:
        """The labelled rows of the first ``cap`` taught users in a seeded order of ``users``
        (all of them without a cap), among the first ``max_examined`` users of that order. Chunks
        are sized from the share found so far, so a sparse data set costs a few chunks, not a
        pass per block; the result does not depend on the chunks (each user's rows are built from
        that user alone)."""
        order = users if cap is None and max_examined is None else np.random.default_rng(self.seed).permutation(users)
        order = order[:max_examined]
        parts, seen, hits, examined, taught = [], 0, 0, 0, 0
        while examined < len(order) and (cap is None or taught < cap):
            if cap is None:
                size = len(order)
            else:  # enough users for the missing labels at the share seen so far, plus a tenth
                share = hits / seen if hits else 0.05
                size = max(1024, int(np.ceil((cap - taught) / share * 1.1))) if examined else cap
            chunk = np.sort(order[examined : examined + size])
            df = self.labelled_frame(chunk, models, history, targets, exclude, taught_only=True)
            seen, hits = seen + self.recall_counts[0], hits + self.recall_counts[1]
            examined += len(chunk)
            taught += df[Columns.UserIdx].n_unique()
            parts.append(df)
        if not parts:
            raise InputError("no validation users: the ranker has nothing to learn from")
        df = pl.concat(parts)
        if cap is not None and taught > cap:  # the first ``cap`` taught users in the seeded order
            first = order[np.isin(order, df[Columns.UserIdx].unique().to_numpy())][:cap]
            df = df.filter(pl.col(Columns.UserIdx).is_in(pl.Series(first.astype(np.int32)).implode()))
            taught = cap
        self.recall_counts = (seen, hits)
        self.train_users, self.examined_users = taught, examined
        if cap is not None:
            log.info(
                "ranker training on %d users with a target among their candidates, of %d examined (cap %d)",
                taught,
                examined,
                cap,
            )
        return df

    def labelled_frame(
        self,
        users: np.ndarray,
        models: Mapping[str, Recommender],
        history: History,
        targets: pl.DataFrame,
        exclude: sp.csr_matrix | None = None,
        taught_only: bool = False,
    ) -> pl.DataFrame:
        """``frame`` plus ``label`` (1 where the candidate is one of the user's ``targets``): what the
        ranker learns from. Sets ``recall_counts`` (hence ``candidate_recall_val``): the users with
        candidates, and of them those with a target among them.

        ``taught_only``: only the users with a target among their candidates, the only ones that
        teach the ranker anything (it drops the others): their features are never built (at 10x
        the generated data, ~70 % of the rows).
        """
        labels = targets.select(
            pl.col(Columns.UserIdx).cast(pl.Int32), pl.col(Columns.ItemIdx).cast(pl.Int32), pl.lit(1).alias("label")
        ).unique()
        counts = [0, 0]  # users with candidates, of whom with a target among them

        def label(cands: pl.DataFrame) -> pl.DataFrame:
            df = cands.join(labels, on=[Columns.UserIdx, Columns.ItemIdx], how="left")
            df = df.with_columns(pl.col("label").fill_null(0).cast(pl.Int32))
            hit = df.group_by(Columns.UserIdx).agg(pl.col("label").max())["label"]
            counts[0] += hit.len()
            counts[1] += int(hit.sum())
            return df.filter(pl.col("label").max().over(Columns.UserIdx) > 0) if taught_only else df

        df = self.frame(users, models, history, exclude, keep=label)
        self.recall_counts = (counts[0], counts[1])
        return df

    def score_pairs(
        self,
        pairs: pl.DataFrame,
        models: Mapping[str, Recommender],
        history: History,
        exclude: sp.csr_matrix | None = None,
    ) -> np.ndarray:
        """The ranker's score of given ``(user_idx, item_idx)`` pairs (e.g. an impression's candidates).

        The pairs join each user's candidate set (so ``rank_<source>`` is set where a source proposed
        the item, null elsewhere, as in training), and the features are built on that union: a pair
        inside the candidate set gets exactly the score ``recommend`` gives it.
        """
        keys = [Columns.UserIdx, Columns.ItemIdx]
        pairs = pairs.select(pl.col(k).cast(pl.Int32) for k in keys)
        users = pairs[Columns.UserIdx].unique().sort().to_numpy()
        df = self.frame(users, models, history, exclude, include=pairs)
        with self._timer("ranker"):
            df = df.select(*keys, pl.Series(Columns.Score, self.ranker.predict(df)))
        return pairs.join(df, on=keys, how="left", maintain_order="left")[Columns.Score].to_numpy()

    def recommend(
        self,
        users: np.ndarray,
        models: Mapping[str, Recommender],
        history: History,
        k: int,
        exclude: sp.csr_matrix | None = None,
        on_blocks: BlockReader | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each user's fused top-``k`` as ``[len(users), k]`` items (-1 = none), scores and sources.
        ``on_blocks``: shown each block's score blocks (``BlockLists``)."""
        exclude = history.matrix if exclude is None else exclude
        users = np.asarray(users, dtype=np.int64)
        lists = self.fused.recommend(users, models, history, k, exclude, timer=self._timer, on_blocks=on_blocks)
        return ranked_arrays(lists, users, k)


class BlockLists:
    """Single models' top-``k`` lists read off the fused ranking's score blocks (its ``on_blocks``):
    for a model that is a candidate source, the lists ``Recommender.recommend`` gives (the same
    scores, masking and ``top_k_unseen``, through the candidates' ``masked_top_k``) without
    scoring every user x item a second time.

    Args:
        names: the models wanted; those that are no source of the ranking are simply not listed.
        k: the length of each list.
        exclude: the items each user's lists skip (row u for user u), as ``recommend`` takes it.
    """

    def __init__(self, names: Iterable[str], k: int, exclude: sp.csr_matrix | Exclusion | None) -> None:
        self.names, self.k, self.exclude = set(names), k, exclude
        self.users: list[np.ndarray] = []
        self.parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def __call__(self, users: np.ndarray, blocks: Mapping[str, ScoreBlock]) -> None:
        seen = None if self.exclude is None else self.exclude[users]
        self.users.append(users)
        for name in sorted(self.names & blocks.keys()):
            # The candidates may have masked this block in place already; masking again is a no-op.
            items, scores = masked_top_k(blocks[name], self.k, seen, None, in_place=True)
            self.parts.setdefault(name, []).append((items.astype(np.int32), scores))

    def lists(self, users: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each listed model's ``(items, scores)`` for ``users``, the users the ranking was given."""
        read = np.concatenate(self.users) if self.users else np.zeros(0, dtype=np.int64)
        if not np.array_equal(read, users):
            raise ValueError("the lists were read for other users than those asked for")
        return {
            name: (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            for name, parts in self.parts.items()
            if len(parts) == len(self.users)
        }


def candidate_recall(labelled: pl.DataFrame) -> float:
    """Share of the users of a ``labelled_frame`` with a target among their candidates."""
    return float(labelled.group_by(Columns.UserIdx).agg(pl.col("label").max())["label"].mean())


class HybridPipeline:
    """Fit CF, fine-tune the text tower, learn the fusion, evaluate on test.

    Args:
        cf: unfitted CF / popularity recommenders by name; each is copied and fitted per stage.
        fusion: candidate sources, features and the ranker.
        ks: cut-offs reported (the table shows Recall/NDCG at each, HitRate at the first).
        max_k: length of every evaluated list (MRR is computed over it).
    """

    def __init__(
        self,
        cf: Mapping[str, Recommender],
        fusion: FusionStage,
        ks: Sequence[int] = (10, 20),
        max_k: int = 100,
    ) -> None:
        self.cf = dict(cf)
        self.fusion = fusion
        self.ks = list(ks)
        self.max_k = max_k

    def fit_cf(self, history: History, item_text: np.ndarray | None = None) -> dict[str, Recommender]:
        """Copies of the CF models fitted on ``history``; ``item_text``: the text tower's item
        vectors, for the models that start from them (``Recommender.reads_item_text``)."""
        fitted = {}
        for name, model in self.cf.items():
            t0 = time.perf_counter()
            if model.reads_item_text:
                fitted[name] = copy.deepcopy(model).fit(history, item_text=item_text)
            else:
                fitted[name] = copy.deepcopy(model).fit(history)
            log.info("fitted %s in %.1fs", name, time.perf_counter() - t0)
        return fitted

    def table_columns(self) -> list[str]:
        cols = [f"{m}_at_{k}" for k in self.ks for m in ("recall", "ndcg")]
        return [*cols, "mrr", f"hitrate_at_{self.ks[0]}"]

    def evaluate(
        self,
        users: np.ndarray,
        targets: pl.DataFrame,
        n_items: int,
        singles: Mapping[str, Recommender],
        history: History,
        fused: tuple[np.ndarray, np.ndarray, np.ndarray],
        exclude_seen: bool = True,
        exclude: sp.csr_matrix | None = None,
        listed: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> StageResult:
        """Score each model's top-``max_k`` lists on ``targets``.

        ``listed``: lists already made for some of ``singles`` (``BlockLists``, from the fused
        ranking's score blocks, with the same exclusion); the other models are scored here.

        ``exclude_seen=False`` is the *published* protocol of sequential-recommendation papers:
        the evaluator does not remove history items from single models' rankings. The fused
        ranker never proposes history items itself, so its lists are the same under both.
        ``exclude`` (default: the history) is what the practical protocol removes.
        """
        relevant = relevance_matrix(targets, users, n_items)
        recommended, scores, metrics = {}, {}, {}
        seen = (history.matrix if exclude is None else exclude) if exclude_seen else None
        listed = (listed or {}) if exclude_seen else {}  # they skip the history: not the published protocol
        with user_bar("evaluate", len(users), n_items, len(set(singles) - set(listed))) as bar:
            for name, model in singles.items():
                if name in listed:
                    items, sc = listed[name]
                else:
                    items, sc = model.recommend(users, self.max_k, exclude=seen, progress=bar.update)
                items = np.where(np.isfinite(sc), items, -1).astype(np.int32)  # 0.4 GB a model at 300k users
                recommended[name], scores[name] = items, sc
                metrics[name] = ranking_metrics(items, relevant, self.ks)
        items, sc, sources = fused
        recommended["fused"], scores["fused"] = items, sc
        metrics["fused"] = ranking_metrics(items, relevant, self.ks)
        table = metric_table(metrics, self.table_columns())
        return StageResult(users, recommended, scores, sources, metrics, table)


def impression_scores(
    impressions: pl.DataFrame,
    singles: Mapping[str, Recommender],
    fusion: FusionStage,
    models: Mapping[str, Recommender],
    history: History,
    exclude: sp.csr_matrix | None = None,
) -> pl.DataFrame:
    """Every model's score of every impression candidate: ``impression_id, clicked, model, score``.

    Single models score the pairs directly; the fused ranker scores them through ``score_pairs``
    (features built with each user's candidate set, as in training).
    """
    users = impressions[Columns.UserIdx].to_numpy().astype(np.int64)
    items = impressions[Columns.ItemIdx].to_numpy().astype(np.int64)
    scores = {name: np.asarray(m.score_pairs(users, items), dtype=np.float64) for name, m in singles.items()}
    scores["fused"] = fusion.score_pairs(impressions, models, history, exclude).astype(np.float64)
    base = impressions.select(Columns.Impression, Columns.Clicked)
    return pl.concat(
        base.with_columns(pl.lit(name).alias("model"), pl.Series(Columns.Score, s)) for name, s in scores.items()
    )


def stage_users(targets: pl.DataFrame, what: str) -> np.ndarray:
    if targets.height == 0:
        raise InputError(
            f"the {what} split is empty: no user has enough events for the chosen split "
            "(check split settings or the data)"
        )
    return targets[Columns.UserIdx].unique().sort().to_numpy()


def check_split(data: Dataset, split: Split) -> tuple[np.ndarray, np.ndarray]:
    return stage_users(split.val, "validation"), stage_users(split.test, "test")


__all__ = [
    "FusionStage",
    "HybridPipeline",
    "StageResult",
    "check_split",
    "impression_scores",
    "relevance_matrix",
    "stage_history",
    "top_k",
]
