"""Checks that stop a run before training, with the file, the column and an example row."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime

import polars as pl

from recsys.errors import InputError

log = logging.getLogger(__name__)

ROW = "_row"  # 1-based data row number in the source file (header not counted)
FUTURE_SLACK_S = 86_400  # clocks differ; a day ahead of this machine's clock is not "the future" yet


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
            hint = separator_hint(present, file)
            raise InputError(f"required column is missing; columns present: {present}{hint}", file=file, column=col)


def separator_hint(present: list[str], file: str) -> str:
    """What to do when the whole header was read as one column: the file's separator is not the
    one its suffix names (``.csv``: comma, ``.tsv``: tab)."""
    if len(present) != 1:
        return ""
    for sep, name in (("\t", "tab"), (",", "comma"), (";", "semicolon"), ("|", "'|'")):
        if sep in present[0]:
            fix = {"\t": "name it .tsv", ",": "name it .csv"}.get(sep, "save it comma-separated as .csv")
            return f" (the header reads as one column: the file is {name}-separated; {fix})"
    return ""


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


def require_in(
    df: pl.DataFrame,
    column: str,
    allowed: Iterable[str],
    file: str,
    hint: str | None = None,
) -> None:
    """An ``InputError`` unless every value of ``column`` is one of ``allowed``; ``hint`` (what to
    do) may name the first bad value as ``{value}``."""
    allowed = list(allowed)
    mask = ~pl.col(column).is_in(allowed)
    n_bad = df.select(mask.sum()).item()
    if n_bad:
        row, ex = example(df, mask)
        hint = "" if hint is None else f" ({hint.format(value=ex.get(column))})"
        raise InputError(
            f"{n_bad} row(s) have a value outside {allowed}{hint}",
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


def require_known(
    df: pl.DataFrame, column: str, known: pl.Series, file: str, known_file: str, also: str | None = None
) -> None:
    """Every ``column`` value of ``df`` is in ``known``: the ids of ``known_file`` and, where
    ``also`` names another source of ids (an update: the model's catalogue), of that too."""
    mask = ~pl.col(column).is_in(known.implode())
    n_bad = df.select(mask.sum()).item()
    if n_bad:
        row, ex = example(df, mask)
        where = (
            f"has no row in {known_file}"
            if also is None
            else f"is neither in {also} nor in {known_file} (add its row, with its text, to that file)"
        )
        raise InputError(
            f"{n_bad} row(s) refer to an id that {where}",
            file=file,
            column=column,
            row=row,
            example=ex,
        )


# ISO 8601 as the calendar date, optionally a time (minutes, seconds, a fraction) and an offset;
# a naive time is UTC. Nothing else: 04/12/2026 is 4 December or 12 April depending on who wrote it.
ISO_8601 = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}([.,]\d{1,9})?)?([Zz]|[+-]\d{2}(:?\d{2})?)?)?$"
ISO_EXAMPLES = "2026-04-12, 2026-04-12T13:36:50, 2026-04-12 13:36:50+02:00"


def _iso_to_seconds(text: pl.Expr) -> pl.Expr:
    """Unix seconds of an ISO 8601 string matching ``ISO_8601`` (null where it is no real date,
    such as 2026-02-30), by rewriting each form into the full one with an offset."""
    full = (
        text.str.replace(r"^(\d{4}-\d{2}-\d{2})$", "${1}T00:00:00")
        .str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T")
        .str.replace(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2})([Zz+-]|$)", "${1}:00${2}")
        .str.replace(",", ".", literal=True)
        .str.replace(r"[Zz]$", "+00:00")
        .str.replace(r"([+-]\d{2})(\d{2})$", "${1}:${2}")
        .str.replace(r"(T[\d:.]+[+-]\d{2})$", "${1}:00")
    )
    full = pl.when(full.str.contains(r"[+-]\d{2}:\d{2}$")).then(full).otherwise(full + "+00:00")
    return full.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", strict=False, time_unit="us").dt.epoch("s")


