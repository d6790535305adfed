"""The one reading path for user-supplied tables (``recsys.data.tables``): interactions and items
(``data=files``), the export's user list and histories. Each case is one found by feeding the
train and export commands bad input (issue 24); each ends in an ``InputError`` naming the file
(and the line or row), or in a documented repair that is counted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import pytest

from recsys.columns import Columns
from recsys.data import FileDataSource
from recsys.data.tables import read_histories, read_table, read_user_list
from recsys.errors import ConfigError, InputError

ITEMS = "item_id,title,description\nA,a telescope,x\nB,a skillet,y\n"
WEIGHTS = {"click": 1.0, "purchase": 4.0}
NOW = 1_800_000_000  # 2027-01-15


def write(path: Path, content: str | bytes) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def events(tmp_path: Path, rows: str, name: str = "events.csv") -> tuple[str, str]:
    return (
        write(tmp_path / name, "user_id,item_id,timestamp,event\n" + rows),
        write(tmp_path / "items.csv", ITEMS),
    )


def fails(load, match: str, file: str, row: int | None = None, column: str | None = None) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        load()
    err, msg = info.value, str(info.value)
    assert err.file == file and file in msg, msg
    if row is not None:
        assert err.row == row and f"row {row}" in msg, msg
    if column is not None:
        assert err.column == column and f"column '{column}'" in msg, msg
    assert "'_row'" not in msg, msg  # our internal row column is never shown
    return err


# --- timestamps: integers and ISO 8601, nothing guessed -------------------------------------------


@pytest.mark.parametrize("policy", ["error", "keep", "drop"])
def test_us_dates_are_refused_not_read_day_first(tmp_path, policy):
    """Regression: ``04/12/2026 13:36:50`` (12 April, US) was parsed as 4 December; by default it
    then failed as "after the current time ... milliseconds", with future_timestamps=drop it ran."""
    e, i = events(tmp_path, "u1,A,1700000000,click\nu1,B,04/12/2026 13:36:50,click\n")
    src = FileDataSource(e, i, future_timestamps=policy, now=NOW)
    err = fails(src.load, "neither integer Unix seconds nor ISO 8601", e, row=2, column="timestamp")
    assert "04/12/2026 13:36:50" in str(err) and "milliseconds" not in str(err)


def test_iso_dates_and_datetimes_mixed_in_one_column(tmp_path):
    rows = [
        ("2024-01-01", 1_704_067_200),
        ("2024-01-01T00:00:01", 1_704_067_201),
        ("2024-01-01 00:00:02", 1_704_067_202),
        ("2024-01-01T00:00:03.250", 1_704_067_203),
        ("2024-01-01T00:04", 1_704_067_440),
        ("2024-01-01T01:00:05+01:00", 1_704_067_205),
        ("2024-01-01T00:00:06Z", 1_704_067_206),
        ("2024-01-01T02:00:07+0200", 1_704_067_207),
        ("1704067208", 1_704_067_208),
    ]
    e, i = events(tmp_path, "".join(f"u1,A,{t},click\n" for t, _ in rows))
    data = FileDataSource(e, i, duplicates="keep", now=NOW).load()
    assert data.interactions[Columns.Timestamp].to_list() == sorted(s for _, s in rows)


@pytest.mark.parametrize("value", ["2024-02-30", "2024-01-01T25:00:00"])
def test_an_iso_shaped_value_that_is_no_date_is_named(tmp_path, value):
    e, i = events(tmp_path, f"u1,A,1,click\nu1,B,{value},click\n")
    err = fails(FileDataSource(e, i, now=NOW).load, "no real date", e, row=2, column="timestamp")
    assert value in str(err)


@pytest.mark.parametrize(("value", "ms_hint"), [("2099-01-01", False), ("1900000000000", True)])
def test_a_future_timestamp_shows_the_value_read_and_suggests_ms_only_for_ms(tmp_path, value, ms_hint):
    """Regression: the message always suggested milliseconds and showed the converted number."""
    e, i = events(tmp_path, f"u1,A,1,click\nu1,B,{value},click\n")
    err = fails(FileDataSource(e, i, now=NOW).load, "after the current time", e, row=2, column="timestamp")
    assert ("milliseconds" in str(err)) == ms_hint, str(err)
    if not ms_hint:
        assert "2099-01-01T00:00:00+00:00" in str(err)


# --- files that are not tables, and CSV structure -------------------------------------------------


def test_a_directory_instead_of_a_file(tmp_path):
    (tmp_path / "events.csv").mkdir()
    i = write(tmp_path / "items.csv", ITEMS)
    fails(FileDataSource(str(tmp_path / "events.csv"), i).load, "is a folder", str(tmp_path / "events.csv"))


@pytest.mark.parametrize(
    ("rows", "line", "match"),
    [
        ("u1,A,1,click\nu1,B,2,click,extra\nu1,A,3,click\n", 3, "5 ','-separated field"),
        ("u1,A,1,click\nu1,B,2\nu1,A,3,click\n", 3, "3 ','-separated field"),
        ('u1,A,1,click\nu1,"B,2,click\nu1,A,3,click\n', 3, "never closed"),
        ('u1,A,1,click\nu1,B"x,2,click\n', 3, "inside an unquoted field"),
        ('u1,A,1,click\nu1,"B"x,2,click\n', 3, "after a closing double quote"),
    ],
    ids=["more_fields", "fewer_fields", "unbalanced_quote", "quote_in_field", "text_after_quote"],
)
def test_a_malformed_csv_line_is_named(tmp_path, rows, line, match):
    e, i = events(tmp_path, rows)
    err = fails(FileDataSource(e, i).load, match, e, row=line - 1)
    assert f"line {line}" in str(err)


def test_an_inch_mark_in_an_item_title_is_named(tmp_path):
    e = write(tmp_path / "events.csv", "user_id,item_id,timestamp,event\nu1,A,1,click\n")
    i = write(tmp_path / "items.csv", 'item_id,title,description\nA,a 12" lamp,x\n')
    err = fails(FileDataSource(e, i).load, "inch mark", i, row=1)
    assert 'A,a 12" lamp,x' in str(err)


def test_quoted_fields_with_separators_and_doubled_quotes_are_fine(tmp_path):
    e = write(tmp_path / "events.csv", "user_id,item_id,timestamp,event\nu1,A,1,click\n")
    i = write(tmp_path / "items.csv", 'item_id,title,description\nA,"a 12"" lamp, brass",\n')
    data = FileDataSource(e, i).load()
    assert data.items[Columns.Text].to_list() == ['a 12" lamp, brass']


def test_a_tsv_with_a_short_row_is_named(tmp_path):
    path = write(tmp_path / "t.tsv", "a\tb\n1\t2\n3\n")
    err = fails(lambda: read_table(path), "1 '\\\\t'-separated field", path, row=2)
    assert "line 3" in str(err)


def test_a_parquet_text_column_holding_lists_is_named(tmp_path):
    e = write(tmp_path / "events.csv", "user_id,item_id,timestamp,event\nu1,A,1,click\n")
    i = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": ["A"], "title": [["physics", "optics"]], "description": ["x"]}).write_parquet(i)
    err = fails(FileDataSource(e, str(i)).load, "join the values into one string", str(i), column="title")
    assert "List" in str(err)


# --- data.missing_text ----------------------------------------------------------------------------

NO_TEXT = "item_id,title,description\nA,a telescope,x\nB,,\nC,a skillet,\n"
NO_TEXT_EVENTS = "u1,A,1,click\nu1,B,2,click\nu1,C,3,click\nu2,B,4,click\n"


def test_missing_text_error_is_the_default_and_names_the_policy(tmp_path):
    e = write(tmp_path / "events.csv", "user_id,item_id,timestamp,event\n" + NO_TEXT_EVENTS)
    i = write(tmp_path / "items.csv", NO_TEXT)
    err = fails(FileDataSource(e, i).load, "data.missing_text=drop or keep", i, row=2, column="title")
    assert "1 item(s)" in str(err)


def test_missing_text_example_is_the_file_row(tmp_path):
    """The example row showed a ``text`` column the file does not have (the joined text fields)."""
    e = write(tmp_path / "events.csv", "user_id,item_id,timestamp,event\n" + NO_TEXT_EVENTS)
    i = write(tmp_path / "items.csv", NO_TEXT)
    err = fails(FileDataSource(e, i).load, "no text", i, row=2)
    assert err.example == {"item_id": "B", "title": None, "description": None}, str(err)


def test_missing_text_drop_leaves_out_the_item_and_its_events_counted(tmp_path, caplog):
    e = write(tmp_path / "events.csv", "user_id,item_id,timestamp,event\n" + NO_TEXT_EVENTS)
    i = write(tmp_path / "items.csv", NO_TEXT)
    src = FileDataSource(e, i, missing_text="drop")
    with caplog.at_level(logging.WARNING):
        data = src.load()
    assert data.item_ids.ids.tolist() == ["A", "C"]
    assert data.interactions[Columns.Item].to_list() == ["A", "C"]
    assert src.report["items_without_text_dropped"] == 1
    assert src.report["interactions_with_items_without_text_dropped"] == 2
    assert "dropped 1 item(s) with no text" in caplog.text


def test_missing_text_keep_keeps_the_item_with_empty_text_counted(tmp_path):
    e = write(tmp_path / "events.csv", "user_id,item_id,timestamp,event\n" + NO_TEXT_EVENTS)
    i = write(tmp_path / "items.csv", NO_TEXT)
    src = FileDataSource(e, i, missing_text="keep")
    data = src.load()
    assert data.items[Columns.Text].to_list() == ["a telescope. x", "", "a skillet"]
    assert data.interactions.height == 4
    assert src.report["items_without_text_kept"] == 1


def test_missing_text_policy_is_checked():
    with pytest.raises(ConfigError, match="data.missing_text must be one of"):
        FileDataSource("e.csv", "i.csv", missing_text="ignore")


# --- the export's user list and histories: the same reader, the same checks ------------------------


def test_a_ragged_users_csv_is_named(tmp_path):
    """Regression: polars' ComputeError escaped ``read_user_list`` as a traceback."""
    path = write(tmp_path / "users.csv", "user_id\nu1\nu2,u3\n")
    err = fails(lambda: read_user_list(path), "2 ','-separated field", path, row=2)
    assert "line 3" in str(err)


