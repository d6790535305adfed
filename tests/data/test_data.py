"""Loading files, validation messages, and the generated default data set."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest

from recsys.columns import Columns, Events
from recsys.data import FileDataSource, GeneratedDataSource, LeaveLastOutSplit
from recsys.errors import InputError

ITEMS_CSV = """item_id,title,description
A,Red telescope,sees far
B,Blue skillet,
C,,green seeds
"""
EVENTS_CSV = """user_id,item_id,timestamp,event
u1,A,100,click
u1,B,200,purchase
u2,C,150,click
u2,A,150,click
"""


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def ok_files(tmp_path: Path) -> tuple[str, str]:
    return write(tmp_path / "events.csv", EVENTS_CSV), write(tmp_path / "items.csv", ITEMS_CSV)


# --- loading ---------------------------------------------------------------------------------------


def check_loaded(data) -> None:
    inter = data.interactions
    assert data.n_users == 2 and data.n_items == 3
    assert data.users.ids.tolist() == ["u1", "u2"]
    assert data.item_ids.ids.tolist() == ["A", "B", "C"]
    assert inter[Columns.Timestamp].dtype == pl.Int64
    assert inter[Columns.Weight].to_list() == [1.0, 4.0, 1.0, 1.0]  # default weights: click 1, purchase 4
    # Sorted by user, time, then file order: u2's two events at t=150 keep the file's order (C, A).
    assert inter[Columns.Item].to_list() == ["A", "B", "C", "A"]
    assert inter[Columns.ItemIdx].to_list() == [0, 1, 2, 0]
    assert inter[Columns.UserIdx].to_list() == [0, 0, 1, 1]
    assert data.items[Columns.ItemIdx].to_list() == [0, 1, 2]
    assert "_row" not in inter.columns and "_row" not in data.items.columns


def test_load_csv(ok_files):
    data = FileDataSource(*ok_files).load()
    check_loaded(data)
    # Text = the text fields in order, joined with ". ", missing fields skipped.
    assert data.texts == ["Red telescope. sees far", "Blue skillet", "green seeds"]


def test_load_parquet_and_tsv_same_as_csv(ok_files, tmp_path):
    events = pl.read_csv(ok_files[0])
    items = pl.read_csv(ok_files[1])
    events.write_parquet(tmp_path / "e.parquet")
    items.write_parquet(tmp_path / "i.parquet")
    events.write_csv(tmp_path / "e.tsv", separator="\t")
    items.write_csv(tmp_path / "i.tsv", separator="\t")
    reference = FileDataSource(*ok_files).load()
    for suffix in ("parquet", "tsv"):
        data = FileDataSource(str(tmp_path / f"e.{suffix}"), str(tmp_path / f"i.{suffix}")).load()
        check_loaded(data)
        assert data.texts == reference.texts
        assert data.fingerprint() == reference.fingerprint()


def test_column_map_and_text_fields(tmp_path):
    events = write(tmp_path / "e.csv", "customer,sku,ts,kind\nx,P1,5,click\nx,P2,6,click\n")
    items = write(tmp_path / "i.csv", "sku,name,brand,body\nP1,Mug, Acme ,hot\nP2,Cup,Zed,\n")
    src = FileDataSource(
        events,
        items,
        text_fields=("brand", "name", "body"),
        text_separator=" | ",
        column_map={"user_id": "customer", "item_id": "sku", "timestamp": "ts", "event": "kind"},
    )
    data = src.load()
    assert data.users.ids.tolist() == ["x"]
    assert data.item_ids.ids.tolist() == ["P1", "P2"]
    assert data.interactions[Columns.Timestamp].to_list() == [5, 6]
    # Fields stripped, joined in the configured order with the configured separator.
    assert data.texts == ["Acme | Mug | hot", "Zed | Cup"]


def test_items_without_interactions_are_kept(tmp_path):
    events = write(tmp_path / "e.csv", "user_id,item_id,timestamp,event\nu,A,1,click\n")
    items = write(tmp_path / "i.csv", "item_id,title,description\nA,a,x\nB,b,y\n")
    data = FileDataSource(events, items).load()
    assert data.n_items == 2  # B is a cold-start item, reachable through its text
    assert data.items[Columns.Item].to_list() == ["A", "B"]


def test_empty_string_text_fields_are_skipped(tmp_path):
    pl.DataFrame({"item_id": ["a", "b"], "title": ["Foo", ""], "description": ["", "Bar"]}).write_parquet(
        tmp_path / "i.parquet"
    )
    pl.DataFrame({"user_id": ["u"], "item_id": ["a"], "timestamp": [1], "event": ["click"]}).write_parquet(
        tmp_path / "e.parquet"
    )
    data = FileDataSource(str(tmp_path / "e.parquet"), str(tmp_path / "i.parquet")).load()
    assert data.texts == ["Foo", "Bar"]


def test_item_with_only_empty_string_fields_is_rejected(tmp_path):
    pl.DataFrame({"item_id": ["a", "b"], "title": ["Foo", ""], "description": ["x", "  "]}).write_parquet(
        tmp_path / "i.parquet"
    )
    pl.DataFrame({"user_id": ["u"], "item_id": ["a"], "timestamp": [1], "event": ["click"]}).write_parquet(
        tmp_path / "e.parquet"
    )
    with pytest.raises(InputError, match="no text"):
        FileDataSource(str(tmp_path / "e.parquet"), str(tmp_path / "i.parquet")).load()


# --- validation: every bad input is one InputError naming the file, the column and a row ---------

# (name, which file is broken, its content, the column the message must name, a value of the example row)
BAD_INPUTS = [
    (
        "missing_column",
        "events",
        "user_id,item_id,timestamp\nu1,A,1\n",
        "event",
        None,
    ),
    (
        "unknown_event",
        "events",
        "user_id,item_id,timestamp,event\nu1,A,1,click\nu1,B,2,wishlist\n",
        "event",
        "wishlist",
    ),
    (
        "unknown_item",
        "events",
        "user_id,item_id,timestamp,event\nu1,A,1,click\nu1,ZZZ,2,click\n",
        "item_id",
        "ZZZ",
    ),
    (
        "unparsable_timestamp",
        "events",
        "user_id,item_id,timestamp,event\nu1,A,1,click\nu1,B,yesterday,click\n",
        "timestamp",
        "yesterday",
    ),
    (
        "empty_user_id",
        "events",
        "user_id,item_id,timestamp,event\nu1,A,1,click\n,B,2,click\n",
        "user_id",
        "B",
    ),
    (
        "empty_item_id",
        "items",
        "item_id,title,description\nA,a,x\n,lonely,y\n",
        "item_id",
        "lonely",
    ),
    (
        "duplicate_item_id",
        "items",
        "item_id,title,description\nA,first,x\nA,second,y\nB,b,z\n",
        "item_id",
        "first",
    ),
    (
        "item_without_text",
        "items",
        "item_id,title,description\nA,a,x\nB,,\n",
        "title",
        "B",
    ),
    (
        "missing_text_column",
        "items",
        "item_id,title\nA,a\n",
        "description",
        None,
    ),
]


@pytest.mark.parametrize(("case", "which", "content", "column", "example"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_input_error(tmp_path, case, which, content, column, example):
    events = write(tmp_path / "events.csv", "user_id,item_id,timestamp,event\nu1,A,1,click\nu1,B,2,click\n")
    items = write(tmp_path / "items.csv", "item_id,title,description\nA,a,x\nB,b,y\n")
    broken = events if which == "events" else items
    write(Path(broken), content)
    with pytest.raises(InputError) as info:
        FileDataSource(events, items).load()
    err, msg = info.value, str(info.value)
    assert broken in msg, msg
    assert err.file == broken
    assert f"'{column}'" in msg and err.column == column, msg
    if case == "unknown_item":
        assert items in msg  # and the file the id is missing from
    if example is not None:
        # Row-level problems show the offending row (1-based, header not counted) and its content.
        assert "example:" in msg and example in msg, msg
        assert err.row is not None and err.row >= 1
        assert example in str(err.example.values())


def test_row_number_points_at_the_bad_row(tmp_path):
    events = write(tmp_path / "e.csv", "user_id,item_id,timestamp,event\nu,A,1,click\nu,A,2,click\nu,A,3,buy\n")
    items = write(tmp_path / "i.csv", "item_id,title,description\nA,a,x\n")
    with pytest.raises(InputError) as info:
        FileDataSource(events, items).load()
    assert info.value.row == 3
    assert "row 3" in str(info.value)


@pytest.mark.parametrize("which", ["events", "items"])
def test_header_only_table_is_an_error(tmp_path, which):
    events = write(tmp_path / "e.csv", "user_id,item_id,timestamp,event\nu,A,1,click\n")
    items = write(tmp_path / "i.csv", "item_id,title,description\nA,a,x\n")
    broken = events if which == "events" else items
    Path(broken).write_text(Path(broken).read_text().splitlines()[0] + "\n")
    with pytest.raises(InputError, match="empty") as info:
        FileDataSource(events, items).load()
    assert broken in str(info.value)


def test_empty_parquet_is_an_error(tmp_path):
    items = write(tmp_path / "i.csv", "item_id,title,description\nA,a,x\n")
    path = tmp_path / "e.parquet"
    pl.DataFrame(
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "event": pl.String}
    ).write_parquet(path)
    with pytest.raises(InputError, match="empty") as info:
        FileDataSource(str(path), items).load()
    assert str(path) in str(info.value)


@pytest.mark.parametrize("which", ["events", "items"])
def test_missing_file(tmp_path, which):
    events = write(tmp_path / "e.csv", "user_id,item_id,timestamp,event\nu,A,1,click\n")
    items = write(tmp_path / "i.csv", "item_id,title,description\nA,a,x\n")
    missing = str(tmp_path / "nope" / "missing.csv")
    args = (missing, items) if which == "events" else (events, missing)
    with pytest.raises(InputError, match="not found") as info:
        FileDataSource(*args).load()
    assert missing in str(info.value)


def test_unsupported_suffix(tmp_path):
    events = write(tmp_path / "e.json", "{}")
    items = write(tmp_path / "i.csv", "item_id,title,description\nA,a,x\n")
    with pytest.raises(InputError, match="unsupported") as info:
        FileDataSource(events, items).load()
    assert events in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("events.csv", "user_id\titem_id\ttimestamp\tevent\nu\ti1\t5\tclick\n", "tab-separated; name it .tsv"),
        ("events.tsv", "user_id,item_id,timestamp,event\nu,i1,5,click\n", "comma-separated; name it .csv"),
        ("events.csv", "user_id;item_id;timestamp;event\nu;i1;5;click\n", "semicolon-separated; save it comma"),
    ],
)
def test_a_file_whose_separator_is_not_its_suffixs_says_so(tmp_path, name, content, says):
    """Regression: a TSV saved as .csv got only 'required column is missing; columns present:
    ['user_id\\titem_id...']' (the separator follows the suffix)."""
    (tmp_path / name).write_text(content)
    (tmp_path / "items.csv").write_text("item_id,title\ni1,Mug\n")
    with pytest.raises(InputError, match="the header reads as one column") as e:
        FileDataSource(str(tmp_path / name), str(tmp_path / "items.csv")).load()
    assert says in str(e.value) and name in str(e.value)