def parse_timestamp(df: pl.DataFrame, column: str, file: str) -> pl.DataFrame:
    """Timestamps as integer Unix seconds: integers are kept, datetimes/dates (parquet) and ISO
    8601 strings (CSV; dates and datetimes may be mixed) are converted; anything else is
    reported with its row. Formats are never guessed."""
    dtype = df[column].dtype
    if dtype == pl.Int64:
        return df
    if dtype.is_integer():
        return df.with_columns(pl.col(column).cast(pl.Int64))
    if isinstance(dtype, pl.Datetime | pl.Date):
        return df.with_columns(pl.col(column).cast(pl.Datetime("us")).dt.epoch("s").alias(column))
    if dtype.is_float():
        # pandas turns an integer column with a gap into floats: whole values are exact seconds.
        whole = pl.col(column).is_finite() & (pl.col(column) == pl.col(column).round()) & (pl.col(column).abs() < 2**53)
        bad = ~whole & pl.col(column).is_not_null()
        if df.select(bad.any()).item():
            row, ex = example(df, bad)
            n = df.select(bad.sum()).item()
            raise InputError(
                f"{n} value(s) are neither integer Unix seconds nor ISO 8601 ({ISO_EXAMPLES}): not a whole number",
                file=file,
                column=column,
                row=row,
                example=ex,
            )
        return df.with_columns(pl.col(column).cast(pl.Int64))
    if dtype != pl.String:
        row, ex = example(df, pl.col(column).is_not_null())
        raise InputError(
            f"holds {dtype} values; use integer Unix seconds or ISO 8601 ({ISO_EXAMPLES})",
            file=file,
            column=column,
            row=row,
            example=ex,
        )
    text = pl.col(column).cast(pl.String).str.strip_chars()
    is_int = text.str.contains(r"^[+-]?\d{1,18}$")
    is_iso = text.str.contains(ISO_8601)
    parsed = (
        pl.when(is_int).then(text.cast(pl.Int64, strict=False)).when(is_iso).then(_iso_to_seconds(text)).otherwise(None)
    )
    out = df.select(parsed.alias("seconds"), is_iso.alias("iso"))
    bad = out["seconds"].is_null() & df[column].is_not_null()
    if bad.any():
        row, ex = example(df, bad)
        invalid = bool(out["iso"].filter(bad)[0])
        reason = (
            "value(s) have the ISO 8601 form but are no real date or time"
            if invalid
            else f"value(s) are neither integer Unix seconds nor ISO 8601 ({ISO_EXAMPLES}); other forms are refused "
            "(04/12/2026: April or December?)"
        )
        raise InputError(f"{int(bad.sum())} {reason}", file=file, column=column, row=row, example=ex)
    return df.with_columns(out["seconds"].alias(column))


def check_future(
    df: pl.DataFrame,
    column: str,
    file: str,
    policy: str,
    now: int,
    report: dict[str, int],
    setting: str | None = "data.future_timestamps",
) -> pl.DataFrame:
    """Rows more than ``FUTURE_SLACK_S`` after ``now`` (Unix seconds): an error (``policy``
    ``error``), kept or dropped (both counted in ``report`` and logged). ``setting``: the option
    that chooses the policy, named in the error (``None`` where there is none to set)."""
    future = pl.col(column) > now + FUTURE_SLACK_S
    n = df.select(future.sum()).item()
    if n == 0:
        return df
    if policy == "error":
        row, ex = example(df, future)
        seconds = int(ex[column])
        # Milliseconds read as seconds land after the year 5000; a date a few years ahead is a date.
        hint = (
            "the value is in milliseconds (divide by 1000)"
            if seconds > 100_000_000_000
            else "check the source's clock or the year"
        )
        when = datetime.fromtimestamp(min(seconds, 253_402_300_799), UTC).isoformat()
        ex[column] = f"{seconds} (read as {when})"
        raise InputError(
            f"{n} row(s) are after the current time ({datetime.fromtimestamp(now, UTC).isoformat()}): {hint}"
            + (f"; or set {setting}=keep or drop" if setting else ""),
            file=file,
            column=column,
            row=row,
            example=ex,
        )
    verb = "dropped" if policy == "drop" else "kept"
    log.warning("%s: %s %d row(s) with a timestamp after the current time", file, verb, n)
    report[f"future_timestamps_{verb}"] = n
    return df.filter(~future) if policy == "drop" else df