def test_an_empty_user_id_in_a_users_csv_is_named(tmp_path):
    path = write(tmp_path / "users.csv", "user_id,x\nu1,1\n,2\n")
    fails(lambda: read_user_list(path), "empty value", path, row=2, column="user_id")


def test_blank_lines_in_a_csv_are_skipped_and_rows_keep_their_numbers(tmp_path):
    path = write(tmp_path / "users.csv", "user_id,x\nu1,1\n\n,\nu2,2\n\n")
    df = read_table(path)
    assert df.rows() == [(1, "u1", "1"), (4, "u2", "2")]
    assert read_user_list(path) == ["u1", "u2"]


def test_non_utf8_bytes_in_a_plain_user_list_name_the_line(tmp_path):
    path = write(tmp_path / "users.txt", b"u1\nu\xff2\n")
    err = fails(lambda: read_user_list(path), "not valid UTF-8", path, row=2)
    assert err.column is None and "line 2" in str(err)


def test_a_users_path_that_is_a_folder(tmp_path):
    fails(lambda: read_user_list(str(tmp_path)), "is a folder", str(tmp_path))


def test_histories_with_iso_timestamps_are_read(tmp_path):
    """Regression: a strict cast in ``normalise_history`` raised on ISO timestamps."""
    path = write(
        tmp_path / "h.csv", "user_id,item_id,timestamp,event\nnew,A,2024-01-01,click\nnew,B,1704067201,click\n"
    )
    df = read_histories(path, WEIGHTS, now=NOW)
    assert df[Columns.Timestamp].to_list() == [1_704_067_200, 1_704_067_201]
    from recsys.pipeline_model import normalise_history

    assert normalise_history(df, WEIGHTS)[Columns.Timestamp].to_list() == [1_704_067_200, 1_704_067_201]


