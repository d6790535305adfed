"""Train / validation / test splits that never let a model see the events it is judged on."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import polars as pl

from recsys.columns import Columns, SplitParts
from recsys.data import validation as v
from recsys.errors import ConfigError, InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Three disjoint parts of the interactions, each sorted by user_idx, timestamp."""

    train: pl.DataFrame
    val: pl.DataFrame
    test: pl.DataFrame

    def describe(self) -> dict[str, int]:
        parts = (("train", self.train), ("val", self.val), ("test", self.test))
        counts = {
            f"{name}_{what}": n
            for name, df in parts
            for what, n in (("events", df.height), ("users", df[Columns.UserIdx].n_unique()))
        }
        if self.train.schema.get(Columns.Dated) == pl.Boolean:
            # Says what the targets are: under a per-user split a MIND user's test event is their
            # last history click (no time of its own) when no impression click of theirs is left.
            counts |= {f"{name}_undated_events": int((~df[Columns.Dated]).sum()) for name, df in parts}
        return counts


class LeaveLastOutSplit:
    """Per user, by time: the last ``n_test`` moments -> test, the ``n_val`` before -> validation.

    A moment is one timestamp of the user's: events that share it (a batch of ratings entered in
    one second, the clicks of one news impression) are held out together. Their order is
    unknown, and leaving some of them in the history would show every model events of the very
    moment it predicts, which deployment never sees (MovieLens-100k: 32 % of the test users had
    history events in their target's second). Users with fewer than ``n_val + n_test +
    min_train`` moments keep everything in train (they still teach the models, but are not
    evaluated). Without ties every moment is one event.

    >>> import polars as pl
    >>> df = pl.DataFrame({"user_idx": [0, 0, 0, 1], "item_idx": [1, 2, 3, 1], "timestamp": [1, 2, 3, 1]})
    >>> s = LeaveLastOutSplit().split(df)
    >>> s.test["item_idx"].to_list(), s.val["item_idx"].to_list(), s.train["item_idx"].to_list()
    ([3], [2], [1, 1])
    >>> tied = pl.DataFrame({"user_idx": [0] * 4, "item_idx": [1, 2, 3, 4], "timestamp": [1, 2, 3, 3]})
    >>> s = LeaveLastOutSplit().split(tied)
    >>> s.test["item_idx"].to_list(), s.val["item_idx"].to_list(), s.train["item_idx"].to_list()
    ([3, 4], [2], [1])
    """

    def __init__(self, n_val: int = 1, n_test: int = 1, min_train: int = 1) -> None:
        if n_val < 0 or n_test < 1 or min_train < 1:
            raise ConfigError(
                f"split: need n_val >= 0, n_test >= 1, min_train >= 1; got {n_val}, {n_test}, {min_train}"
            )
        self.n_val, self.n_test, self.min_train = n_val, n_test, min_train

    def split(self, interactions: pl.DataFrame) -> Split:
        # Moments counted from the end of each user's time line: 0 = the last timestamp.
        df = interactions.sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True).with_columns(
            moments_from_end(),
            pl.col(Columns.Timestamp).n_unique().over(Columns.UserIdx).alias("_n"),
        )
        eligible = pl.col("_n") >= self.n_val + self.n_test + self.min_train
        is_test = eligible & (pl.col("_from_end") < self.n_test)
        is_val = eligible & ~is_test & (pl.col("_from_end") < self.n_test + self.n_val)
        drop = ["_from_end", "_n"]
        return Split(
            train=df.filter(~is_test & ~is_val).drop(drop),
            val=df.filter(is_val).drop(drop),
            test=df.filter(is_test).drop(drop),
        )


def moments_from_end() -> pl.Expr:
    """``_from_end``: how many of the user's distinct timestamps come after each event's (0 = the
    user's last moment); events sharing a timestamp share it, as they are held out together."""
    return (pl.col(Columns.Timestamp).rank("dense", descending=True).over(Columns.UserIdx) - 1).alias("_from_end")


class GlobalTimeSplit:
    """One time line for everybody: events before ``val_quantile`` -> train, then val, then test.

    Cut points are quantiles of the timestamps. Validation and test events of users with no
    earlier history are kept: every model that scores a user from their history (CF, the text
    tower) gives them no list, so they count as its misses; popularity and the fused ranker,
    which falls back on it, do list them (``Recommender.users_without_history``). The text
    tower's validation leaves them out (they score the same at every step).

    Events without a time of their own (``Columns.Dated`` false: MIND's history clicks) stay in
    train whatever their stand-in timestamp, and the cut points are quantiles of the dated
    events alone: a stand-in time says nothing about when the event happened (MIND places a
    user's history just before their first impression, so a cut on those times held out the
    history of users first seen late: 540 of the sample's 554 test events), and deployment is
    asked for the dated events (MIND: the clicks on impressions). The sources that mark events
    undated vouch that they happened before the user's dated ones (MIND: before the log).

    >>> dated = [True, False, True, True, False, True]  # the stand-ins at 8 and 6 stay in train
    >>> df = pl.DataFrame({"user_idx": [0, 0, 0, 1, 1, 1], "timestamp": [1, 8, 9, 2, 6, 7], "dated": dated})
    >>> s = GlobalTimeSplit(0.5, 0.9).split(df)
    >>> s.train["timestamp"].to_list(), s.val["timestamp"].to_list(), s.test["timestamp"].to_list()
    ([1, 8, 6], [2], [9, 7])
    """

    def __init__(self, val_quantile: float = 0.8, test_quantile: float = 0.9) -> None:
        if not 0.0 < val_quantile < test_quantile < 1.0:
            raise ConfigError(f"split: need 0 < val_quantile < test_quantile < 1, got {val_quantile}, {test_quantile}")
        self.val_quantile, self.test_quantile = val_quantile, test_quantile

    def split(self, interactions: pl.DataFrame) -> Split:
        df = interactions.sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True)
        dated = dated_events(df)
        ts = df.filter(dated)[Columns.Timestamp]
        if ts.is_empty():
            raise InputError(
                f"split=global_time cuts on event times, and no event has one (column '{Columns.Dated}' is false "
                "everywhere); use split=leave_last_out",
                column=Columns.Dated,
            )
        t_val = ts.quantile(self.val_quantile, "lower")
        t_test = ts.quantile(self.test_quantile, "lower")
        t = pl.col(Columns.Timestamp)
        split = Split(
            train=df.filter(~dated | (t < t_val)),
            val=df.filter(dated & (t >= t_val) & (t < t_test)),
            test=df.filter(dated & (t >= t_test)),
        )
        if n_undated := df.height - ts.len():
            log.info(
                "split=global_time: %d of %d events have no time of their own ('%s' false, e.g. MIND's history "
                "clicks) and stay in train (%d of them have stand-in times after the validation cut); the cuts "
                "are quantiles of the %d dated events, and validation (%d) and test (%d) hold dated events only",
                n_undated,
                df.height,
                Columns.Dated,
                df.filter(~dated & (t >= t_val)).height,
                ts.len(),
                split.val.height,
                split.test.height,
            )
        return split


