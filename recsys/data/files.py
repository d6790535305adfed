"""Plain files (CSV, TSV, parquet): the path a real user takes, and the one the generated data uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl

from recsys.columns import INTERACTION_SCHEMA, Columns
from recsys.data import validation as v
from recsys.data.dataset import Dataset, IdMap
from recsys.errors import ConfigError, InputError


class FileDataSource:
    """Interactions and items from two files, validated before any training starts.

    Args:
        interactions: path of the interaction table (``user_id, item_id, timestamp, event``).
        items: path of the item table (``item_id`` plus text fields; optionally
            ``available_from``, when the item was first listed, as for ``timestamp``).
        text_fields: item columns joined, in this order, into the text the encoder reads;
            empty fields are skipped.
        event_weights: weight of each event type; an event type not listed is an error.
        column_map: our column name -> the name in your files, e.g. ``{user_id: customer}``.
        text_separator: put between text fields.
        name: shown in logs and reports.
    """

    def __init__(
        self,
        interactions: str,
        items: str,
        text_fields: Sequence[str] = ("title", "description"),
        event_weights: Mapping[str, float] | None = None,
        column_map: Mapping[str, str] | None = None,
        text_separator: str = ". ",
        name: str = "files",
    ) -> None:
        self.interactions_path = str(interactions)
        self.items_path = str(items)
        self.text_fields = list(text_fields)
        self.event_weights = dict(event_weights or {"click": 1.0, "purchase": 4.0})
        self.column_map = dict(column_map or {})
        self.text_separator = text_separator
        self.name = name
        if not self.text_fields:
            raise ConfigError("data.text_fields is empty: name at least one item column to encode")
        for event, w in self.event_weights.items():
            if not w > 0:
                raise ConfigError(f"data.event_weights.{event} must be > 0, got {w}")

    def _rename(self, df: pl.DataFrame) -> pl.DataFrame:
        mapping = {src: ours for ours, src in self.column_map.items() if src in df.columns and src != ours}
        return df.rename(mapping)

    def load_items(self) -> pl.DataFrame:
        path = self.items_path
        df = self._rename(v.read_table(path))
        v.require_columns(df, [Columns.Item, *self.text_fields], path)
        df = df.with_columns(pl.col(Columns.Item).cast(pl.String))
        v.require_non_null(df, Columns.Item, path)
        v.require_unique(df, Columns.Item, path)
        text = pl.concat_str(
            # Blank fields count as missing, so they neither add a stray separator nor pass as text.
            [pl.col(f).cast(pl.String).str.strip_chars().replace("", None) for f in self.text_fields],
            separator=self.text_separator,
            ignore_nulls=True,
        ).str.strip_chars()
        df = df.with_columns(text.fill_null("").alias(Columns.Text))
        if Columns.AvailableFrom in df.columns:
            df = v.parse_timestamp(df, Columns.AvailableFrom, path)
        empty = pl.col(Columns.Text) == ""
        if df.select(empty.any()).item():
            row, ex = v.example(df, empty)
            raise InputError(
                f"item has no text in any of the text fields {self.text_fields}",
                file=path,
                column=self.text_fields[0],
                row=row,
                example=ex,
            )
        return df

    def load_interactions(self, item_ids: pl.Series) -> pl.DataFrame:
        path = self.interactions_path
        df = self._rename(v.read_table(path))
        v.require_columns(df, INTERACTION_SCHEMA, path)
        for col in (Columns.User, Columns.Item, Columns.Event):
            df = df.with_columns(pl.col(col).cast(pl.String))
            v.require_non_null(df, col, path)
        v.require_non_null(df, Columns.Timestamp, path)
        df = v.parse_timestamp(df, Columns.Timestamp, path)
        v.require_in(df, Columns.Event, self.event_weights, path)
        v.require_known(df, Columns.Item, item_ids, path, self.items_path)
        weights = pl.col(Columns.Event).replace_strict(self.event_weights, return_dtype=pl.Float32)
        return df.with_columns(weights.alias(Columns.Weight))

    def load(self) -> Dataset:
        items = self.load_items()
        inter = self.load_interactions(items[Columns.Item])
        users = IdMap.from_values(inter[Columns.User])
        item_ids = IdMap.from_values(items[Columns.Item])
        inter = (
            inter.join(users.to_frame(Columns.User, Columns.UserIdx), on=Columns.User)
            .join(item_ids.to_frame(Columns.Item, Columns.ItemIdx), on=Columns.Item)
            # Joins do not keep row order (polars 2 streaming); ties in time keep file order.
            .sort(Columns.UserIdx, Columns.Timestamp, v.ROW)
        )
        items = items.join(item_ids.to_frame(Columns.Item, Columns.ItemIdx), on=Columns.Item).sort(Columns.ItemIdx)
        return Dataset(
            interactions=inter.drop(v.ROW),
            items=items.drop(v.ROW),
            users=users,
            item_ids=item_ids,
            name=self.name,
        )