def test_normalise_history_refuses_an_empty_user_id_in_memory():
    """The in-memory path (``mlflow.pyfunc`` predict, the export's chunks) checks ids too."""
    from recsys.pipeline_model import normalise_history

    given = pl.DataFrame({"user_id": ["new", None], "item_id": ["A", "B"]})
    with pytest.raises(InputError) as info:
        normalise_history(given, WEIGHTS)
    # Named as what it is: it said "file history table, column 'user_id'".
    assert str(info.value).startswith("the given history, column 'user_id': 1 row(s) have an empty value")


def test_normalise_history_reads_iso_timestamps_in_memory():
    from recsys.pipeline_model import normalise_history

    given = pl.DataFrame({"user_id": ["new"], "item_id": ["A"], "timestamp": ["2024-01-01T00:00:00Z"]})
    assert normalise_history(given, WEIGHTS)[Columns.Timestamp].to_list() == [1_704_067_200]


def test_normalise_history_without_timestamps_dates_the_rows_just_now():
    """Regression: rows without a ``timestamp`` were stamped 0, 1, 2 ... (1970), so the ranker
    saw the user idle for 56 years. Now row i of a user's n rows is ``now - (n - 1 - i)``, per
    user and in row order, ``now`` being the pipeline's."""
    from recsys.pipeline_model import normalise_history

    given = pl.DataFrame({"user_id": ["a", "b", "a", "a", "b"], "item_id": ["A", "B", "C", "D", "E"]})
    out = normalise_history(given, WEIGHTS, now=NOW)
    assert out[Columns.User].to_list() == ["a", "b", "a", "a", "b"]  # row order kept
    assert out[Columns.Timestamp].to_list() == [NOW - 2, NOW - 1, NOW - 1, NOW, NOW]