def test_custom_event_weights(tmp_path):
    events = write(tmp_path / "e.csv", "user_id,item_id,timestamp,event\nu,A,1,view\nu,A,2,cart\n")
    items = write(tmp_path / "i.csv", "item_id,title,description\nA,a,x\n")
    data = FileDataSource(events, items, event_weights={"view": 0.5, "cart": 2.0}).load()
    assert data.interactions[Columns.Weight].to_list() == [0.5, 2.0]
    with pytest.raises(InputError, match="view") as info:
        FileDataSource(events, items).load()  # default weights know click and purchase only
    # The hint is an override that works: 'set data.event_weights' (its old words) is refused whole.
    assert "(add event types with '+data.event_weights={view: 1.0}')" in str(info.value)


# --- data.column_map: errors speak of the columns as the file names them --------------------------

SHOP_MAP = {"user_id": "customer", "item_id": "sku", "timestamp": "time"}
SHOP_EVENTS = "customer,sku,time,event\nx,P1,5,click\nx,P2,6,click\n"
SHOP_ITEMS = "sku,title,description\nP1,Mug,hot\nP2,Cup,cold\n"

# (name, events file, items file, column_map, the column named, texts the message must hold)
MAPPED_CASES = [
    (
        "column missing, not in the map",
        SHOP_EVENTS,
        SHOP_ITEMS,
        {"user_id": "customer", "item_id": "sku"},
        "timestamp",
        ["columns present: ['customer', 'sku', 'time', 'event']"],
    ),
    (
        "mapped column missing",
        SHOP_EVENTS,
        SHOP_ITEMS,
        {**SHOP_MAP, "timestamp": "ts"},
        "ts",
        ["columns present: ['customer', 'sku', 'time', 'event']", "maps timestamp to 'ts'"],
    ),
    (
        "duplicate mapped item id",
        SHOP_EVENTS,
        "sku,title,description\nP1,Mug,hot\nP1,Mug,cold\nP2,Cup,x\n",
        SHOP_MAP,
        "sku",
        ["share an id", "maps item_id to 'sku'", "'sku': 'P1'"],
    ),
    (
        "unparsable mapped timestamp",
        "customer,sku,time,event\nx,P1,5,click\nx,P2,yesterday,click\n",
        SHOP_ITEMS,
        SHOP_MAP,
        "time",
        ["maps timestamp to 'time'", "'customer': 'x'", "'time': 'yesterday'"],
    ),
    (
        "event for a mapped item with no row",
        "customer,sku,time,event\nx,P1,5,click\nx,P9,6,click\n",
        SHOP_ITEMS,
        SHOP_MAP,
        "sku",
        ["no row in", "'sku': 'P9'"],
    ),
    (
        "repeated event",
        "customer,sku,time,event\nx,P1,5,click\nx,P1,5,click\n",
        SHOP_ITEMS,
        SHOP_MAP,
        "customer",
        ["same ['customer', 'sku', 'time', 'event']"],
    ),
    (
        "a mapped column and ours both in the file",
        "customer,sku,time,timestamp,event\nx,P1,5,7,click\n",
        SHOP_ITEMS,
        SHOP_MAP,
        "time",
        ["a column 'timestamp' too"],
    ),
]


