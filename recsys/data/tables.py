"""The one way a user-supplied table is read: interactions and items (``data=files``), the user
list and the histories of ``python -m recsys.recommend``.

Every reader here ends in a frame with a ``_row`` column (1-based data row, header not counted)
or in an ``InputError`` naming the file, and where it applies the line, the column and the
row's content; never in a traceback. CSV/TSV columns are all read as text (the checks cast
them and report what does not cast); parquet columns keep their types.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from recsys.columns import Columns
from recsys.data import validation as v
from recsys.errors import InputError

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet")


@dataclass(frozen=True)
class ColumnMap:
    """Our column name -> the name a file gives it (``data.column_map``, e.g. ``{user_id:
    customer}``). Files are checked under their own names, so every error names a column as the
    file does, with the mapping spelled out (``noted``); renamed to ours after the checks.
    ``setting``: where the mapping comes from, as the messages name it."""

    mapping: Mapping[str, str] = field(default_factory=dict)
    setting: str = "data.column_map"

    def in_file(self, column: str) -> str:
        """Our ``column`` as the file names it."""
        return self.mapping.get(column, column)

    def renamed(self) -> dict[str, str]:
        """The file's name -> ours, for the columns the mapping renames."""
        return {src: ours for ours, src in self.mapping.items() if src != ours}

    def rename(self, df: pl.DataFrame) -> pl.DataFrame:
        return df.rename({src: ours for src, ours in self.renamed().items() if src in df.columns})

    def check_clash(self, df: pl.DataFrame, path: str) -> None:
        """A file holding both a column the mapping renames and one with our name: the rename
        after the checks would clash, and which one is meant is the user's call."""
        for src, ours in self.renamed().items():
            if src in df.columns and ours in df.columns and ours not in self.renamed():
                raise InputError(
                    f"the file has a column '{ours}' too, and {self.setting} maps {ours} to '{src}': drop or "
                    "rename one of the two",
                    file=path,
                    column=src,
                )

    def noted(self, error: InputError) -> InputError:
        """``error`` with the column mapping spelled out when its column is one the mapping
        renames: the user knows the file's name, the message should also say what it stands for."""
        ours = self.renamed().get(error.column)
        if ours is None:
            return error
        message = f"{error.message} ({self.setting} maps {ours} to '{error.column}')"
        return type(error)(message, file=error.file, column=error.column, row=error.row, example=error.example)

    @contextmanager
    def file_terms(self) -> Iterator[None]:
        """Checks inside run on the file's own column names; a failing one gets the mapping noted."""
        try:
            yield
        except InputError as e:
            noted = self.noted(e)
            if noted is e:
                raise
            raise noted from e


