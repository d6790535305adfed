"""Property-based tests of the readers of user-supplied tables (``recsys.data.tables``,
``FileDataSource``): whatever the bytes or the table, reading ends in a frame, in an
``InputError`` naming the file, or in a documented repair that is counted in ``report``; never
in another exception (which the CLI would print as a traceback with exit code 1).

Kept to a few seconds: a few dozen examples per property, no example database on disk.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.columns import Columns
from recsys.data import FileDataSource
from recsys.data.tables import read_histories, read_table, read_user_list
from recsys.data.validation import parse_timestamp
from recsys.errors import InputError

SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
WEIGHTS = {"click": 1.0, "purchase": 4.0}

# Field values drawn from what breaks CSV readers and our checks: separators, quotes, line
# breaks, blanks, numbers, dates in several forms, event names, non-ASCII text.
FIELD = st.one_of(
    st.sampled_from(
        ["u1", "u2", "A", "B", "click", "purchase", "wishlist", "", " ", "1", "2", "-5", "2.5", "1e9",
         "1700000000", "1700000000000", "2024-01-01", "2024-01-01T10:00:00Z", "2024-02-30", "04/12/2026",
         '"', '""', '12" lamp', '"quoted, field"', ",", "\t", "\n", "\r\n", "NaN", "null", "café", "\ufeff"]
    ),
    st.text(alphabet='ab1-:," \n\t\\', max_size=6),
)  # fmt: skip
HEADERS = st.lists(
    st.sampled_from(["user_id", "item_id", "timestamp", "event", "title", "description", "weight", "x", ""]),
    min_size=1,
    max_size=6,
)


@st.composite
def delimited(draw, separator: str = ",") -> str:
    """A CSV/TSV text: a header, then rows with about (not always) as many fields as it."""
    header = draw(HEADERS)
    rows = draw(st.lists(st.lists(FIELD, min_size=0, max_size=len(header) + 1), max_size=6))
    lines = [separator.join(header), *(separator.join(r) for r in rows)]
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))


def expect_clean(read, file: Path):
    """``read()`` returns, or raises an InputError naming ``file``; nothing else."""
    try:
        return read()
    except InputError as e:
        assert str(file) in str(e) and e.file == str(file), str(e)
        return None


@SETTINGS
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".tsv", ".parquet", ".txt"]))
def test_any_bytes_read_as_a_table_or_a_named_error(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"t{suffix}"
        path.write_bytes(data)
        df = expect_clean(lambda: read_table(str(path)), path)
        if df is not None:
            assert df.height >= 1 and df["_row"].to_list() == list(range(1, df.height + 1))
        expect_clean(lambda: read_user_list(str(path)), path)
        expect_clean(lambda: read_histories(str(path), WEIGHTS, now=1_800_000_000), path)


@SETTINGS
@given(text=delimited(","), items_text=delimited(","), duplicates=st.sampled_from(["drop", "error", "keep"]))
def test_malformed_csv_tables_train_or_fail_naming_the_file(text, items_text, duplicates):
    with tempfile.TemporaryDirectory() as tmp:
        events, items = Path(tmp) / "events.csv", Path(tmp) / "items.csv"
        events.write_text(text)
        items.write_text(items_text)
        src = FileDataSource(str(events), str(items), duplicates=duplicates, missing_text="keep", now=1_800_000_000)
        try:
            data = src.load()
        except InputError as e:
            assert e.file in (str(events), str(items)) and e.file in str(e), str(e)
            return
        # Loaded: every repair it made is counted, and what is left is consistent.
        assert set(src.report) <= {
            "duplicates_dropped:events.csv",
            "duplicates_dropped:items.csv",
            "items_without_text_kept",
            "users_with_all_events_at_one_time",
        }
        assert data.interactions[Columns.User].null_count() == 0
        assert data.interactions[Columns.Timestamp].dtype == pl.Int64


@SETTINGS
@given(text=delimited("\t"))
def test_malformed_tsv_histories_read_or_fail_naming_the_file(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.tsv"
        path.write_text(text)
        df = expect_clean(lambda: read_histories(str(path), WEIGHTS, now=1_800_000_000), path)
        if df is not None:
            assert df[Columns.User].null_count() == 0 and (df[Columns.User].str.strip_chars() != "").all()


@SETTINGS
@given(values=st.lists(st.one_of(FIELD, st.text(max_size=25)), min_size=1, max_size=8))
def test_any_timestamp_text_is_seconds_or_a_named_error(values):
    df = pl.DataFrame({"ts": values}, schema={"ts": pl.String}).with_row_index("_row", offset=1)
    try:
        out = parse_timestamp(df, "ts", "f.csv")
    except InputError as e:
        assert e.file == "f.csv" and e.column == "ts" and e.row is not None
        return
    assert out["ts"].dtype == pl.Int64


UTC_OFFSETS = st.integers(-14 * 60, 14 * 60).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))


@SETTINGS
@given(
    when=st.datetimes(dt.datetime(1971, 1, 1), dt.datetime(2099, 12, 31)),
    tz=st.one_of(st.none(), UTC_OFFSETS),
    form=st.sampled_from(["T", " ", "date", "minutes", "Z", "compact_offset"]),
)
def test_iso_8601_forms_give_python_s_unix_seconds(when, tz, form):
    """Round trip: a datetime written in any accepted ISO form reads back as its Unix time
    (a naive time is UTC)."""
    when = when.replace(microsecond=when.microsecond // 1000 * 1000)
    aware = when.replace(tzinfo=tz or dt.UTC)
    if form == "date":
        text, expected = when.date().isoformat(), dt.datetime.combine(when.date(), dt.time(), dt.UTC)
    elif form == "minutes":
        text, expected = when.strftime("%Y-%m-%dT%H:%M"), aware.replace(second=0, microsecond=0)
        if tz is not None:
            text += aware.strftime("%z")[:3] + ":" + aware.strftime("%z")[3:]
    elif form == "Z":
        text, expected = when.isoformat() + "Z", when.replace(tzinfo=dt.UTC)
    elif form == "compact_offset":
        text, expected = when.isoformat() + aware.strftime("%z"), aware
    else:
        text, expected = aware.isoformat(sep=form) if tz is not None else when.isoformat(sep=form), aware
    if tz is not None and tz.utcoffset(None).seconds % 60:
        pytest.skip("offsets in whole minutes only")
    df = pl.DataFrame({"ts": [text]}).with_row_index("_row", offset=1)
    assert parse_timestamp(df, "ts", "f.csv")["ts"].to_list() == [int(expected.timestamp() // 1)], text


@SETTINGS
@given(text=delimited(","))
def test_a_csv_read_holds_what_the_csv_module_reads(text):
    """No silent misread: when the reader accepts a CSV, its rows are the ones Python's csv
    module (RFC 4180 quoting) finds (an empty field: null or ""), rows without any value skipped."""
    import csv
    import io

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.csv"
        path.write_text(text)
        df = expect_clean(lambda: read_table(str(path)), path)
        if df is None:
            return
        records = list(csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline="")))
        while records and not records[0]:
            records.pop(0)  # blank lines before the header
        # Blank lines and lines of separators only carry nothing: skipped.
        expected = [tuple(None if f == "" else f for f in r) for r in records[1:] if any(r)]
        got = [tuple(None if f == "" else f for f in r) for r in df.drop("_row").rows()]  # "" as quoted
        assert [r for r in got if any(r)] == expected


COLUMN_VALUES = {
    "str": st.lists(st.one_of(st.none(), FIELD), min_size=3, max_size=3),
    "int": st.lists(st.one_of(st.none(), st.integers(-(2**40), 2**40)), min_size=3, max_size=3),
    "float": st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)), min_size=3, max_size=3),
    "bool": st.lists(st.one_of(st.none(), st.booleans()), min_size=3, max_size=3),
    "list": st.lists(st.one_of(st.none(), st.lists(FIELD, max_size=2)), min_size=3, max_size=3),
    "datetime": st.lists(
        st.one_of(st.none(), st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(2200, 1, 1))), min_size=3, max_size=3
    ),
}


@st.composite
def parquet_table(draw, columns: tuple[str, ...]) -> pl.DataFrame:
    """Three rows; each named column (a few may be missing) of a random type with nulls."""
    present = [c for c in columns if draw(st.integers(0, 9))]  # about one in ten missing
    return pl.DataFrame({c: draw(COLUMN_VALUES[draw(st.sampled_from(sorted(COLUMN_VALUES)))]) for c in present})


@SETTINGS
@given(
    events=parquet_table(("user_id", "item_id", "timestamp", "event")),
    items=parquet_table(("item_id", "title", "description")),
)
def test_parquet_tables_of_any_column_types_train_or_fail_naming_the_file(events, items):
    with tempfile.TemporaryDirectory() as tmp:
        e, i = Path(tmp) / "events.parquet", Path(tmp) / "items.parquet"
        events.write_parquet(e)
        items.write_parquet(i)
        src = FileDataSource(str(e), str(i), missing_text="keep", now=1_800_000_000)
        try:
            data = src.load()
        except InputError as err:
            assert err.file in (str(e), str(i)) and err.file in str(err), str(err)
            return
        assert data.interactions[Columns.Timestamp].dtype == pl.Int64
        for frame, col in ((data.interactions, Columns.User), (data.items, Columns.Item)):
            assert frame[col].dtype == pl.String and frame[col].null_count() == 0