@pytest.mark.parametrize(
    ("case", "events", "items", "column_map", "column", "texts"), MAPPED_CASES, ids=[c[0] for c in MAPPED_CASES]
)
def test_data_column_map_errors_name_the_files_own_columns(tmp_path, case, events, items, column_map, column, texts):
    """With ``data.column_map`` the user's file says ``customer, sku, time``: an error naming
    ``user_id`` or listing columns the file does not have sends them looking for nothing."""
    e, i = write(tmp_path / "e.csv", events), write(tmp_path / "i.csv", items)
    with pytest.raises(InputError) as info:
        FileDataSource(e, i, column_map=column_map, duplicates="error").load()
    err, msg = info.value, str(info.value)
    assert err.column == column and f"column '{column}'" in msg, msg
    for text in texts:
        assert text in msg, msg
    assert not any(ours in (err.example or {}) for ours in SHOP_MAP), msg  # the example row as the file has it


def test_data_events_file_is_checked_before_and_apart_from_the_item_file(tmp_path):
    """A missing interaction file is named as missing, not hidden behind the item file's problem."""
    items = write(tmp_path / "i.csv", "item_id,title,description\n")  # header only: an error for training
    missing = str(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="not found") as info:
        FileDataSource(missing, items).load()
    assert info.value.file == missing and items not in str(info.value)
    bad_time = write(tmp_path / "e.csv", "user_id,item_id,timestamp,event\nu,A,later,click\n")
    with pytest.raises(InputError) as info:
        FileDataSource(bad_time, items).load()
    assert info.value.file == bad_time and info.value.column == "timestamp"


