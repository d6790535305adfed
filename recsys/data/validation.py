"""Checks that stop a run before training, with the file, the column and an example row."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import polars as pl

from recsys.errors import InputError

ROW = "_row"  # 1-based data row number in the source file (header not counted)


def read_table(path: str) -> pl.DataFrame:
    """Read a CSV, TSV or parquet file into a frame with a ``_row`` column; never a traceback."""
    p = Path(path)
    if not p.exists():
        raise InputError("file not found (check the data path in the config)", file=path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pl.read_parquet(p)
        elif suffix in (".csv", ".tsv", ".txt"):
            df = pl.read_csv(
                p,
                separator="\t" if suffix == ".tsv" else ",",
                infer_schema=False,  # everything as text; we cast ourselves and report failures
                encoding="utf8",
            )
        else:
            raise InputError(f"unsupported file type '{suffix}' (use .csv, .tsv or .parquet)", file=path)
    except InputError:
        raise
    except Exception as e:  # polars raises several types for unreadable files
        if suffix != ".parquet":
            require_utf8(p, "\t" if suffix == ".tsv" else ",")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot be read: {first}", file=path) from e
    if df.height == 0:
        raise InputError("the table is empty (no data rows)", file=path)
    return df.with_row_index(ROW, offset=1)


def require_utf8(path: Path, separator: str) -> None:
    """Name the line, column and bytes of the first sequence that is not UTF-8 (polars says only
    "invalid utf-8")."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        start = data.rfind(b"\n", 0, e.start) + 1
        header = data[: data.find(b"\n")].decode("utf-8", "replace").split(separator)
        field = data[start : e.start].count(separator.encode())
        raise InputError(
            f"line {line}: bytes {data[e.start : e.end]!r} are not valid UTF-8; re-save the file as UTF-8",
            file=str(path),
            column=header[field].strip() if line > 1 and field < len(header) else None,
            row=line - 1,  # the header line is not a data row
            example={"line": data[start : data.find(b"\n", e.start)].decode("utf-8", "replace")},
        ) from e


def require_id_dtype(df: pl.DataFrame, column: str, file: str) -> None:
    """Ids must be text or integers: a float column (often an integer column with a missing value,
    written by pandas) would turn ``12`` into ``"12.0"`` and a missing id into ``"NaN"``."""
    dtype = df[column].dtype
    if dtype == pl.String or dtype.is_integer():
        return
    mask = (pl.col(column).is_nan() | pl.col(column).is_null()) if dtype.is_float() else pl.lit(True)
    if not df.select(mask.any()).item():
        mask = pl.lit(True)
    row, ex = example(df, mask)
    raise InputError(
        f"ids must be text or integers, not {dtype} (a float id column usually means missing ids)",
        file=file,
        column=column,
        row=row,
        example=ex,
    )


def example(df: pl.DataFrame, mask: pl.Series | pl.Expr) -> tuple[int, dict]:
    """Row number and content of the first row where ``mask`` holds."""
    bad = df.filter(mask).head(1)
    row = bad.row(0, named=True)
    n = row.pop(ROW, None)
    return n, row


def require_columns(df: pl.DataFrame, columns: Iterable[str], file: str) -> None:
    for col in columns:
        if col not in df.columns:
            present = [c for c in df.columns if c != ROW]
            raise InputError(f"required column is missing; columns present: {present}", file=file, column=col)


def require_non_null(df: pl.DataFrame, column: str, file: str) -> None:
    expr = pl.col(column).is_null()
    if df[column].dtype == pl.String:
        expr = expr | (pl.col(column).str.strip_chars() == "")
    n_bad = df.select(expr.sum()).item()
    if n_bad:
        row, ex = example(df, expr)
        raise InputError(f"{n_bad} row(s) have an empty value", file=file, column=column, row=row, example=ex)


def cast_column(df: pl.DataFrame, column: str, dtype: pl.DataType, file: str) -> pl.DataFrame:
    """Cast ``column`` to ``dtype``; an unparsable value is reported with its row."""
    if df[column].dtype == dtype:
        return df
    casted = df[column].cast(dtype, strict=False)
    bad = casted.is_null() & df[column].is_not_null()
    if bad.any():
        row, ex = example(df, bad)
        raise InputError(
            f"{int(bad.sum())} value(s) cannot be read as {dtype}", file=file, column=column, row=row, example=ex
        )
    return df.with_columns(casted.alias(column))


def require_in(df: pl.DataFrame, column: str, allowed: Iterable[str], file: str) -> None:
    allowed = list(allowed)
    mask = ~pl.col(column).is_in(allowed)
    n_bad = df.select(mask.sum()).item()
    if n_bad:
        row, ex = example(df, mask)
        raise InputError(
            f"{n_bad} row(s) have a value outside {allowed} (set data.event_weights to add event types)",
            file=file,
            column=column,
            row=row,
            example=ex,
        )


def require_unique(df: pl.DataFrame, column: str, file: str) -> None:
    dup = pl.col(column).is_duplicated()
    n_bad = df.select(dup.sum()).item()
    if n_bad:
        row, ex = example(df, dup)
        raise InputError(f"{n_bad} row(s) share an id with another row", file=file, column=column, row=row, example=ex)


def require_known(df: pl.DataFrame, column: str, known: pl.Series, file: str, known_file: str) -> None:
    mask = ~pl.col(column).is_in(known.implode())
    n_bad = df.select(mask.sum()).item()
    if n_bad:
        row, ex = example(df, mask)
        raise InputError(
            f"{n_bad} row(s) refer to an id that has no row in {known_file}",
            file=file,
            column=column,
            row=row,
            example=ex,
        )


def parse_timestamp(df: pl.DataFrame, column: str, file: str) -> pl.DataFrame:
    """Timestamps as integer Unix seconds: integers are kept, datetimes/dates (parquet) and ISO
    8601 strings (CSV) are converted; anything else is reported with its row."""
    dtype = df[column].dtype
    if dtype == pl.Int64:
        return df
    if dtype.is_integer():
        return df.with_columns(pl.col(column).cast(pl.Int64))
    if isinstance(dtype, pl.Datetime | pl.Date):
        return df.with_columns(pl.col(column).cast(pl.Datetime("us")).dt.epoch("s").alias(column))
    text = df[column].cast(pl.String).str.strip_chars()
    as_int = text.cast(pl.Int64, strict=False)
    parsed = as_int
    if as_int.null_count() > text.null_count():
        try:  # polars infers the date format from the values; none at all fits -> all are bad
            as_date = text.str.to_datetime(strict=False, time_unit="us").dt.epoch("s")
            parsed = as_int.fill_null(as_date)
        except pl.exceptions.ComputeError:
            pass
    bad = parsed.is_null() & df[column].is_not_null()
    if bad.any():
        row, ex = example(df, bad)
        raise InputError(
            f"{int(bad.sum())} value(s) are neither integer Unix times nor ISO 8601 dates",
            file=file,
            column=column,
            row=row,
            example=ex,
        )
    return df.with_columns(parsed.alias(column))
