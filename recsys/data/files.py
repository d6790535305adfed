"""Plain files (CSV, TSV, parquet): the path a real user takes, and the one the generated data uses."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager

import polars as pl

from recsys.columns import INTERACTION_SCHEMA, Columns
from recsys.data import validation as v
from recsys.data.dataset import Dataset, IdMap
from recsys.data.raw import check_policy, handle_duplicates
from recsys.data.tables import ColumnMap, read_table, require_scalar
from recsys.errors import ConfigError, InputError, require_number

log = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("drop", "error", "keep")
FUTURE_POLICIES = ("error", "keep", "drop")
MISSING_TEXT_POLICIES = ("error", "drop", "keep")


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
            Files are checked under their own column names, so every error names a column as
            the file does (and says which of ours it stands for); renamed after the checks.
        text_separator: put between text fields.
        name: shown in logs and reports.
        duplicates: interaction rows repeating an earlier row in every column, and item rows
            repeating an earlier item row: ``drop`` (counted in ``report`` and logged), ``error``,
            or ``keep`` (interactions only: repeated events count twice). Item rows that share an
            id but differ in any column are always an error.
        future_timestamps: interactions more than a day after this machine's clock (often
            milliseconds read as seconds): ``error``, ``keep`` (logged and counted) or ``drop``
            (counted).
        now: the reference time for ``future_timestamps`` (Unix seconds; default: the clock).
        missing_text: items whose text fields are all empty: ``error`` (the default), ``drop``
            (the item and its interactions are left out, both counted) or ``keep`` (the item
            stays, with the empty string as its text: every such item gets the same text
            vector, so the text tower cannot tell them apart and they reach users through
            their interactions (CF); counted). Counts are logged and kept in ``report``.
        missing_text_help: what the ``error`` of ``missing_text`` tells the user to do. The
            default names the ``data.missing_text`` setting of training; a command without that
            setting (``python -m recsys.update``) says what its user can do instead.

    Columns other than the ones named here are kept as they are (``Dataset.interactions`` and
    ``Dataset.items`` carry them), so features added later can read them.
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
        duplicates: str = "drop",
        future_timestamps: str = "error",
        now: int | None = None,
        missing_text: str = "error",
        missing_text_help: str = "set data.missing_text=drop or keep",
    ) -> None:
        self.interactions_path = str(interactions)
        self.items_path = str(items)
        self.text_fields = list(text_fields)
        self.event_weights = dict(event_weights or {"click": 1.0, "purchase": 4.0})
        self.column_map = dict(column_map or {})
        self.text_separator = text_separator
        self.name = name
        self.duplicates = check_policy("duplicates", duplicates, DUPLICATE_POLICIES)
        self.future_timestamps = check_policy("future_timestamps", future_timestamps, FUTURE_POLICIES)
        self.now = now
        self.missing_text = check_policy("missing_text", missing_text, MISSING_TEXT_POLICIES)
        self.missing_text_help = missing_text_help
        # Rows touched by a repair policy, and facts worth knowing, by what; filled by load().
        self.report: dict[str, int] = {}
        self._no_text = pl.Series(Columns.Item, [], dtype=pl.String)  # items missing_text=drop left out
        if not self.text_fields:
            raise ConfigError("data.text_fields is empty: name at least one item column to encode")
        for event, w in self.event_weights.items():
            require_number(f"data.event_weights.{event}", w, 0, low_open=True)

    @property
    def _map(self) -> ColumnMap:
        return ColumnMap(self.column_map)

    def _in_file(self, column: str) -> str:
        """Our ``column`` as the files name it."""
        return self._map.in_file(column)

    def _renamed(self) -> dict[str, str]:
        """The file's name -> ours, for the columns ``column_map`` renames."""
        return self._map.renamed()

    def _rename(self, df: pl.DataFrame) -> pl.DataFrame:
        return self._map.rename(df)

    def _noted(self, error: InputError) -> InputError:
        """``error`` with the column mapping spelled out (``ColumnMap.noted``)."""
        return self._map.noted(error)

    def _file_terms(self) -> AbstractContextManager[None]:
        """Checks inside run on the file's own column names; a failing one gets the mapping noted."""
        return self._map.file_terms()

    def in_file_terms(self, error: InputError) -> InputError:
        """``error`` about a loaded frame (our column names), told as the file has it: the column
        and the example row's keys as the file names them, the mapping noted. For checks made
        after loading, such as ``recsys.update``'s against the model."""
        example = None
        if error.example is not None:
            example = {self._in_file(k): val for k, val in error.example.items()}
        column = None if error.column is None else self._in_file(error.column)
        moved = type(error)(error.message, file=error.file, column=column, row=error.row, example=example)
        return self._noted(moved)

    def _read(self, path: str, needed: Sequence[str], allow_empty: bool = False) -> pl.DataFrame:
        """``path`` with the ``needed`` columns (the file's names), still under the file's names."""
        df = read_table(path, allow_empty)
        v.require_columns(df, needed, path)
        self._map.check_clash(df, path)
        return df

    def load_items(self, allow_empty: bool = False) -> pl.DataFrame:
        """The item file, checked on its own. ``allow_empty``: a file with a header and no rows
        is accepted (an update without new items); its header is checked all the same."""
        path = self.items_path
        item = self._in_file(Columns.Item)
        fields = [self._in_file(f) for f in self.text_fields]
        with self._file_terms():
            df = self._read(path, [item, *fields], allow_empty)
            require_scalar(df, [item, *fields], path)
            v.require_id_dtype(df, item, path)
            df = df.with_columns(pl.col(item).cast(pl.String))
            policy = "drop" if self.duplicates == "keep" else self.duplicates
            df = handle_duplicates(df, [c for c in df.columns if c != v.ROW], policy, path, self.report)
            v.require_non_null(df, item, path)
            v.require_unique(df, item, path)
            text = pl.concat_str(
                # Blank fields count as missing, so they neither add a stray separator nor pass as text.
                [pl.col(f).cast(pl.String).str.strip_chars().replace("", None) for f in fields],
                separator=self.text_separator,
                ignore_nulls=True,
            ).str.strip_chars()
            sent = df.columns  # the example row below shows these, not the joined text
            df = df.with_columns(text.fill_null("").alias(Columns.Text))
            available = self._in_file(Columns.AvailableFrom)
            if available in df.columns:
                df = v.parse_timestamp(df, available, path)
            empty = pl.col(Columns.Text) == ""
            n_empty = df.select(empty.sum()).item()
            if n_empty and self.missing_text == "error":
                row, ex = v.example(df, empty)
                ex = {c: ex[c] for c in sent if c in ex}
                raise InputError(
                    f"{n_empty} item(s) have no text in any of the text fields {fields} ({self.missing_text_help})",
                    file=path,
                    column=fields[0],
                    row=row,
                    example=ex,
                )
        if n_empty:
            verb = "dropped" if self.missing_text == "drop" else "kept"
            log.warning("%s: %s %d item(s) with no text in %s", path, verb, n_empty, fields)
            self.report[f"items_without_text_{verb}"] = n_empty
            if self.missing_text == "drop":
                self._no_text = df.filter(empty)[item].alias(Columns.Item)
                df = df.filter(~empty)
        return self._rename(df)

    def _read_interactions(self) -> pl.DataFrame:
        """The interaction file checked on its own (columns, ids, times, event types); the file's
        column names."""
        path = self.interactions_path
        user, item, ts, event = (self._in_file(c) for c in INTERACTION_SCHEMA)
        with self._file_terms():
            df = self._read(path, [user, item, ts, event])
            require_scalar(df, [user, item, ts, event], path)
            for col in (user, item):
                v.require_id_dtype(df, col, path)
            for col in (user, item, event):
                df = df.with_columns(pl.col(col).cast(pl.String))
                v.require_non_null(df, col, path)
            v.require_non_null(df, ts, path)
            df = v.parse_timestamp(df, ts, path)
            add = "add event types with '+data.event_weights={{{value}: 1.0}}'"
            v.require_in(df, event, self.event_weights, path, add)
        return df

    def _check_interactions(self, df: pl.DataFrame, item_ids: pl.Series, also: str | None = None) -> pl.DataFrame:
        """``_read_interactions``' frame against the items (``item_ids``: every id an event may
        name; ``also``: where those not in the item file come from), then the time and duplicate
        policies; renamed to our column names."""
        path = self.interactions_path
        item, ts = self._in_file(Columns.Item), self._in_file(Columns.Timestamp)
        with self._file_terms():
            if len(self._no_text):
                gone = pl.col(item).is_in(self._no_text.implode())
                n = df.select(gone.sum()).item()
                if n:
                    log.warning("%s: dropped %d interaction(s) with items that have no text", path, n)
                    self.report["interactions_with_items_without_text_dropped"] = n
                    df = df.filter(~gone)
            v.require_known(df, item, item_ids, path, self.items_path, also)
            df = self._future(df, ts, path)
            if self.duplicates != "keep":
                key = [c for c in df.columns if c != v.ROW]
                df = handle_duplicates(df, key, self.duplicates, path, self.report)
        df = self._rename(df)
        weights = pl.col(Columns.Event).replace_strict(self.event_weights, return_dtype=pl.Float32)
        return df.with_columns(weights.alias(Columns.Weight))

    def load_tables(
        self, known_items: pl.Series | None = None, allow_empty_items: bool = False
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Items and interactions. Each file is checked on its own first, the interaction file
        first (a missing or broken one is named as such, whatever the item file holds), then
        against each other: an event's item has a row in the item file or is in ``known_items``
        (a model's catalogue, for an update). ``allow_empty_items``: see ``load_items``."""
        events = self._read_interactions()
        items = self.load_items(allow_empty_items)
        ids = items[Columns.Item]
        if known_items is None:
            return items, self._check_interactions(events, ids)
        ids = pl.concat([known_items.cast(pl.String), ids]).unique()
        return items, self._check_interactions(events, ids, also="the model's catalogue")

    def _future(self, df: pl.DataFrame, column: str, path: str) -> pl.DataFrame:
        now = int(time.time()) if self.now is None else int(self.now)
        return v.check_future(df, column, path, self.future_timestamps, now, self.report)

    def load(self) -> Dataset:
        self.report = {}
        self._no_text = pl.Series(Columns.Item, [], dtype=pl.String)
        items, inter = self.load_tables()
        users = IdMap.from_values(inter[Columns.User])
        item_ids = IdMap.from_values(items[Columns.Item])
        inter = (
            inter.join(users.to_frame(Columns.User, Columns.UserIdx), on=Columns.User)
            .join(item_ids.to_frame(Columns.Item, Columns.ItemIdx), on=Columns.Item)
            # Joins do not keep row order (polars 2 streaming); ties in time keep file order.
            .sort(Columns.UserIdx, Columns.Timestamp, v.ROW)
        )
        items = items.join(item_ids.to_frame(Columns.Item, Columns.ItemIdx), on=Columns.Item).sort(Columns.ItemIdx)
        per_user = inter.group_by(Columns.UserIdx).agg(
            pl.len().alias("n"), pl.col(Columns.Timestamp).n_unique().alias("times")
        )
        n_tied = per_user.filter((pl.col("n") > 1) & (pl.col("times") == 1)).height
        if n_tied:
            # Not an error: they teach the models, but a per-user split holds out whole moments
            # (LeaveLastOutSplit), so a user with one moment is never evaluated.
            log.info(
                "%s: %d user(s) have all their events at one time (kept in train, not evaluated by leave_last_out)",
                self.name,
                n_tied,
            )
            self.report["users_with_all_events_at_one_time"] = n_tied
        return Dataset(
            interactions=inter.drop(v.ROW),
            items=items.drop(v.ROW),
            users=users,
            item_ids=item_ids,
            name=self.name,
        )