def test_data_header_only_item_file_is_allowed_where_asked_and_its_header_still_checked(tmp_path):
    events = write(tmp_path / "e.csv", "customer,sku,time,event\nx,P1,5,click\n")
    header = write(tmp_path / "i.csv", "sku,title,description\n")
    src = FileDataSource(events, header, column_map=SHOP_MAP)
    items, inter = src.load_tables(pl.Series(["P1"]), allow_empty_items=True)
    assert items.height == 0 and Columns.Item in items.columns and Columns.Text in items.columns
    assert inter[Columns.Item].to_list() == ["P1"] and inter[Columns.Timestamp].to_list() == [5]
    no_title = write(tmp_path / "j.csv", "sku,description\n")
    with pytest.raises(InputError) as info:
        FileDataSource(events, no_title, column_map=SHOP_MAP).load_tables(pl.Series(["P1"]), allow_empty_items=True)
    assert info.value.file == no_title and info.value.column == "title"
    with pytest.raises(InputError, match="empty"):
        FileDataSource(events, header, column_map=SHOP_MAP).load()  # training needs items


# --- the generated data set ------------------------------------------------------------------------

SMALL = dict(n_users=120, n_items=80)


def digests(paths) -> list[str]:
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def test_generated_is_deterministic_and_written_under_directory(tmp_path):
    a = GeneratedDataSource(str(tmp_path / "a"), seed=3, **SMALL)
    b = GeneratedDataSource(str(tmp_path / "b"), seed=3, **SMALL)
    c = GeneratedDataSource(str(tmp_path / "c"), seed=4, **SMALL)
    pa, pb, pc = a.ensure(), b.ensure(), c.ensure()
    for paths, folder in ((pa, "a"), (pb, "b"), (pc, "c")):
        for p in paths:
            assert p.is_file()
            assert p.resolve().is_relative_to((tmp_path / folder).resolve())
    assert digests(pa) == digests(pb)  # same arguments: byte-identical files
    assert digests(pa) != digests(pc)  # another seed: another data set
    assert a.load().fingerprint() == b.load().fingerprint() != c.load().fingerprint()