@pytest.mark.parametrize("stamp", [1_704_067_200_000, 1_704_067_200_000.0])
def test_normalise_history_refuses_milliseconds_in_memory(stamp):
    """Regression: the CLI's file reader refused millisecond timestamps, the in-memory path
    (pyfunc, REST, ``export_recommendations``, ``TrainedPipeline.histories``) took them as
    seconds in the year 55970. Now every entry point refuses them with the same hint."""
    from recsys.pipeline_model import normalise_history

    given = pl.DataFrame({"user_id": ["new"], "item_id": ["A"], "timestamp": [stamp]})
    with pytest.raises(InputError, match="milliseconds \\(divide by 1000\\)") as info:
        normalise_history(given, WEIGHTS, now=NOW)
    assert info.value.column == Columns.Timestamp and info.value.file == "the given history"


def test_histories_and_users_are_read_with_a_column_map(tmp_path):
    """Regression: ``histories=`` ignored the model's ``data.column_map``, so a histories file
    in the training files' own column names was refused for lacking ``user_id``. Read with the
    map, the checks name the file's columns (the mapping noted) and the rows come out in ours."""
    from recsys.data.tables import ColumnMap

    cmap = ColumnMap({"user_id": "customer", "item_id": "sku", "timestamp": "time"}, "column_map")
    path = write(tmp_path / "h.csv", "customer,sku,time,event\nnew,A,1704067200,click\nnew,B,1704067201,purchase\n")
    df = read_histories(path, WEIGHTS, now=NOW, column_map=cmap)
    assert df.columns == [Columns.User, Columns.Item, Columns.Timestamp, Columns.Event]
    assert df[Columns.Item].to_list() == ["A", "B"]
    bad = write(tmp_path / "bad.csv", "customer,sku,time\nnew,A,1704067200000\n")
    err = fails(lambda: read_histories(bad, WEIGHTS, now=NOW, column_map=cmap), "milliseconds", bad, 1, "time")
    assert "column_map maps timestamp to 'time'" in str(err)
    both = write(tmp_path / "both.csv", "customer,user_id,sku\nnew,x,A\n")
    fails(lambda: read_histories(both, WEIGHTS, now=NOW, column_map=cmap), "has a column 'user_id' too", both)
    users = write(tmp_path / "users.csv", "customer\nU1\nU2\n")
    assert read_user_list(users, cmap) == ["U1", "U2"]
    err = fails(
        lambda: read_user_list(write(tmp_path / "u.csv", "user_id\nU1\n"), cmap), "missing", str(tmp_path / "u.csv")
    )
    assert err.column == "customer"


def test_recommend_reads_files_with_the_models_column_map_unless_set(tmp_path):
    """``column_map: null`` (the default) is the ``data.column_map`` saved in the model's
    ``config.yaml``, as ``recsys.update`` reads its files; a set ``column_map`` wins."""
    from recsys.recommend import column_map

    (tmp_path / "config.yaml").write_text("data:\n  column_map:\n    user_id: customer\n")
    assert column_map(None, tmp_path).mapping == {"user_id": "customer"}
    assert column_map({"user_id": "client"}, tmp_path).mapping == {"user_id": "client"}
    assert column_map(None, tmp_path / "no-config").mapping == {}


@pytest.mark.parametrize(
    ("content", "match", "row", "column"),
    [
        ("user_id,item_id,timestamp\nnew,A,1\n,B,2\n", "empty value", 2, "user_id"),
        ("user_id,item_id,timestamp\nnew,A,1\nnew,,2\n", "empty value", 2, "item_id"),
        ("user_id,item_id,timestamp\nnew,A,1704067200000\n", "milliseconds", 1, "timestamp"),
        ("user_id,item_id,timestamp\nnew,A,04/12/2026 13:36:50\n", "neither integer", 1, "timestamp"),
        ("user_id,item_id,event\nnew,A,click\nnew,B,wishlist\n", "outside", 2, "event"),
        ("user_id,item_id\nnew,A\nnew,B,C\n", "3 ','-separated field", 2, None),
    ],
    ids=["empty_user", "empty_item", "milliseconds", "us_date", "unknown_event", "ragged"],
)
def test_bad_histories_are_named_like_training_input(tmp_path, content, match, row, column):
    """Regression: an empty user id became recommendations for a user named "None"; millisecond
    timestamps passed; a bad event named no file and showed ``_row``."""
    path = write(tmp_path / "h.csv", content)
    fails(lambda: read_histories(path, WEIGHTS, now=NOW), match, path, row=row, column=column)


