"""The one place where column names, event types and table schemas live.

Every table that crosses a module boundary uses these names. Recommendation tables are always
``user_id, item_id, score, rank`` (rank starts at 1), sorted by user then rank.
"""

from __future__ import annotations

import polars as pl


class Columns:
    User = "user_id"
    Item = "item_id"
    Timestamp = "timestamp"
    Event = "event"
    Weight = "weight"
    # Dense integer indices assigned by ``recsys.data.idmap.IdMap``; models only see these.
    UserIdx = "user_idx"
    ItemIdx = "item_idx"
    Score = "score"
    Rank = "rank"
    Source = "source"
    Text = "text"
    Clicked = "clicked"
    # Optional item column: when the item was first listed (Unix seconds; null = always). An
    # item is never a candidate for a moment before it existed.
    AvailableFrom = "available_from"
    # Which part of a data set's own fixed split an event belongs to (``SplitParts``).
    Split = "split"
    # Optional interaction column: False for an event logged without a time of its own (MIND's
    # history clicks), whose timestamp is a stand-in that only keeps it in order before the
    # user's dated events. A time cut cannot place such an event, so ``GlobalTimeSplit`` keeps
    # it in training and never makes it a target. Absent = every event is dated.
    Dated = "dated"
    # Groups the candidates shown together in one impression (one page view of a news feed).
    Impression = "impression_id"
    # 0-based place of a candidate in its impression's list, as shown.
    Position = "position"
    # Which labelled stage a ranker training row comes from (0 = validation, k = each user's k-th
    # last training event): with the user, one ranking problem (query).
    Stage = "stage"


class SplitParts:
    """Values of ``Columns.Split``: a data set's own train / validation / test assignment."""

    Train = "train"
    Val = "val"
    Test = "test"
    ALL = (Train, Val, Test)


class Events:
    """Event types an interaction may carry. Purchases weigh more than clicks (config decides)."""

    Click = "click"
    Purchase = "purchase"
    ALL = (Click, Purchase)


# Required columns and the dtypes they are cast to on load. Extra columns are kept.
INTERACTION_SCHEMA: dict[str, pl.DataType] = {
    Columns.User: pl.String(),
    Columns.Item: pl.String(),
    Columns.Timestamp: pl.Int64(),
    Columns.Event: pl.String(),
}
ITEM_SCHEMA: dict[str, pl.DataType] = {Columns.Item: pl.String()}
# Optional: items shown to a user, clicked or not (news feeds, search result pages).
IMPRESSION_SCHEMA: dict[str, pl.DataType] = {
    Columns.User: pl.String(),
    Columns.Item: pl.String(),
    Columns.Timestamp: pl.Int64(),
    Columns.Clicked: pl.Boolean(),
}
RECOMMENDATION_SCHEMA: dict[str, pl.DataType] = {
    Columns.User: pl.String(),
    Columns.Item: pl.String(),
    Columns.Score: pl.Float64(),
    Columns.Rank: pl.Int32(),
    Columns.Source: pl.String(),
}