def test_generated_reuses_files_and_names_them_by_spec(tmp_path):
    src = GeneratedDataSource(str(tmp_path), seed=3, **SMALL)
    paths = src.ensure()
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert src.ensure() == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes  # not regenerated
    other = GeneratedDataSource(str(tmp_path), seed=3, n_users=121, n_items=80).paths()
    assert other[0].parent != paths[0].parent  # a changed size writes a new set, never a stale one


def test_generated_has_both_events_and_cold_start_items(tmp_path):
    data = GeneratedDataSource(str(tmp_path), seed=5, n_users=300, n_items=150).load()
    inter = data.interactions
    assert data.n_users == 300 and data.n_items == 150
    assert set(inter[Columns.Event].unique().to_list()) == set(Events.ALL)
    assert all(t.strip() for t in data.texts)
    # Late releases: some items appear for the first time in the last fifth of the time line.
    t = inter[Columns.Timestamp]
    late_cut = t.min() + 0.8 * (t.max() - t.min())
    first_seen = inter.group_by(Columns.ItemIdx).agg(pl.col(Columns.Timestamp).min())
    assert first_seen.filter(pl.col(Columns.Timestamp) > late_cut).height > 0
    # Cold start after the split: held-out events on items that have no training event at all.
    split = LeaveLastOutSplit().split(inter)
    train_items = set(split.train[Columns.ItemIdx].to_list())
    held_out = set(split.val[Columns.ItemIdx].to_list()) | set(split.test[Columns.ItemIdx].to_list())
    assert held_out - train_items, "no cold-start item in validation/test"
    # ... and the catalogue holds items nobody interacted with, or few enough to matter.
    assert len(train_items) < data.n_items


def test_parquet_datetime_timestamps_become_seconds_or_are_rejected(tmp_path):
    import datetime as dt

    pl.DataFrame({"item_id": ["a"], "title": ["Foo"], "description": ["x"]}).write_parquet(tmp_path / "i.parquet")
    when = [dt.datetime(2024, 1, 1), dt.datetime(2024, 1, 2)]
    events = {"user_id": ["u", "u"], "item_id": ["a", "a"], "timestamp": when, "event": ["click"] * 2}
    pl.DataFrame(events).write_parquet(tmp_path / "e.parquet")
    src = FileDataSource(str(tmp_path / "e.parquet"), str(tmp_path / "i.parquet"))
    try:
        data = src.load()
    except InputError as e:  # a clear refusal is fine too
        assert "timestamp" in str(e)
        return
    assert data.interactions[Columns.Timestamp].to_list() == [1_704_067_200, 1_704_153_600]


def test_iso_dates_in_csv_become_unix_seconds(tmp_path):
    items = write(tmp_path / "items.csv", "item_id,title,description\nA,Foo,x\n")
    events = write(tmp_path / "events.csv", "user_id,item_id,timestamp,event\nu1,A,2024-01-01T00:00:00,click\n")
    data = FileDataSource(str(events), str(items)).load()
    assert data.interactions[Columns.Timestamp].to_list() == [1_704_067_200]