def test_a_future_history_row_names_no_setting_the_export_lacks(tmp_path):
    """The training files' hint (``data.future_timestamps``) is no setting of ``recsys.recommend``."""
    path = write(tmp_path / "h.csv", "user_id,item_id,timestamp\nnew,A,4070908800\n")  # 2099
    err = fails(
        lambda: read_histories(path, WEIGHTS, now=NOW), "after the current time", path, row=1, column="timestamp"
    )
    assert "future_timestamps" not in str(err) and "check the source's clock" in str(err)


def test_histories_path_that_is_a_folder(tmp_path):
    fails(lambda: read_histories(str(tmp_path), WEIGHTS), "is a folder", str(tmp_path))


@pytest.mark.slow
def test_cli_export_output_under_an_existing_file_is_refused(tmp_path):
    """Regression: ``output=`` below a file was a ``FileExistsError`` traceback after loading the model."""
    from reliability_support import run_recommend
    from test_bad_input import assert_clean_failure

    (tmp_path / "taken").write_text("x")
    out = tmp_path / "taken" / "sub" / "recs.parquet"
    proc = run_recommend(tmp_path, f"model_uri={tmp_path / 'no-such-pipeline'}", f"output={out}")
    assert_clean_failure(proc, f"{tmp_path / 'taken'} is a file, not a folder")
    assert "no-such-pipeline" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_training_with_items_without_text_kept_logs_the_count(tmp_path, caplog):
    """data.missing_text=keep through the whole job: the run finishes, the count is logged to
    MLflow and in the log."""
    import logging

    import mlflow
    from reliability_support import QUICK, train_in_process

    from recsys.data.synthetic import generate
    from recsys.tracking import tracking_uri

    inter, items = generate(n_users=200, n_items=120, n_groups=4, mean_events=8.0, seed=7)
    blank = pl.int_range(pl.len()) % 12 == 0  # 10 of 120 items lose all their text
    items = items.with_columns(pl.when(blank).then(pl.lit("")).otherwise(pl.col(c)).alias(c) for c in TEXT_FIELDS)
    inter.write_parquet(tmp_path / "e.parquet")
    items.write_parquet(tmp_path / "i.parquet")
    with caplog.at_level(logging.INFO, logger="recsys"):
        metrics = train_in_process(
            tmp_path,
            "out",
            *QUICK,
            "data=files",
            f"data.interactions={tmp_path / 'e.parquet'}",
            f"data.items={tmp_path / 'i.parquet'}",
            f"data.text_fields=[{','.join(TEXT_FIELDS)}]",
            "data.missing_text=keep",
        )
    assert "kept 10 item(s) with no text" in caplog.text
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(tmp_path / "mlruns"))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.metrics["data/items_without_text_kept"] == 10 and metrics["test/fused/ndcg_at_10"] > 0


TEXT_FIELDS = ("title", "category", "description")


@pytest.mark.slow
def test_cli_export_with_iso_histories_and_with_an_empty_user_id(tmp_path):
    """Regression: ISO timestamps in ``histories=`` were a traceback (a strict cast), and an empty
    user id got recommendations as a user named "None"."""
    import json

    from export_support import trained_run
    from reliability_support import run_recommend
    from test_bad_input import assert_clean_failure

    from recsys.pipeline_model import TrainedPipeline

    model = trained_run().pipeline_dir
    a, b = TrainedPipeline.load(model).items[Columns.Item].to_list()[:2]
    good = write(tmp_path / "h.csv", f"user_id,item_id,timestamp\nnew,{a},2024-01-01\nnew,{b},2024-01-01T10:00:00Z\n")
    proc = run_recommend(tmp_path, f"model_uri={model}", f"histories={good}", f"output={tmp_path / 'r.parquet'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "new" in pl.read_parquet(tmp_path / "r.parquet")[Columns.User].to_list()
    assert json.loads((tmp_path / "r.manifest.json").read_text())["unknown_users_without_history"] == 0

    bad = write(tmp_path / "bad.csv", f"user_id,item_id\nnew,{a}\n,{b}\n")
    proc = run_recommend(tmp_path, f"model_uri={model}", f"histories={bad}", f"output={tmp_path / 'x.parquet'}")
    assert_clean_failure(proc, bad, "column 'user_id', row 2", "empty value")
    assert not (tmp_path / "x.parquet").exists()