def dated_events(df: pl.DataFrame) -> pl.Expr:
    """True for the events of ``df`` with a time of their own (all, without a ``Columns.Dated``)."""
    if Columns.Dated not in df.columns:
        return pl.lit(True)
    col = df[Columns.Dated]
    if col.dtype != pl.Boolean or col.null_count():
        bad = pl.col(Columns.Dated).is_null() if col.dtype == pl.Boolean else pl.lit(True)
        _, ex = v.example(df, bad)
        raise InputError(
            f"column '{Columns.Dated}' must be true or false on every event (false: no time of its own), "
            f"got {col.dtype} with {col.null_count()} null(s)",
            column=Columns.Dated,
            example=ex,
        )
    return pl.col(Columns.Dated)


class FixedSplit:
    """The data set's own split: a column says, for every event, ``train``, ``val`` or ``test``.

    Use it where a data set ships a fixed split (Amazon-Scientific's ``train/valid/test.inter``)
    so results are comparable with published ones. Users without a ``val`` or ``test`` event are
    simply not evaluated at that stage.

    >>> import polars as pl
    >>> df = pl.DataFrame({"user_idx": [0, 0, 0], "timestamp": [0, 1, 2], "split": ["train", "val", "test"]})
    >>> s = FixedSplit().split(df)
    >>> s.train.height, s.val.height, s.test.height
    (1, 1, 1)
    """

    def __init__(self, column: str = Columns.Split) -> None:
        self.column = column

    def split(self, interactions: pl.DataFrame) -> Split:
        col = self.column
        if col not in interactions.columns:
            raise ConfigError(
                f"split=fixed needs a '{col}' column marking each event {list(SplitParts.ALL)}, and this data set "
                "has none (only data sets that ship their own split have it, e.g. data=scientific); "
                "use split=leave_last_out or split=global_time"
            )
        bad = pl.col(col).is_null() | ~pl.col(col).is_in(list(SplitParts.ALL))
        if interactions.select(bad.any()).item():
            # No file name here: the loader has already turned the source files into this frame.
            _, ex = v.example(interactions, bad)
            raise InputError(
                f"{interactions.select(bad.sum()).item()} event(s) have a split value outside {list(SplitParts.ALL)}",
                column=col,
                example=ex,
            )
        df = interactions.sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True)
        part = pl.col(col)
        return Split(
            train=df.filter(part == SplitParts.Train),
            val=df.filter(part == SplitParts.Val),
            test=df.filter(part == SplitParts.Test),
        )


class RandomSplit:
    """Per user, a seeded random share of the events -> validation and test (RecBole's ``RS`` with
    ``order: RO, group_by: user``), the protocol of RecBole's published MovieLens-100k results.

    Time is ignored, so this split leaks the future into training by design: use it only to
    compare with results published under it, never to judge a model for production.
    """

    def __init__(self, val_ratio: float = 0.1, test_ratio: float = 0.1, seed: int = 0) -> None:
        if not (val_ratio >= 0.0 and test_ratio > 0.0 and val_ratio + test_ratio < 1.0):
            raise ConfigError(f"split: need 0 <= val_ratio, 0 < test_ratio, sum < 1; got {val_ratio}, {test_ratio}")
        self.val_ratio, self.test_ratio, self.seed = val_ratio, test_ratio, seed

    def split(self, interactions: pl.DataFrame) -> Split:
        import numpy as np

        df = interactions.sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True)
        rng = np.random.default_rng(self.seed)
        df = df.with_columns(pl.Series("_r", rng.random(df.height)))
        # Rank within user by the random key; RecBole rounds the split points per user the same way.
        df = df.with_columns(
            (pl.col("_r").rank("ordinal").over(Columns.UserIdx) - 1).alias("_pos"),
            pl.len().over(Columns.UserIdx).alias("_n"),
        )
        n = pl.col("_n").cast(pl.Float64)
        n_train = (n * (1 - self.val_ratio - self.test_ratio)).floor()
        n_val = (n * self.val_ratio).floor()
        pos = pl.col("_pos")
        drop = ["_r", "_pos", "_n"]
        return Split(
            train=df.filter(pos < n_train).drop(drop),
            val=df.filter((pos >= n_train) & (pos < n_train + n_val)).drop(drop),
            test=df.filter(pos >= n_train + n_val).drop(drop),
        )