def separator_of(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def read_table(path: str, allow_empty: bool = False) -> pl.DataFrame:
    """Read a CSV, TSV or parquet file into a frame with a ``_row`` column; never a traceback.
    A table without data rows is an error unless ``allow_empty``."""
    p = Path(path)
    if not p.exists():
        raise InputError("file not found (check the data path in the config)", file=path)
    if p.is_dir():
        raise InputError("is a folder, not a file: name the table file itself", file=path)
    suffix = p.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(f"unsupported file type '{suffix}' (use .csv, .tsv or .parquet)", file=path)
    try:
        if suffix == ".parquet":
            df = pl.read_parquet(p)
        else:
            df = pl.read_csv(
                p,
                separator=separator_of(p),
                infer_schema=False,  # everything as text; we cast ourselves and report failures
                encoding="utf8",
            )
    except Exception as e:  # polars raises several types for unreadable files
        if suffix != ".parquet":
            require_utf8(p, separator_of(p))
            locate_csv_problem(p, separator_of(p))
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot be read: {first}", file=path) from e
    if suffix != ".parquet":
        # polars fills a row with too few fields with nulls (an empty last field looks the same)
        # and takes an extra field on the last line without a newline: counted here, streaming.
        require_field_counts(p, separator_of(p), df.width)
    df = df.with_row_index(v.ROW, offset=1)
    if suffix != ".parquet":
        # A blank line (polars reads it as a row of nulls) or one of separators only carries
        # nothing: skipped, as the row numbers of the others stay those of the file.
        df = df.filter(~pl.all_horizontal(pl.exclude(v.ROW).is_null()))
    if df.height == 0 and not allow_empty:
        raise InputError("the table is empty (no data rows)", file=path)
    return df


def require_utf8(path: Path, separator: str, header: bool = True) -> None:
    """Name the line, column and bytes of the first sequence that is not UTF-8 (polars says only
    "invalid utf-8"). ``header``: the first line names the columns (else: no column is named,
    and every line is a data row)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        start = data.rfind(b"\n", 0, e.start) + 1
        names = data[: data.find(b"\n")].decode("utf-8", "replace").split(separator)
        field = data[start : e.start].count(separator.encode())
        raise InputError(
            f"line {line}: bytes {data[e.start : e.end]!r} are not valid UTF-8; re-save the file as UTF-8",
            file=str(path),
            column=names[field].strip() if header and line > 1 and field < len(names) else None,
            row=line - 1 if header else line,  # the header line is not a data row
            example={"line": data[start : data.find(b"\n", e.start)].decode("utf-8", "replace")},
        ) from e


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig")


def _line_of(text: str, line: int) -> str:
    return text.split("\n", line)[line - 1].removesuffix("\r") if line >= 1 else ""


def require_field_counts(path: Path, separator: str, n_fields: int) -> None:
    """Every record has ``n_fields`` fields (the header's count), quoting as polars reads it."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=separator, quotechar='"', strict=True)
        start = 1
        try:
            for record in reader:
                if record and len(record) != n_fields:
                    _ragged(path, _text(path), start, len(record), n_fields, separator)
                start = reader.line_num + 1
        except csv.Error:
            locate_csv_problem(path, separator)  # polars read it: a quoting corner polars accepts
        except UnicodeDecodeError:
            require_utf8(path, separator)  # polars let it pass in a header or a last line
            raise


def line_error(path: Path, text: str, line: int, message: str) -> InputError:
    """The error for a problem on ``line`` (1-based) of a text file, showing that line."""
    return InputError(message, file=str(path), row=line - 1, example={"line": _line_of(text, line)})


def _ragged(path: Path, text: str, line: int, found: int, wanted: int, separator: str) -> None:
    raise line_error(
        path,
        text,
        line,
        f"line {line}: {found} {separator!r}-separated field(s), the header has {wanted}; a stray separator in an "
        "unquoted text field does this (put the field in double quotes)",
    )


def locate_csv_problem(path: Path, separator: str) -> None:
    """Raise an ``InputError`` naming the first line that breaks the CSV rules polars reads by
    (RFC 4180): a record with another number of fields than the header, a quote inside an
    unquoted field (an inch mark: ``12" lamp``), text after a closing quote, or a quoted field
    never closed. Returns if it finds none. A character loop: run only when polars failed or a
    row may be short."""
    text = _text(path)
    n = len(text)
    line, start_line, fields, wanted = 1, 1, 1, None
    i = 0
    at_field_start = True
    while i < n:
        c = text[i]
        if at_field_start and c == '"':
            opened = line
            i += 1
            while True:
                j = text.find('"', i)
                if j < 0:
                    msg = f"line {opened}: a quoted field opened here is never closed (an unbalanced double quote)"
                    raise line_error(path, text, opened, msg)
                line += text.count("\n", i, j)
                if j + 1 < n and text[j + 1] == '"':
                    i = j + 2
                    continue
                i = j + 1
                break
            if i < n and text[i] not in (separator, "\n", "\r"):
                msg = f'line {line}: text after a closing double quote; double a quote inside a quoted field ("")'
                raise line_error(path, text, line, msg)
            at_field_start = False
            continue
        if c == '"':
            raise line_error(
                path,
                text,
                line,
                f'line {line}: a double quote inside an unquoted field (an inch mark such as 12" does this); put '
                'the field in double quotes and double the quote: "12"" lamp"',
            )
        if c == separator:
            fields += 1
            at_field_start = True
        elif c == "\n":
            blank = fields == 1 and _line_of(text, line).strip() == ""
            if wanted is None:
                wanted = fields
            elif fields != wanted and not blank:
                _ragged(path, text, start_line, fields, wanted, separator)
            line += 1
            start_line, fields, at_field_start = line, 1, True
        elif c != "\r":
            at_field_start = False
        i += 1
    if wanted is not None and fields != wanted and _line_of(text, start_line).strip():
        _ragged(path, text, start_line, fields, wanted, separator)


def require_scalar(df: pl.DataFrame, columns: list[str], file: str) -> None:
    """Columns read as ids, text or times hold one value per row, not a list or struct (parquet)."""
    for col in columns:
        dtype = df[col].dtype
        if dtype.is_nested():
            row, ex = v.example(df, pl.lit(True))
            raise InputError(
                f"holds {dtype} values, not text: join the values into one string per row before saving "
                "(e.g. pl.col(c).list.join(', '))",
                file=file,
                column=col,
                row=row,
                example=ex,
            )


def read_ids(path: str, column: str, allow_empty: bool = False) -> pl.DataFrame:
    """A table with an id ``column``: present, text or integers (read as text), never empty."""
    df = read_table(path, allow_empty)
    v.require_columns(df, [column], path)
    require_scalar(df, [column], path)
    v.require_id_dtype(df, column, path)
    df = df.with_columns(pl.col(column).cast(pl.String))
    v.require_non_null(df, column, path)
    return df


def read_user_list(path: str, column_map: ColumnMap | None = None) -> list[str]:
    """User ids from a table with a ``user_id`` column (``.csv``, ``.tsv``, ``.parquet``; named
    as ``column_map`` says) or a text file with one id per line (any other suffix), in file order."""
    p = Path(path)
    if p.is_dir():
        raise InputError("is a folder, not a file: name the user list itself", file=path)
    if not p.is_file():
        raise InputError("users file not found", file=path)
    if p.suffix.lower() in (".csv", ".tsv", ".parquet"):
        cmap = column_map or ColumnMap()
        user = cmap.in_file(Columns.User)
        empty_text = p.suffix.lower() != ".parquet" and not p.read_bytes().strip()
        with cmap.file_terms():
            users = [] if empty_text else read_ids(path, user, allow_empty=True)[user].to_list()
    else:
        require_utf8(p, "\n", header=False)
        users = [line.strip() for line in _text(p).splitlines() if line.strip()]
    if not users:
        # An empty list is almost always a broken upstream job; an empty export would hide it.
        raise InputError(
            "the user list is empty (no user ids): nothing to recommend for", file=path, column=Columns.User
        )
    return users


def read_histories(
    path: str, event_weights: Mapping[str, float], now: int | None = None, column_map: ColumnMap | None = None
) -> pl.DataFrame:
    """``user_id, item_id[, timestamp][, event | weight]`` rows for ``recsys.recommend histories=``,
    checked as the training interactions are: ids present and non-empty, timestamps integer Unix
    seconds or ISO 8601 and not in the future, events among the pipeline's ``event_weights``.
    ``column_map``: the file's names for our columns (the model's ``data.column_map``, as the
    training files had them); the checks name the file's columns, the result has ours."""
    cmap = column_map or ColumnMap()
    user, item, ts, event, weight = (
        cmap.in_file(c) for c in (Columns.User, Columns.Item, Columns.Timestamp, Columns.Event, Columns.Weight)
    )
    with cmap.file_terms():
        df = read_table(path)
        v.require_columns(df, [user, item], path)
        cmap.check_clash(df, path)
        present = [c for c in (user, item, ts, event) if c in df.columns]
        require_scalar(df, present, path)
        for col in (user, item):
            v.require_id_dtype(df, col, path)
            df = df.with_columns(pl.col(col).cast(pl.String))
            v.require_non_null(df, col, path)
        if ts in df.columns:
            v.require_non_null(df, ts, path)
            df = v.parse_timestamp(df, ts, path)
            # Always an error here: an export has no policy to keep or drop them.
            now = int(time.time()) if now is None else now
            v.check_future(df, ts, path, "error", now, {}, setting=None)
        if event in df.columns and weight not in df.columns:
            df = df.with_columns(pl.col(event).cast(pl.String))
            v.require_non_null(df, event, path)
            v.require_in(df, event, event_weights, path, "the event types the model was trained with")
        if weight in df.columns:
            df = v.cast_column(df, weight, pl.Float32, path)
    return cmap.rename(df.drop(v.ROW))
