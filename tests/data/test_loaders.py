"""Research-data loaders (RecBole atomic files, MovieLens-100k, MIND) and the fixed split.

Each loader runs on a few-row fixture written here, whose right answer is known, on malformed
variants of it (each must raise an InputError naming file and column, or apply its documented
repair), and on the real files in ``../shared/data`` when they are present.
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import pytest

from recsys.columns import Columns, SplitParts
from recsys.data import (
    FixedSplit,
    GlobalTimeSplit,
    LeaveLastOutSplit,
    MindDataSource,
    MovieLensDataSource,
    RecBoleDataSource,
)
from recsys.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared" / "data"


def shared(folder: str) -> Path:
    path = SHARED / folder
    if not path.is_dir():
        pytest.skip("../shared/data not present: real-data tests need the shared data sets")
    return path


def expect_input_error(load, match: str, *, file: str, column: str | None) -> InputError:
    """``load()`` raises an InputError matching ``match`` that names ``file`` and ``column``."""
    with pytest.raises(InputError, match=match) as info:
        load()
    err = info.value
    assert err.file is not None and err.file.endswith(file), err
    assert err.column == column, err
    return err


# --- RecBole atomic files ----------------------------------------------------------------------

# Known answer: user -> item sequence, oldest first (u2 and u4 buy an item twice; u4's train
# histories all have the same length once truncated to 2, so only row order can place them).
SEQS = {
    "u1": ["A", "B", "C", "D", "E"],
    "u2": ["C", "A", "C", "B"],
    "u3": ["E", "D", "B"],
    "u4": ["B", "D", "A", "E", "C", "A", "D"],
}
ITEMS = {"A": "Alpha widget", "B": "Beta gadget", "C": "Gamma tool", "D": "Delta kit", "E": "Epsilon set"}


def write_recbole(root: Path, seqs=SEQS, max_len: int = 50, item_offset: int = 0) -> Path:
    """Files as RecBole / UniSRec write them: train rows longest prefix first, histories truncated."""
    root.mkdir(parents=True, exist_ok=True)
    item_idx = {item: i + item_offset for i, item in enumerate(ITEMS)}
    user_idx = {u: i for i, u in enumerate(seqs)}
    (root / "T.item2index").write_text("".join(f"{k}\t{i}\n" for k, i in item_idx.items()))
    (root / "T.user2index").write_text("".join(f"{k}\t{i}\n" for k, i in user_idx.items()))
    (root / "T.text").write_text("item_id:token\ttext:token_seq\n" + "".join(f"{k}\t{t}\n" for k, t in ITEMS.items()))
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for user, seq in seqs.items():
        idx = [item_idx[i] for i in seq]

        def row(end: int, idx=idx, user=user) -> str:
            hist = idx[max(0, end - max_len) : end]
            return f"{user_idx[user]}\t{' '.join(map(str, hist))}\t{idx[end]}\n"

        parts["test"].append(row(len(idx) - 1))
        parts["valid"].append(row(len(idx) - 2))
        parts["train"].extend(row(end) for end in range(len(idx) - 3, 0, -1))
    for name, rows in parts.items():
        (root / f"T.{name}.inter").write_text(header + "".join(rows))
    return root


def sequences(data) -> dict[str, list[str]]:
    df = data.interactions.sort(Columns.User, Columns.Timestamp)
    return {u: g[Columns.Item].to_list() for (u,), g in df.group_by(Columns.User, maintain_order=True)}


@pytest.mark.parametrize("max_len", [50, 2])
def test_recbole_rebuilds_sequences_in_order_with_the_files_split(tmp_path, max_len):
    data = RecBoleDataSource(write_recbole(tmp_path, max_len=max_len), dataset="T", name="t").load()
    assert sequences(data) == SEQS
    assert (data.n_users, data.n_items, data.interactions.height, data.name) == (4, 5, 19, "t")
    inter = data.interactions
    assert inter[Columns.Event].unique().to_list() == ["purchase"]
    # timestamp = position in the user's sequence; the last is test, the one before validation.
    u1 = inter.filter(pl.col(Columns.User) == "u1")
    assert u1[Columns.Timestamp].to_list() == [0, 1, 2, 3, 4]
    assert u1[Columns.Split].to_list() == ["train", "train", "train", "val", "test"]
    assert inter.select(Columns.UserIdx, Columns.Timestamp).equals(
        inter.select(Columns.UserIdx, Columns.Timestamp).sort(Columns.UserIdx, Columns.Timestamp)
    )
    assert data.items[Columns.Text].to_list() == list(ITEMS.values())


def test_recbole_uses_indices_as_given_whatever_their_offset(tmp_path):
    data = RecBoleDataSource(write_recbole(tmp_path, item_offset=1), dataset="T").load()
    assert sequences(data) == SEQS


def test_fixed_split_equals_leave_last_out_on_a_leave_one_out_data_set(tmp_path):
    inter = RecBoleDataSource(write_recbole(tmp_path), dataset="T").load().interactions
    fixed, llo = FixedSplit().split(inter), LeaveLastOutSplit().split(inter)
    for a, b in ((fixed.train, llo.train), (fixed.val, llo.val), (fixed.test, llo.test)):
        assert a.equals(b)
    assert fixed.test[Columns.Item].to_list() == ["E", "B", "B", "D"]


def test_fixed_split_needs_the_split_column():
    df = pl.DataFrame({Columns.UserIdx: [0], Columns.Timestamp: [0]})
    with pytest.raises(ConfigError, match="split=leave_last_out"):
        FixedSplit().split(df)
    with pytest.raises(InputError, match="split value outside"):
        FixedSplit().split(df.with_columns(pl.lit("holdout").alias(Columns.Split)))


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, count))


@pytest.mark.parametrize(
    ("file", "old", "new", "error_file", "column", "match"),
    [
        ("T.train.inter", "\t2\n", "\t9\n", "T.train.inter", "item_id", "no row in"),  # index not in item2index
        ("T.train.inter", "\t2\n", "\tx\n", "T.train.inter", "item_id", "cannot be read"),
        ("T.train.inter", "\t0 1\t", "\t0 7\t", "T.train.inter", "item_id_list", "not an integer index"),
        ("T.train.inter", "\t0 1\t", "\t1 0\t", "T.train.inter", "item_id_list", "does not match"),  # wrong order
        ("T.test.inter", "0\t0 1 2 3\t4", "5\t0 1 2 3\t4", "T.test.inter", "user_id", "no row in"),  # unknown user
        ("T.text", "Beta gadget", "  ", "T.text", "text", "empty text"),
        # An item of the index without a text row: reported against the index file.
        ("T.text", "B\tBeta gadget\n", "", "T.item2index", "item_id", "no row in"),
        ("T.item2index", "B\t1", "B\t0", "T.item2index", "index", "share an id"),
        ("T.valid.inter", "\t0 1 2\t3\n", "\t0 1 2\t3\textra\n", "T.valid.inter", None, "fields"),
    ],
)
def test_recbole_rejects_malformed_files(tmp_path, file, old, new, error_file, column, match):
    root = write_recbole(tmp_path)
    edit(root / file, old, new)
    expect_input_error(RecBoleDataSource(root, dataset="T").load, match, file=error_file, column=column)


def test_recbole_duplicate_rows_are_dropped_and_counted_or_rejected(tmp_path, caplog):
    root = write_recbole(tmp_path)
    with (root / "T.train.inter").open("a") as f:
        f.write("0\t0\t1\n")
    with caplog.at_level(logging.INFO):
        src = RecBoleDataSource(root, dataset="T")
        assert sequences(src.load()) == SEQS
    assert src.report == {"duplicates_dropped:T.train.inter": 1}
    assert "dropped 1 duplicate row" in caplog.text
    err = expect_input_error(
        RecBoleDataSource(root, dataset="T", duplicates="error").load,
        "repeat an earlier row",
        file="T.train.inter",
        column="user_id",
    )
    assert err.row == 8  # 7 rows written, the copy appended


def test_recbole_reports_non_utf8_bytes_with_file_and_line(tmp_path):
    root = write_recbole(tmp_path)
    (root / "T.text").write_bytes((root / "T.text").read_bytes().replace(b"Gamma", b"G\xe4mma"))
    with pytest.raises(InputError, match="line 4") as info:
        RecBoleDataSource(root, dataset="T").load()
    assert info.value.file.endswith("T.text") and info.value.row == 3


def test_recbole_missing_file_and_bad_policy(tmp_path):
    root = write_recbole(tmp_path)
    (root / "T.valid.inter").unlink()
    with pytest.raises(InputError, match="file not found"):
        RecBoleDataSource(root, dataset="T").load()
    with pytest.raises(ConfigError, match="duplicates"):
        RecBoleDataSource(root, dataset="T", duplicates="keep")


# --- MovieLens-100k ----------------------------------------------------------------------------

GENRES = "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir Horror "
GENRES += "Musical Mystery Romance Sci-Fi Thriller War Western"


def flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES.split())


def write_movielens(root: Path, data_rows: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES.split())) + "\n")
    items = (
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags('Animation', 'Comedy')}\n"
        f"2|Café Society (1995)|01-Jan-1995||http://y|{flags('Drama')}\n"
        f"3|unknown||||{flags('unknown')}\n"
    )
    (root / "u.item").write_bytes(items.encode("latin-1"))
    rows = data_rows or "10\t1\t5\t100\n10\t2\t3\t90\n11\t2\t4\t50\n11\t1\t4\t50\n12\t1\t1\t10\n"
    (root / "u.data").write_text(rows)
    return root


def test_movielens_positives_text_and_order(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        src = MovieLensDataSource(write_movielens(tmp_path), name="ml")
        data = src.load()
    inter = data.interactions
    # Ratings >= 4 only; user 12 has no positive and is not a user at all.
    assert inter.select(Columns.User, Columns.Item, "rating").rows() == [("10", "1", 5), ("11", "2", 4), ("11", "1", 4)]
    assert src.report == {"below_min_rating_dropped": 2} and "2 rating(s) below min_rating=4" in caplog.text
    assert (data.n_users, data.n_items) == (2, 3)  # movie 3 has no positive: a cold item, kept
    assert data.items[Columns.Text].to_list() == [
        "Toy Story (1995). Animation, Comedy",
        "Café Society (1995). Drama",  # latin-1 decoded
        "unknown",  # the "unknown" genre is left out
    ]
    assert inter[Columns.Weight].to_list() == [1.0] * 3
    everything = MovieLensDataSource(tmp_path, min_rating=0).load()
    assert (everything.n_users, everything.interactions.height) == (3, 5)
    # Same second: file order kept (item 2 before item 1 for user 11).
    assert everything.interactions.filter(pl.col(Columns.User) == "11")[Columns.Item].to_list() == ["2", "1"]


@pytest.mark.parametrize(
    ("rows", "column", "match"),
    [
        ("10\t1\tfive\t100\n", "rating", "cannot be read"),
        ("10\t1\t7\t100\n", "rating", "1..5"),
        ("10\t9\t5\t100\n", "item_id", "no row in"),
        ("10\t1\t5\tyesterday\n", "timestamp", "cannot be read"),
        ("10\t1\t5\n", None, "fields"),
    ],
)
def test_movielens_rejects_malformed_ratings(tmp_path, rows, column, match):
    root = write_movielens(tmp_path, data_rows="11\t2\t4\t50\n" + rows)
    err = expect_input_error(MovieLensDataSource(root).load, match, file="u.data", column=column)
    assert err.row == 2


def test_movielens_rejects_malformed_items(tmp_path):
    root = write_movielens(tmp_path)
    (root / "u.item").write_bytes((root / "u.item").read_bytes().replace(b"http://x|0|", b"http://x|2|"))
    expect_input_error(MovieLensDataSource(root).load, "outside", file="u.item", column="unknown")
    write_movielens(tmp_path)
    (root / "u.item").write_bytes((root / "u.item").read_bytes().replace(b"|Toy Story (1995)|", b"||"))
    # An empty title is an empty value before it is an empty text.
    expect_input_error(MovieLensDataSource(root).load, "empty value", file="u.item", column="title")


def test_movielens_duplicates_and_encoding(tmp_path):
    root = write_movielens(tmp_path, data_rows="10\t1\t5\t100\n10\t1\t5\t100\n")
    src = MovieLensDataSource(root)
    assert src.load().interactions.height == 1 and src.report == {"duplicates_dropped:u.data": 1}
    expect_input_error(
        MovieLensDataSource(root, duplicates="error").load, "repeat an earlier row", file="u.data", column="user_id"
    )
    (root / "u.data").write_bytes(b"10\t1\t5\t100\n10\t2\t5\t100 \xe9\n")
    with pytest.raises(InputError, match="line 2") as info:
        MovieLensDataSource(root).load()
    assert info.value.file.endswith("u.data")
    with pytest.raises(ConfigError, match="min_rating"):
        MovieLensDataSource(root, min_rating=6)


# --- MIND --------------------------------------------------------------------------------------

NEWS = [
    ("N1", "sports", "golf", "Golf win", "A player won.", "", "[]", "[]"),
    ("N2", "news", "world", "", "", "", "[]", "[]"),  # a row, but neither title nor abstract
    ("N3", "finance", "markets", 'Stocks "rally"', "", "", "[]", "[]"),  # unbalanced-looking quotes
    ("N4", "travel", "europe", "Trip", "Paris in spring", "", "[]", "[]"),
]
# U1 is seen twice with the same history (as in MIND); N9 has no news row at all.
BEHAVIORS = [
    ("1", "U1", "11/11/2019 9:00:00 AM", "N1 N9 N3", "N4-1 N2-0 N9-0"),
    ("2", "U2", "11/11/2019 8:00:00 AM", "", "N1-0 N3-1 N4-1"),
    ("3", "U1", "11/12/2019 1:00:00 PM", "N1 N9 N3", "N1-0 N4-0 N2-1"),
]
T1 = 1573462800  # 11/11/2019 9:00:00 AM as UTC seconds


def write_mind(root: Path, news=NEWS, behaviors=BEHAVIORS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "news.tsv").write_text("".join("\t".join(r) + "\n" for r in news))
    (root / "behaviors.tsv").write_text("".join("\t".join(r) + "\n" for r in behaviors))
    return root


def test_mind_is_named_after_its_folder_unless_named(tmp_path):
    # Two MIND releases read with one config must not share a name in the reports and MLflow.
    root = write_mind(tmp_path / "MINDlarge_dev")
    assert MindDataSource(root).load().name == "MINDlarge_dev"
    assert MindDataSource(tmp_path / "MINDlarge_dev" / ".").name == "MINDlarge_dev"
    assert MindDataSource(root, name="mind-dev").load().name == "mind-dev"


def test_mind_drop_policy(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        src = MindDataSource(write_mind(tmp_path))
        data = src.load()
    inter = data.interactions
    rows = inter.select(Columns.User, Columns.Item, Columns.Timestamp).rows()
    # History clicks once (U1's history repeats), at the first impression time minus their
    # distance from the end of the list; then the impression clicks at their impression time.
    assert rows == [
        ("U1", "N1", T1 - 3),
        ("U1", "N3", T1 - 1),
        ("U1", "N4", T1),
        ("U2", "N3", T1 - 3600),
        ("U2", "N4", T1 - 3600),
    ]
    assert inter[Columns.Event].unique().to_list() == ["click"]
    # N2 (no title/abstract) and N9 (no row) are dropped everywhere, and counted.
    assert src.report == {
        "news_without_text_dropped": 1,
        "history_clicks_dropped": 1,
        "impression_candidates_dropped": 3,
        "news_without_text": 2,
    }
    assert "2 of 5 referenced news have no text" in caplog.text
    assert data.items[Columns.Item].to_list() == ["N1", "N3", "N4"]
    assert data.items[Columns.Text].to_list() == [
        "Golf win. A player won. sports",
        'Stocks "rally". finance',
        "Trip. Paris in spring. travel",
    ]
    imp = data.impressions
    assert imp.columns[:7] == [
        Columns.Impression,
        Columns.User,
        Columns.Item,
        Columns.Timestamp,
        Columns.Clicked,
        Columns.Position,
        Columns.UserIdx,
    ]
    assert imp.select(Columns.Impression, Columns.Item, Columns.Clicked, Columns.Position).rows() == [
        ("2", "N1", False, 0),
        ("2", "N3", True, 1),
        ("2", "N4", True, 2),
        ("1", "N4", True, 0),
        ("3", "N1", False, 0),
        ("3", "N4", False, 1),
    ]
    assert imp[Columns.ItemIdx].is_not_null().all() and imp[Columns.UserIdx].is_not_null().all()


def test_mind_global_time_split_tests_impression_clicks(tmp_path):
    """History clicks carry no time (MIND lists the weeks before the log): they are marked
    undated, and a time cut keeps them in train, however late their user is first seen."""
    late = ("4", "U3", "11/13/2019 9:00:00 AM", "N1 N3 N4", "N1-1 N4-0")  # U3 first seen last
    data = MindDataSource(write_mind(tmp_path, behaviors=[*BEHAVIORS, late])).load()
    inter = data.interactions
    assert inter.select(Columns.User, Columns.Item, Columns.Dated).rows() == [
        ("U1", "N1", False),
        ("U1", "N3", False),
        ("U1", "N4", True),
        ("U2", "N3", True),
        ("U2", "N4", True),
        ("U3", "N1", False),
        ("U3", "N3", False),
        ("U3", "N4", False),
        ("U3", "N1", True),
    ]
    split = GlobalTimeSplit(val_quantile=0.5, test_quantile=0.75).split(inter)
    # A cut on all nine times put U3's stand-in history (just before 11/13 9:00) in test.
    assert split.train.filter(~pl.col(Columns.Dated)).height == 5
    assert split.val.select(Columns.User, Columns.Item).rows() == [("U2", "N3"), ("U2", "N4")]
    assert split.test.select(Columns.User, Columns.Item).rows() == [("U1", "N4"), ("U3", "N1")]
    assert split.describe()["test_undated_events"] == 0


def test_mind_category_only_keeps_news_rows_without_title(tmp_path):
    src = MindDataSource(write_mind(tmp_path), missing_text="category_only")
    data = src.load()
    assert data.items.filter(pl.col(Columns.Item) == "N2")[Columns.Text].to_list() == ["news"]
    assert data.interactions.filter(pl.col(Columns.Item) == "N2").height == 1  # clicked in impression 3
    assert "N9" not in data.items[Columns.Item].to_list()  # no row at all: still dropped
    assert src.report["news_without_text"] == 1


def test_mind_missing_text_follows_the_text_fields(tmp_path):
    """With text_fields=[abstract] a news with a title but no abstract has no text: the policy
    applies to it (it used to pass as having text and then fail with 'empty text' under every
    policy)."""
    root = write_mind(tmp_path)
    src = MindDataSource(root, text_fields=["abstract"])
    data = src.load()
    assert data.items[Columns.Item].to_list() == ["N1", "N4"]
    assert data.items[Columns.Text].to_list() == ["A player won.", "Paris in spring"]
    assert src.report["news_without_text_dropped"] == 2
    kept = MindDataSource(root, text_fields=["abstract"], missing_text="category_only").load()
    assert kept.items.filter(pl.col(Columns.Item) == "N3")[Columns.Text].item() == "finance"
    err = expect_input_error(
        MindDataSource(root, text_fields=["abstract"], missing_text="error").load,
        "no abstract",
        file="news.tsv",
        column="abstract",
    )
    assert err.row == 2
    # Text from the category alone: every row with a category has text.
    assert MindDataSource(root, text_fields=["category"]).load().n_items == 4


def test_mind_error_policy_names_the_reference(tmp_path):
    root = write_mind(tmp_path, news=[NEWS[0], NEWS[2], NEWS[3]])
    err = expect_input_error(
        MindDataSource(root, missing_text="error").load,
        "no row, or neither title nor abstract",
        file="behaviors.tsv",
        column="history",
    )
    assert err.example == {Columns.User: "U1", Columns.Item: "N9"} and err.row == 1
    expect_input_error(
        MindDataSource(write_mind(tmp_path), missing_text="error").load,
        "neither title nor abstract",
        file="news.tsv",
        column="title",
    )


@pytest.mark.parametrize(
    ("row", "column", "match", "at"),
    [
        (("4", "U3", "2019-11-11 09:00", "", "N1-1"), "time", "do not match", 4),
        (("4", "U3", "11/11/2019 9:00:00 AM", "", "N1-1 N3-2"), "impressions", "'N3-2'", 4),
        (("4", "U3", "11/11/2019 9:00:00 AM", "", ""), "impressions", "empty", 4),
        (("4", "", "11/11/2019 9:00:00 AM", "", "N1-1"), "user_id", "empty value", 4),
        # Reused impression id with other content: the first of the two rows is named.
        (("1", "U3", "11/11/2019 9:00:00 AM", "", "N1-1"), "impression_id", "share an id", 1),
    ],
)
def test_mind_rejects_malformed_behaviors(tmp_path, row, column, match, at):
    root = write_mind(tmp_path, behaviors=[*BEHAVIORS, row])
    err = expect_input_error(MindDataSource(root).load, match, file="behaviors.tsv", column=column)
    assert err.row == at


def test_mind_news_listed_twice_in_one_impression(tmp_path):
    """A candidate shown twice in one impression: the same label twice is a duplicate (dropped
    and counted, or an error), clicked and not clicked at once is always an error."""
    same = ("4", "U3", "11/11/2019 9:00:00 AM", "", "N1-1 N3-0 N1-1")
    src = MindDataSource(write_mind(tmp_path / "same", behaviors=[*BEHAVIORS, same]))
    data = src.load()
    imp = data.impressions.filter(pl.col(Columns.Impression) == "4")
    assert imp.select(Columns.Item, Columns.Clicked).rows() == [("N1", True), ("N3", False)]
    # one click of N1 by U3, not two at the same instant
    assert data.interactions.filter(pl.col(Columns.User) == "U3")[Columns.Item].to_list() == ["N1"]
    assert src.report["repeated_candidates_dropped"] == 1
    err = expect_input_error(
        MindDataSource(tmp_path / "same", duplicates="error").load,
        "more than once",
        file="behaviors.tsv",
        column="impressions",
    )
    assert err.row == 4 and err.example[Columns.Item] == "N1"
    both = ("4", "U3", "11/11/2019 9:00:00 AM", "", "N1-1 N3-0 N1-0")
    err = expect_input_error(
        MindDataSource(write_mind(tmp_path / "both", behaviors=[*BEHAVIORS, both])).load,
        "both clicked and not clicked",
        file="behaviors.tsv",
        column="impressions",
    )
    assert err.row == 4 and err.example[Columns.Item] == "N1"


def test_mind_duplicates_and_bytes(tmp_path):
    root = write_mind(tmp_path, behaviors=[*BEHAVIORS, BEHAVIORS[1]])
    src = MindDataSource(root)
    assert src.load().interactions.height == 5 and src.report["duplicates_dropped:behaviors.tsv"] == 1
    expect_input_error(
        MindDataSource(root, duplicates="error").load,
        "repeat an earlier row",
        file="behaviors.tsv",
        column="impression_id",
    )
    (root / "news.tsv").write_bytes((root / "news.tsv").read_bytes().replace(b"Trip", b"Tr\xffp"))
    with pytest.raises(InputError, match="line 4") as info:
        MindDataSource(root).load()
    assert info.value.file.endswith("news.tsv")
    with pytest.raises(ConfigError, match="missing_text"):
        MindDataSource(root, missing_text="placeholder")
    with pytest.raises(ConfigError, match="text_fields"):
        MindDataSource(root, text_fields=["body"])


# --- real data -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scientific():
    return RecBoleDataSource(shared("amazon-scientific"), dataset="Scientific").load()


def test_real_scientific_counts_and_published_split(scientific):
    data = scientific
    assert (data.n_users, data.n_items, data.interactions.height) == (8442, 4385, 59427)
    assert data.items[Columns.Text].str.len_chars().min() > 0
    fixed = FixedSplit().split(data.interactions)
    assert (fixed.train.height, fixed.val.height, fixed.test.height) == (42543, 8442, 8442)
    llo = LeaveLastOutSplit().split(data.interactions)
    for a, b in ((fixed.train, llo.train), (fixed.val, llo.val), (fixed.test, llo.test)):
        assert a.equals(b)


def test_real_scientific_matches_the_test_file_directly(scientific):
    """Independent check: each user's last 51 events are the test row's history and target."""
    root = shared("amazon-scientific")
    items = dict(line.split("\t") for line in (root / "Scientific.item2index").read_text().splitlines())
    users = dict(line.split("\t") for line in (root / "Scientific.user2index").read_text().splitlines())
    item_of = {int(i): k for k, i in items.items()}
    user_of = {int(i): k for k, i in users.items()}
    # Index 0 is a real item, the first purchase of user 0: there is no padding offset.
    assert item_of[0] == "B00TNNWMXI"
    seqs = sequences(scientific)
    assert seqs[user_of[0]][0] == "B00TNNWMXI"
    for line in (root / "Scientific.test.inter").read_text().splitlines()[1:]:
        u, hist, target = line.split("\t")
        expected = [item_of[int(i)] for i in hist.split()] + [item_of[int(target)]]
        assert seqs[user_of[int(u)]][-len(expected) :] == expected


def test_real_movielens_counts():
    root = shared("ml-100k")
    data = MovieLensDataSource(root, min_rating=0).load()
    assert (data.n_users, data.n_items, data.interactions.height) == (943, 1682, 100_000)
    assert (
        data.items.filter(pl.col(Columns.Item) == "1")[Columns.Text].item()
        == "Toy Story (1995). Animation, Children's, Comedy"
    )
    positives = MovieLensDataSource(root).load()
    assert (positives.n_users, positives.n_items, positives.interactions.height) == (942, 1682, 55_375)
    assert positives.interactions["rating"].min() == 4


def test_real_mind_counts_and_drop_report():
    src = MindDataSource(shared("mind-small-sample"))
    data = src.load()
    # 838 of the 22,592 news the behaviors reference have a news.tsv row (~4 %).
    assert src.report["news_without_text"] == 22592 - 838
    assert (data.n_items, data.interactions.height) == (2000, 5529)
    # Counted straight from the files: a user's history repeats on each of their rows (taken
    # once), plus the clicked impression candidates that have a news row.
    root = shared("mind-small-sample")
    news = {line.split("\t", 1)[0] for line in (root / "news.tsv").read_text().splitlines()}
    behaviors = [line.split("\t") for line in (root / "behaviors.tsv").read_text().splitlines()]
    histories: dict[str, list[str]] = {}
    for row in behaviors:
        histories.setdefault(row[1], row[3].split())
    n_history = sum(n in news for h in histories.values() for n in h)
    kept = [(row[0], t.endswith("-1")) for row in behaviors for t in row[4].split() if t.rsplit("-", 1)[0] in news]
    assert data.interactions.height == n_history + sum(c for _, c in kept)
    imp = data.impressions
    assert imp.height == len(kept) == 5310
    assert imp[Columns.Impression].n_unique() == len({i for i, _ in kept}) == 2396
    assert int(imp[Columns.Clicked].sum()) == sum(c for _, c in kept)
    assert imp.height + src.report["impression_candidates_dropped"] == 189_359  # all candidates in the file


def test_real_mind_global_time_split_holds_out_impression_clicks_only():
    """The audit's figure: cut on all times, 540 of the 554 test events were history clicks."""
    data = MindDataSource(shared("mind-small-sample")).load()
    dated = data.interactions[Columns.Dated]
    assert (int(dated.sum()), int((~dated).sum())) == (175, 5354)  # impression clicks, history clicks
    split = GlobalTimeSplit().split(data.interactions)
    assert split.val[Columns.Dated].all() and split.test[Columns.Dated].all()
    assert (split.val.height, split.test.height, split.train.height) == (17, 19, 5493)
    # Their history clicks are in train, so CF and the text tower can score 9 of the 18 test
    # users (the rest clicked no news with text before); the cut on all times left 1 of 259.
    test_users = split.test[Columns.UserIdx].unique()
    assert (test_users.len(), int(test_users.is_in(split.train[Columns.UserIdx].implode()).sum())) == (18, 9)


@pytest.mark.parametrize(
    ("data", "split", "n_users"),
    [("scientific", "fixed", 8442), ("ml100k", "leave_last_out", 942), ("mind", "leave_last_out", 3454)],
)
def test_real_data_through_the_pipeline_data_and_split_stage(data, split, n_users):
    """The job's first stage (recsys.train.run) on the shipped configs, with the default root."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import recsys.config  # noqa: F401  (registers the resolvers)
    from recsys.pipeline import check_split
    from recsys.recommender import History

    shared("")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"data={data}", f"split={split}"])
    dataset = instantiate(cfg.data).load()
    parts = instantiate(cfg.split).split(dataset.interactions)
    val_users, test_users = check_split(dataset, parts)
    assert dataset.n_users == n_users and len(test_users) > 0 and len(val_users) > 0
    hist = History(parts.train, dataset.n_users, dataset.n_items).extend(parts.val)
    assert hist.matrix.shape == (dataset.n_users, dataset.n_items)
    assert hist.interactions.height + parts.test.height == dataset.interactions.height
    if split == "fixed":
        assert set(parts.test[Columns.Split].unique().to_list()) == {SplitParts.Test}
