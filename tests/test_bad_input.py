"""Bad input beyond tests/test_data.py and tests/test_loaders.py: each case ends in an InputError /
ConfigError naming the file, the column and an example row, or in a documented repair whose count
is reported. A few go through the real CLI (exit code 2, one line on stderr, no traceback).

The full list, with what each case produces, is in docs/reliability.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from reliability_support import SECRET, reference_run, run_cli

from recsys.columns import Columns
from recsys.data import FileDataSource, LeaveLastOutSplit
from recsys.errors import ConfigError, InputError

EVENTS = "user_id,item_id,timestamp,event\nu1,A,1,click\nu1,B,2,click\nu1,A,3,purchase\n"
ITEMS = "item_id,title,description\nA,a telescope,x\nB,a skillet,y\n"


def write(path: Path, content: str | bytes) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def files(tmp_path: Path, events: str | bytes = EVENTS, items: str | bytes = ITEMS, suffix: str = "csv"):
    return write(tmp_path / f"events.{suffix}", events), write(tmp_path / f"items.{suffix}", items)


def parquet(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    pl.DataFrame(data).write_parquet(path)
    return str(path)


def expect(load, match: str, *, file: str, column: str | None, example: object = None, row: int | None = None):
    with pytest.raises(InputError, match=match) as info:
        load()
    err, msg = info.value, str(info.value)
    assert err.file == file and file in msg, msg
    assert err.column == column, msg
    if column is not None:
        assert f"column '{column}'" in msg
    if example is not None:
        assert "example:" in msg and str(example) in msg, msg
    if row is not None:
        assert err.row == row and f"row {row}" in msg, msg
    return err


# --- columns and dtypes ---------------------------------------------------------------------------


def test_extra_columns_are_kept(tmp_path):
    events, items = files(
        tmp_path,
        "user_id,item_id,timestamp,event,price\nu1,A,1,click,3.5\nu1,B,2,click,4\n",
        "item_id,title,description,brand\nA,a,x,Acme\nB,b,y,Zed\n",
    )
    data = FileDataSource(events, items).load()
    assert data.interactions["price"].to_list() == ["3.5", "4"]  # CSV columns stay text
    assert data.items["brand"].to_list() == ["Acme", "Zed"]


@pytest.mark.parametrize("which", ["events", "items"])
def test_float_ids_with_a_missing_value_are_rejected(tmp_path, which):
    """pandas writes an integer id column with a gap as float: 12 -> "12.0", gap -> "NaN"."""
    e = {"user_id": ["u1", "u1"], "item_id": ["1", "2"], "timestamp": [1, 2], "event": ["click", "click"]}
    i = {"item_id": ["1", "2"], "title": ["a", "b"], "description": ["x", "y"]}
    if which == "events":
        e["user_id"] = [7.0, float("nan")]
    else:
        i["item_id"] = [1.0, None]
    events, items = parquet(tmp_path, "e.parquet", e), parquet(tmp_path, "i.parquet", i)
    file, column = (events, "user_id") if which == "events" else (items, "item_id")
    err = expect(FileDataSource(events, items).load, "ids must be text or integers", file=file, column=column, row=2)
    assert "Float64" in str(err)


def test_integer_ids_in_parquet_are_fine(tmp_path):
    events = parquet(
        tmp_path, "e.parquet", {"user_id": [7, 7], "item_id": [1, 2], "timestamp": [1, 2], "event": ["click"] * 2}
    )
    items = parquet(tmp_path, "i.parquet", {"item_id": [1, 2], "title": ["a", "b"], "description": ["x", "y"]})
    data = FileDataSource(events, items).load()
    assert data.users.ids.tolist() == ["7"] and data.item_ids.ids.tolist() == ["1", "2"]


def test_fractional_float_timestamps_are_rejected(tmp_path):
    events = parquet(
        tmp_path,
        "e.parquet",
        {"user_id": ["u1"] * 2, "item_id": ["A", "B"], "timestamp": [1.0, 2.5], "event": ["click"] * 2},
    )
    _, items = files(tmp_path)
    expect(FileDataSource(events, items).load, "neither integer", file=events, column="timestamp", row=1)


def test_numeric_event_codes_are_rejected(tmp_path):
    events = parquet(tmp_path, "e.parquet", {"user_id": ["u1"], "item_id": ["A"], "timestamp": [1], "event": [1]})
    _, items = files(tmp_path)
    expect(FileDataSource(events, items).load, "outside", file=events, column="event", row=1, example="'event': '1'")


# --- empty, unreadable and corrupt files ----------------------------------------------------------


@pytest.mark.parametrize("which", ["events", "items"])
def test_zero_byte_file(tmp_path, which):
    events, items = files(tmp_path)
    broken = events if which == "events" else items
    write(Path(broken), "")
    expect(FileDataSource(events, items).load, "cannot be read", file=broken, column=None)


@pytest.mark.parametrize(
    ("which", "content", "column", "row"),
    [
        ("events", b"user_id,item_id,timestamp,event\nu1,A,1,click\nu\xff1,B,2,click\n", "user_id", 2),
        ("items", b"item_id,title,description\nA,caf\xe9,x\nB,b,y\n", "title", 1),  # latin-1, not UTF-8
    ],
)
def test_non_utf8_bytes_name_line_and_column(tmp_path, which, content, column, row):
    events, items = files(tmp_path)
    broken = events if which == "events" else items
    write(Path(broken), content)
    err = expect(FileDataSource(events, items).load, "not valid UTF-8", file=broken, column=column, row=row)
    assert f"line {row + 1}" in str(err)


@pytest.mark.parametrize("damage", ["truncated", "not_parquet"])
def test_corrupt_parquet(tmp_path, damage):
    events = parquet(tmp_path, "e.parquet", {"user_id": ["u1"], "item_id": ["A"], "timestamp": [1], "event": ["click"]})
    raw = Path(events).read_bytes()
    Path(events).write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"user_id,item_id\nu1,A\n")
    _, items = files(tmp_path)
    expect(FileDataSource(events, items).load, "cannot be read: parquet", file=events, column=None)


def test_byte_order_mark_in_header_is_accepted(tmp_path):
    events, items = files(tmp_path, "\ufeff" + EVENTS)
    assert FileDataSource(events, items).load().interactions.height == 3


# --- rows: duplicates, text, time ----------------------------------------------------------------

DUP = "user_id,item_id,timestamp,event\nu1,A,1,click\nu1,A,1,click\nu1,B,2,click\nu1,A,1,purchase\n"


def test_duplicate_event_rows_are_dropped_and_counted(tmp_path, caplog):
    events, items = files(tmp_path, DUP)
    src = FileDataSource(events, items)
    with caplog.at_level(logging.INFO):
        data = src.load()
    # The copy of row 1 goes; the purchase at the same time is another event and stays.
    assert data.interactions.height == 3
    assert src.report == {"duplicates_dropped:events.csv": 1}
    assert "dropped 1 duplicate row" in caplog.text


def test_duplicate_event_rows_error_or_keep_policy(tmp_path):
    events, items = files(tmp_path, DUP)
    expect(
        FileDataSource(events, items, duplicates="error").load,
        "repeat an earlier row",
        file=events,
        column="user_id",
        row=2,
    )
    assert FileDataSource(events, items, duplicates="keep").load().interactions.height == 4
    with pytest.raises(ConfigError, match="data.duplicates"):
        FileDataSource(events, items, duplicates="ignore")


def test_identical_item_rows_are_dropped_but_conflicting_ones_are_an_error(tmp_path):
    events, items = files(tmp_path, items=ITEMS + "A,a telescope,x\n")
    src = FileDataSource(events, items)
    assert src.load().n_items == 2 and src.report == {"duplicates_dropped:items.csv": 1}
    events, items = files(tmp_path, items=ITEMS + "A,a microscope,x\n")
    expect(FileDataSource(events, items).load, "share an id", file=items, column="item_id", example="a telescope")


def test_unicode_whitespace_only_text_is_no_text(tmp_path):
    events, items = files(
        tmp_path, items="item_id\ttitle\tdescription\nA\ta\tx\nB\t\u00a0\u2003\t \u3000\n", suffix="tsv"
    )
    expect(FileDataSource(events, items).load, "no text", file=items, column="title", row=2, example="'item_id': 'B'")


FUTURE = "user_id,item_id,timestamp,event\nu1,A,1700000000,click\nu1,B,1700000000123,click\nu1,A,1700000100,click\n"


def test_future_timestamps_are_an_error_by_default(tmp_path):
    events, items = files(tmp_path, FUTURE)
    err = expect(
        FileDataSource(events, items, now=1_700_000_500).load,
        "after the current time.*milliseconds",
        file=events,
        column="timestamp",
        row=2,
        example="1700000000123",
    )
    assert "data.future_timestamps" in str(err)


@pytest.mark.parametrize(("policy", "rows"), [("keep", 3), ("drop", 2)])
def test_future_timestamps_keep_or_drop_are_counted(tmp_path, caplog, policy, rows):
    events, items = files(tmp_path, FUTURE)
    src = FileDataSource(events, items, future_timestamps=policy, now=1_700_000_500)
    with caplog.at_level(logging.WARNING):
        assert src.load().interactions.height == rows
    verb = "kept" if policy == "keep" else "dropped"
    assert src.report == {f"future_timestamps_{verb}": 1} and f"{verb} 1 row(s)" in caplog.text


def test_a_timestamp_within_a_day_of_the_clock_is_not_future(tmp_path):
    events, items = files(tmp_path, "user_id,item_id,timestamp,event\nu1,A,1700000000,click\n")
    assert FileDataSource(events, items, now=1_700_000_000 - 3600).load().interactions.height == 1


def test_all_events_of_a_user_at_one_instant_keep_file_order(tmp_path):
    events, items = files(tmp_path, "user_id,item_id,timestamp,event\nu1,B,5,click\nu1,A,5,click\nu1,B,5,purchase\n")
    src = FileDataSource(events, items)
    data = src.load()
    assert src.report == {"users_with_all_events_at_one_time": 1}
    split = LeaveLastOutSplit().split(data.interactions)
    assert split.test[Columns.Event].to_list() == ["purchase"]  # the last row of the file is held out
    assert split.val[Columns.Item].to_list() == ["A"] and split.train[Columns.Item].to_list() == ["B"]


def test_single_event_users_train_but_are_not_evaluated(tmp_path):
    from recsys.recommender import History
    from recsys.text.datamodule import NextItemExamples

    events, items = files(tmp_path, EVENTS + "u2,B,7,click\n")
    data = FileDataSource(events, items).load()
    split = LeaveLastOutSplit().split(data.interactions)
    u2 = data.users.index(["u2"])[0]
    assert u2 in split.train[Columns.UserIdx].to_list()
    assert u2 not in split.val[Columns.UserIdx].to_list() + split.test[Columns.UserIdx].to_list()
    examples = NextItemExamples(History(split.train, data.n_users, data.n_items), max_history=5)
    users = split.train[Columns.UserIdx].to_numpy()
    assert u2 not in users[examples.positions]  # no (history -> next item) pair without a history


def test_only_single_event_users_is_an_error_before_training(tmp_path):
    from recsys.pipeline import check_split

    events, items = files(tmp_path, "user_id,item_id,timestamp,event\nu1,A,1,click\nu2,B,1,click\n")
    data = FileDataSource(events, items).load()
    with pytest.raises(InputError, match="validation split is empty"):
        check_split(data, LeaveLastOutSplit().split(data.interactions))


# --- the encoder ----------------------------------------------------------------------------------


def test_encoder_path_missing_empty_or_not_a_bert(tmp_path, tokenizer_path):
    import shutil

    from transformers import GPT2Config, GPT2Model

    from recsys.text.encoder import ItemEncoder

    with pytest.raises(ConfigError, match="does not exist"):
        ItemEncoder.from_pretrained(str(tmp_path / "no" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        ItemEncoder.from_pretrained(str(tmp_path / "empty"))
    gpt = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=100, n_positions=16)).save_pretrained(gpt)
    for f in Path(tokenizer_path).iterdir():
        if f.is_file() and ("tok" in f.name or "vocab" in f.name or "special" in f.name):
            shutil.copy(f, gpt)
    with pytest.raises(ConfigError, match="cannot load a BERT model") as info:
        ItemEncoder.from_pretrained(str(gpt))
    assert str(gpt) in str(info.value)


# --- K and the export user list --------------------------------------------------------------------


def test_k_larger_than_the_catalogue_gives_shorter_lists(tiny_dataset):
    """Documented repair: a list holds at most the items a user has not seen (no padding rows)."""
    from recsys.export.engine import fast_top_k
    from recsys.export.writer import recommendations_frame
    from recsys.recommender import top_k

    n = tiny_dataset.n_items
    scores = np.random.default_rng(0).random((3, n)).astype(np.float32)
    scores[0, :5] = -np.inf  # seen items
    for fn in (top_k, fast_top_k):
        items, sc = fn(scores, n + 50)
        assert items.shape == (3, n)
    items, sc = top_k(scores, n + 50)
    items = np.where(np.isfinite(sc), items, -1)
    recs = recommendations_frame(tiny_dataset, np.arange(3), items, sc)
    per_user = recs.group_by(Columns.User, maintain_order=True).agg(pl.col(Columns.Rank))
    ranks = per_user[Columns.Rank].to_list()
    assert [len(r) for r in ranks] == [n - 5, n, n]
    assert all(r == list(range(1, len(r) + 1)) for r in ranks)


@pytest.mark.parametrize("content", ["", "user_id\n"])
def test_an_empty_user_list_for_export_is_an_error(tmp_path, content):
    from recsys.recommend import read_user_list

    path = write(tmp_path / ("users.csv" if content else "users.txt"), content)
    with pytest.raises(InputError, match="no user") as info:
        read_user_list(path)
    assert path in str(info.value)


# --- through the CLI: exit code 2, the message on stderr, no traceback ---------------------------


def assert_clean_failure(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()
    assert any(line.startswith("error: ") for line in last), proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_cli_config_pointing_at_a_missing_file(tmp_path):
    _, items = files(tmp_path)
    missing = str(tmp_path / "exports" / "events.csv")
    proc = run_cli(tmp_path, "out", "data=files", f"data.interactions={missing}", f"data.items={items}")
    assert_clean_failure(proc, missing, "file not found")
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # failed before any run was started


@pytest.mark.slow
def test_secrets_are_masked_in_logged_params():
    import mlflow

    from recsys.tracking import tracking_uri

    ref = reference_run()
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(ref.root / "mlruns"))
    run_id = ref.log.split("MLflow run ")[1].split(";")[0]
    params = client.get_run(run_id).data.params
    assert params["service.api_token"] == "***"
    assert params["seed"] == "42"  # other params are logged as they are
    assert not [k for k, v in params.items() if SECRET in v]
