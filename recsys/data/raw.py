"""Shared by the research-data loaders: reading delimited text files, duplicate policy, indexing.

Research data sets come as headerless or oddly-headed text files with their own encodings and
quoting habits (MIND titles contain unbalanced ``"``), so they are read line by line here rather
than with a CSV parser: every field is text, a line with the wrong number of fields or a byte
that is not valid in the declared encoding is reported with its file and line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from recsys.columns import Columns
from recsys.data import validation as v
from recsys.data.dataset import Dataset, IdMap
from recsys.errors import ConfigError, InputError

log = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("drop", "error")


def check_policy(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(f"data.{name} must be one of {list(allowed)}, got '{value}'")
    return value


def decode(path: Path, encoding: str = "utf-8", header: bool = False) -> str:
    """The file's text; a byte sequence invalid in ``encoding`` is reported with its line number.

    ``row`` in the error is the data row (the header line not counted), as everywhere else.
    """
    if not path.is_file():
        raise InputError("file not found (check data.root in the config)", file=str(path))
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start : e.end]
        raise InputError(
            f"line {line}: bytes {bad!r} are not valid {encoding} ({e.reason}); re-save the file as {encoding}",
            file=str(path),
            row=line - 1 if header else line,
        ) from e


def read_delimited(
    path: Path,
    columns: Sequence[str] | None,
    *,
    separator: str = "\t",
    header: bool = False,
    encoding: str = "utf-8",
) -> pl.DataFrame:
    """Read a delimited text file into string columns plus ``_row`` (1-based data row).

    Parameters
    ----------
    path:
        The file.
    columns:
        Names of the fields, in order, for a headerless file. With ``header=True`` the names come
        from the first line (a RecBole type suffix such as ``:token`` is stripped) and ``columns``
        lists the ones that must be present.
    separator:
        Field separator; no quoting is recognised, so a field may contain any other character.
    header:
        Whether the first line holds the column names (it is then not counted as a data row).
    encoding:
        The file's encoding.
    """
    text = decode(path, encoding, header)
    # str.splitlines would also split at \\x1c, \\u2028 ... which occur inside news titles.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    names: list[str]
    if header:
        if not lines:
            raise InputError("the file is empty (no header line)", file=str(path))
        names = [name.split(":", 1)[0] for name in lines[0].split(separator)]
        lines = lines[1:]
    else:
        if columns is None:
            raise ValueError("a headerless file needs its column names")
        names = list(columns)
    df = pl.DataFrame({"_line": lines}, schema={"_line": pl.String}).with_row_index(v.ROW, offset=1)
    # Blank lines carry nothing (u.genre ends with one); dropping them keeps the line numbers.
    df = df.filter(pl.col("_line").str.strip_chars() != "")
    if df.height == 0:
        raise InputError("the file has no data rows", file=str(path))
    n_fields = pl.col("_line").str.count_matches(separator, literal=True) + 1
    shown = df.select(v.ROW, pl.col("_line").alias("line"), n_fields.alias("fields"))
    wrong = shown["fields"] != len(names)
    if wrong.any():
        row, ex = v.example(shown, wrong)
        raise InputError(
            f"{int(wrong.sum())} row(s) do not have {len(names)} {separator!r}-separated fields "
            f"({names}); a stray separator inside a text field does this",
            file=str(path),
            row=row,
            example=ex,
        )
    df = df.select(v.ROW, pl.col("_line").str.split(separator).list.to_struct(fields=names).alias("_f")).unnest("_f")
    if header and columns is not None:
        v.require_columns(df, columns, str(path))
    return df


def handle_duplicates(
    df: pl.DataFrame, key: Sequence[str], policy: str, file: str, report: dict[str, int]
) -> pl.DataFrame:
    """Rows whose ``key`` columns repeat an earlier row: dropped (counted in ``report``) or an error."""
    dup = ~pl.struct(list(key)).is_first_distinct()
    n = df.select(dup.sum()).item()
    if n == 0:
        return df
    if policy == "error":
        row, ex = v.example(df, dup)
        raise InputError(
            f"{n} row(s) repeat an earlier row (same {list(key)}); set data.duplicates=drop to drop them",
            file=file,
            column=key[0],
            row=row,
            example=ex,
        )
    log.info("%s: dropped %d duplicate row(s) (same %s as an earlier row)", file, n, list(key))
    report[f"duplicates_dropped:{Path(file).name}"] = n
    return df.filter(~dup)


def require_text(df: pl.DataFrame, file: str, column: str) -> None:
    """Every item must have some text: the text tower is the only way to reach a cold item."""
    empty = pl.col(Columns.Text).is_null() | (pl.col(Columns.Text).str.strip_chars() == "")
    if df.select(empty.any()).item():
        row, ex = v.example(df, empty)
        raise InputError(
            f"{df.select(empty.sum()).item()} item(s) have empty text", file=file, column=column, row=row, example=ex
        )


def index_dataset(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    name: str,
    impressions: pl.DataFrame | None = None,
) -> Dataset:
    """Attach dense indices and sort, as ``FileDataSource`` does.

    ``interactions`` and ``impressions`` carry ``_row`` (load order) so that rows at the same time
    keep it; users are those with an interaction or an impression, so every impression row has a
    ``user_idx``.
    """
    user_values = interactions[Columns.User]
    if impressions is not None:
        user_values = pl.concat([user_values, impressions[Columns.User]])
    users = IdMap.from_values(user_values)
    item_ids = IdMap.from_values(items[Columns.Item])
    user_frame = users.to_frame(Columns.User, Columns.UserIdx)
    item_frame = item_ids.to_frame(Columns.Item, Columns.ItemIdx)
    inter = (
        interactions.join(user_frame, on=Columns.User)
        .join(item_frame, on=Columns.Item)
        # Joins do not keep row order (polars 2 streaming): sort by time, ties in load order.
        .sort(Columns.UserIdx, Columns.Timestamp, v.ROW)
        .drop(v.ROW)
    )
    items = items.join(item_frame, on=Columns.Item).sort(Columns.ItemIdx)
    n_cold = items.height - inter[Columns.ItemIdx].n_unique()
    if n_cold:
        log.info("%s: %d item(s) have no interaction; kept as cold items (reachable through text)", name, n_cold)
    if impressions is not None:
        impressions = (
            impressions.join(user_frame, on=Columns.User)
            .join(item_frame, on=Columns.Item)
            .sort(Columns.Timestamp, v.ROW, Columns.Position)
            .drop(v.ROW)
        )
    return Dataset(
        interactions=inter,
        items=items.drop(v.ROW, strict=False),
        users=users,
        item_ids=item_ids,
        name=name,
        impressions=impressions,
    )
