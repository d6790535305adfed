"""RecBole atomic files with a fixed leave-one-out split, as pre-processed for UniSRec / VQ-Rec."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from recsys.columns import Columns, SplitParts
from recsys.data import validation as v
from recsys.data.dataset import Dataset
from recsys.data.raw import (
    DUPLICATE_POLICIES,
    check_policy,
    handle_duplicates,
    index_dataset,
    read_delimited,
    require_text,
)
from recsys.errors import InputError, require_number

log = logging.getLogger(__name__)

HISTORY = "item_id_list"
INDEX = "index"
# File suffix -> the part of the split its targets belong to, in time order.
PARTS = (("train", SplitParts.Train), ("valid", SplitParts.Val), ("test", SplitParts.Test))


class RecBoleDataSource:
    """A sequential data set in RecBole atomic files, with the data set's own train/val/test split.

    Reads, from ``root``:

    * ``<dataset>.text``: ``item_id:token <TAB> text:token_seq`` (item id = e.g. the Amazon ASIN);
    * ``<dataset>.item2index`` / ``<dataset>.user2index``: ``id <TAB> index``, no header;
    * ``<dataset>.{train,valid,test}.inter``: ``user_id:token <TAB> item_id_list:token_seq <TAB>
      item_id:token``, where the user and items are *indices* from the two index files, and each row
      is a history prefix (oldest first, space-separated) and the item that came next.

    **Index offset.** Indices are used exactly as the ``*2index`` files give them. In
    ``amazon-scientific`` they start at 0 and index 0 is a real item (``B00TNNWMXI``, the first
    item of user 0), not padding: RecBole adds its padding id only when it loads the files, so
    these files hold none. An index in an ``.inter`` file that is missing from the index file is an
    error, never shifted.

    **Order and split.** There are no timestamps, only order: each user's sequence is rebuilt
    from the rows (the earliest row's history, then every row's target: train rows by growing
    prefix, then the valid row, then the test row) and ``timestamp`` is the 0-based position in
    it. ``split`` is the file each event's row came from (events seen only as history count as
    train), so ``split=fixed`` reproduces the published protocol: per user the last item is
    test, the one before it validation. Histories are truncated to the model's maximum length
    (50 in VQ-Rec's files); every row's history is checked against the rebuilt sequence, so a
    row that contradicts the others is reported rather than silently mis-ordered. Repeated
    items (re-purchases) are kept as separate events.

    **Validation.** Rows repeating an earlier row of the same file are dropped and counted
    (``duplicates="drop"``) or rejected (``"error"``); an id listed twice with different indices,
    an index not in the index files, an item without text and a non-integer index are errors
    naming the file, column and row. Text rows for items outside ``item2index`` are dropped
    (they are not part of the published catalogue) and counted.

    Parameters
    ----------
    root:
        Folder holding the files.
    dataset:
        The file stem, e.g. ``Scientific``.
    event:
        Event type given to every interaction (Amazon reviews stand for purchases).
    weight:
        Weight of every interaction.
    duplicates:
        ``drop`` (count and log) or ``error``.
    name:
        Shown in logs, reports and MLflow tags.
    """

    def __init__(
        self,
        root: str,
        dataset: str = "Scientific",
        event: str = "purchase",
        weight: float = 1.0,
        duplicates: str = "drop",
        name: str = "scientific",
    ) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.event = event
        require_number("data.weight", weight, 0, low_open=True)
        self.weight = float(weight)
        self.duplicates = check_policy("duplicates", duplicates, DUPLICATE_POLICIES)
        self.name = name
        # Rows touched by a repair policy, by what was done; filled by load().
        self.report: dict[str, int] = {}

    def _path(self, suffix: str) -> Path:
        return self.root / f"{self.dataset}.{suffix}"

    def _read_index(self, suffix: str, id_col: str) -> pl.DataFrame:
        path = self._path(suffix)
        df = read_delimited(path, [id_col, INDEX])
        df = handle_duplicates(df, [id_col, INDEX], self.duplicates, str(path), self.report)
        v.require_non_null(df, id_col, str(path))
        df = v.cast_column(df, INDEX, pl.Int64(), str(path))
        v.require_unique(df, id_col, str(path))
        v.require_unique(df, INDEX, str(path))
        return df.drop(v.ROW)

    def load_items(self, item_index: pl.DataFrame) -> pl.DataFrame:
        path = self._path("text")
        df = read_delimited(path, [Columns.Item, Columns.Text], header=True)
        df = df.select(v.ROW, Columns.Item, Columns.Text)
        df = handle_duplicates(df, [Columns.Item, Columns.Text], self.duplicates, str(path), self.report)
        v.require_non_null(df, Columns.Item, str(path))
        v.require_unique(df, Columns.Item, str(path))
        df = df.with_columns(pl.col(Columns.Text).str.strip_chars())
        require_text(df, str(path), Columns.Text)
        index_path = str(self._path("item2index"))
        v.require_known(item_index, Columns.Item, df[Columns.Item], index_path, str(path))
        extra = ~pl.col(Columns.Item).is_in(item_index[Columns.Item].implode())
        n_extra = df.select(extra.sum()).item()
        if n_extra:
            log.info("%s: dropped %d item(s) that are not in %s", path, n_extra, index_path)
            self.report["items_without_index_dropped"] = n_extra
        return df.filter(~extra).drop(v.ROW)

    def _read_inter(self, suffix: str, part: str, rank: int, users: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
        path = self._path(f"{suffix}.inter")
        file = str(path)
        df = read_delimited(path, [Columns.User, HISTORY, Columns.Item], header=True)
        df = df.select(v.ROW, Columns.User, HISTORY, Columns.Item)
        df = handle_duplicates(df, [Columns.User, HISTORY, Columns.Item], self.duplicates, file, self.report)
        for col in (Columns.User, Columns.Item):
            v.require_non_null(df, col, file)
            df = v.cast_column(df, col, pl.Int64(), file)
        v.require_known(df, Columns.User, users[INDEX], file, str(self._path("user2index")))
        v.require_known(df, Columns.Item, items[INDEX], file, str(self._path("item2index")))
        tokens = pl.col(HISTORY).str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
        df = df.with_columns(tokens.list.eval(pl.element().cast(pl.Int64, strict=False)).alias("_hist"))
        unknown = pl.col("_hist").list.eval(~pl.element().is_in(items[INDEX].implode()) | pl.element().is_null())
        bad = df.select(unknown.list.any()).to_series()
        if bad.any():
            row, ex = v.example(df.drop("_hist"), bad)
            raise InputError(
                f"{int(bad.sum())} row(s) list an item that is not an integer index in {self._path('item2index')}",
                file=file,
                column=HISTORY,
                row=row,
                example=ex,
            )
        return df.select(
            v.ROW,
            pl.lit(file).alias("_file"),
            pl.lit(part).alias(Columns.Split),
            pl.lit(rank).alias("_rank"),
            pl.col(Columns.User).alias("_u"),
            pl.col("_hist"),
            pl.col("_hist").list.len().alias("_len"),
            pl.col(Columns.Item).alias("_target"),
            pl.col(HISTORY),
        )

    def _sequences(self, rows: pl.DataFrame) -> pl.DataFrame:
        """Per user, the item sequence (``_u, _pos, _i, split, _row``) rebuilt from the prefix rows."""
        # RecBole writes a user's train rows longest prefix first; ordering by prefix length does
        # not depend on that, and among truncated (equally long) prefixes the later file row is
        # the earlier event. The history check below catches any other layout.
        rows = rows.sort(["_u", "_rank", "_len", v.ROW], descending=[False, False, False, True]).with_columns(
            pl.int_range(pl.len()).over("_u").alias("_k"),
            pl.col("_len").first().over("_u").alias("_l0"),
        )
        rows = rows.with_columns((pl.col("_l0") + pl.col("_k")).alias("_pos"))
        targets = rows.select("_u", "_pos", pl.col("_target").alias("_i"), Columns.Split, "_file", v.ROW)
        first = rows.filter(pl.col("_k") == 0)
        # Positions are attached before exploding, so they do not depend on row order afterwards.
        prefix = (
            first.select("_u", "_file", v.ROW, pl.col("_hist").alias("_i"), pl.int_ranges(0, "_len").alias("_pos"))
            .explode("_i", "_pos")
            .filter(pl.col("_i").is_not_null())
            .with_columns(pl.lit(SplitParts.Train).alias(Columns.Split))
        )
        seq = pl.concat([prefix.select(targets.columns), targets]).sort("_u", "_pos")

        # Every row's history must be the sequence just before its target (possibly truncated).
        shown = (
            rows.filter(pl.col("_len") > 0)
            .select(
                "_u",
                "_file",
                v.ROW,
                HISTORY,
                pl.col("_hist").alias("_h"),
                pl.int_ranges(pl.col("_pos") - pl.col("_len"), "_pos").alias("_at"),
            )
            .explode("_h", "_at")
        )
        check = shown.join(
            seq.select("_u", pl.col("_pos").alias("_at"), pl.col("_i").alias("_expected")),
            on=["_u", "_at"],
            how="left",
        )
        wrong = pl.col("_expected").is_null() | (pl.col("_expected") != pl.col("_h"))
        if check.select(wrong.any()).item():
            bad = check.filter(wrong).sort("_file", v.ROW).head(1)
            r = bad.row(0, named=True)
            raise InputError(
                "this row's history does not match the same user's other rows (each row must be a prefix, "
                "oldest first, of one sequence per user); the file may be corrupt or not in RecBole's format",
                file=r["_file"],
                column=HISTORY,
                row=r[v.ROW],
                example={Columns.User: r["_u"], HISTORY: r[HISTORY]},
            )
        return seq

    def load(self) -> Dataset:
        self.report = {}
        item_index = self._read_index("item2index", Columns.Item)
        user_index = self._read_index("user2index", Columns.User)
        items = self.load_items(item_index)
        rows = pl.concat(
            [self._read_inter(sfx, part, rank, user_index, item_index) for rank, (sfx, part) in enumerate(PARTS)]
        )
        seq = self._sequences(rows)
        inter = (
            seq.join(user_index.rename({INDEX: "_u"}), on="_u")
            .join(item_index.rename({INDEX: "_i"}), on="_i")
            .select(
                Columns.User,
                Columns.Item,
                pl.col("_pos").cast(pl.Int64).alias(Columns.Timestamp),
                pl.lit(self.event).alias(Columns.Event),
                pl.lit(self.weight, dtype=pl.Float32).alias(Columns.Weight),
                Columns.Split,
                # Positions are unique per user, so this tie-breaker is never needed; index_dataset wants it.
                pl.col("_pos").alias(v.ROW),
            )
        )
        n_idle = user_index.height - inter[Columns.User].n_unique()
        if n_idle:
            log.info("%s: %d user(s) have no interaction rows", self._path("user2index"), n_idle)
        data = index_dataset(inter, items, self.name)
        log.info(
            "%s: %d users, %d items, %d events (%s)",
            self.name,
            data.n_users,
            data.n_items,
            data.interactions.height,
            dict(data.interactions[Columns.Split].value_counts().sort(Columns.Split).iter_rows()),
        )
        return data
