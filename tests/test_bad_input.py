"""Bad input beyond tests/data/test_data.py and tests/data/test_loaders.py: each case ends in an InputError /
ConfigError naming the file, the column and an example row, or in a documented repair whose count
is reported. A few go through the real CLI (exit code 2, one line on stderr, no traceback).

The full list, with what each case produces, is in docs/reliability.md.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from reliability_support import run_cli

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
    # 1.0 is a whole number of seconds (pandas writes integer columns with a gap as floats); 2.5 is not.
    expect(FileDataSource(events, items).load, "neither integer", file=events, column="timestamp", row=2)


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
        tmp_path,
        EVENTS.replace(",", "\t"),  # each file is valid on its own: the item file's text is what fails
        items="item_id\ttitle\tdescription\nA\ta\tx\nB\t\u00a0\u2003\t \u3000\n",
        suffix="tsv",
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


def test_all_events_of_a_user_at_one_instant_train_but_are_not_evaluated(tmp_path):
    """One moment cannot be split into history and target (its order is unknown): counted, kept
    in train in file order, never held out."""
    events, items = files(tmp_path, "user_id,item_id,timestamp,event\nu1,B,5,click\nu1,A,5,click\nu1,B,5,purchase\n")
    src = FileDataSource(events, items)
    data = src.load()
    assert src.report == {"users_with_all_events_at_one_time": 1}
    split = LeaveLastOutSplit().split(data.interactions)
    assert split.test.height == 0 and split.val.height == 0
    assert split.train[Columns.Item].to_list() == ["B", "A", "B"]


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


@pytest.mark.parametrize("folder", ["pipeline", "pipeline_evaluated"])
def test_a_run_folder_holding_a_saved_pipeline_is_refused_before_any_work(tmp_path, folder):
    """Saving the pipelines is the job's last stage and never overwrites one: a rerun into a used
    run folder (a fixed ``hydra.run.dir``) is refused before the data is read, not after training."""
    from reliability_support import QUICK, train_in_process

    earlier = tmp_path / "out" / folder
    earlier.mkdir(parents=True)
    (earlier / "meta.json").write_text("{}")
    match = rf"pipeline folder {re.escape(str(earlier))} exists and is not empty.*\(hydra\.run\.dir=\.\.\.\)"
    with pytest.raises(ConfigError, match=match):
        train_in_process(tmp_path, "out", *QUICK)
    assert (earlier / "meta.json").read_text() == "{}"  # left as it was
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "data").exists()


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
    from recsys.output import recommendations_frame
    from recsys.topk import top_k

    n = tiny_dataset.n_items
    scores = np.random.default_rng(0).random((3, n)).astype(np.float32)
    scores[0, :5] = -np.inf  # seen items
    items, sc = top_k(scores, n + 50)
    assert items.shape == (3, n)
    items = np.where(np.isfinite(sc), items, -1)
    recs = recommendations_frame(tiny_dataset, np.arange(3), items, sc)
    per_user = recs.group_by(Columns.User, maintain_order=True).agg(pl.col(Columns.Rank))
    ranks = per_user[Columns.Rank].to_list()
    assert [len(r) for r in ranks] == [n - 5, n, n]
    assert all(r == list(range(1, len(r) + 1)) for r in ranks)


@pytest.mark.parametrize("content", ["", "user_id\n"])
def test_an_empty_user_list_for_export_is_an_error(tmp_path, content):
    from recsys.data.tables import read_user_list

    path = write(tmp_path / ("users.csv" if content else "users.txt"), content)
    with pytest.raises(InputError, match="no user") as info:
        read_user_list(path)
    assert path in str(info.value)


# --- the saved pipeline folder (recsys.pipeline_model) -----------------------------------


@pytest.fixture
def pipeline_copy(tmp_path) -> Path:
    """A private copy of the shared test run's saved pipeline (ALS, BPR, item-kNN, popularity,
    the text tower, the ``text_zeroshot`` feature, the ranker), free to damage."""
    import shutil

    from export_support import trained_run

    return Path(shutil.copytree(trained_run().pipeline_dir, tmp_path / "pipeline"))


def load_fails(folder: Path, *names: str, file: Path | None = None) -> str:
    """``TrainedPipeline.load(folder)`` raises an InputError naming ``file`` (default: the
    folder) and each of ``names``, and says how to repair it; returns the message."""
    from recsys.pipeline_model import TrainedPipeline

    with pytest.raises(InputError) as info:
        TrainedPipeline.load(folder)
    msg = str(info.value)
    assert info.value.file == str(file or folder) and str(file or folder) in msg, msg
    assert "not a complete saved pipeline" in msg and "re-run training" in msg, msg
    for name in names:
        assert name in msg, msg
    return msg


@pytest.mark.parametrize(
    "missing",
    [
        "models/text/user_encoder.safetensors",
        "models/text/item_embeddings.npy",
        "models/text_zeroshot/user_encoder.safetensors",
        "models/text_zeroshot/item_embeddings.npy",
        "models/als/model.npz",
        "models/itemknn/model.npz",
        "models/popularity/model.npz",
        "ranker/lightgbm.txt",
        "users.parquet",
    ],
)
def test_a_missing_pipeline_file_is_named_before_anything_is_read(pipeline_copy, missing):
    (pipeline_copy / missing).unlink()
    msg = load_fails(pipeline_copy, missing)
    assert "1 file(s)" in msg, msg  # the others are all there: only the deleted one is named


@pytest.mark.parametrize("folder", ["models/text", "models/text_zeroshot", "models", "ranker"])
def test_a_missing_pipeline_subfolder_names_every_file_load_needs_from_it(pipeline_copy, folder):
    import shutil

    gone = sorted(
        str(f.relative_to(pipeline_copy))
        for f in (pipeline_copy / folder).rglob("*")
        # The BERT under models/text/encoder/ is read only when a loaded pipeline is saved again.
        if f.is_file() and "encoder" not in f.relative_to(pipeline_copy).parts
    )
    shutil.rmtree(pipeline_copy / folder)
    msg = load_fails(pipeline_copy, *gone)
    assert gone and f"{len(gone)} file(s)" in msg, msg


@pytest.mark.parametrize(
    ("content", "match"),
    [("{not json", "JSONDecodeError"), ("[1, 2]", "not an object"), (b"\xff\xfe{}", "UnicodeDecodeError")],
)
def test_corrupt_meta_json_is_named(pipeline_copy, content, match):
    meta = pipeline_copy / "meta.json"
    meta.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert match in load_fails(pipeline_copy, file=meta)


def test_meta_json_without_an_entry_load_needs_is_named(pipeline_copy):
    import json

    meta = pipeline_copy / "meta.json"
    data = json.loads(meta.read_text())
    del data["models"]
    meta.write_text(json.dumps(data))
    assert "'models'" in load_fails(pipeline_copy, file=meta)


def edit_json(path: Path, edit) -> None:
    """Rewrite the JSON file ``path`` with ``edit`` applied to its parsed content (in place)."""
    import json

    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "field", "found"),
    [
        (lambda m: m["ranker"].pop("features"), "ranker.features", "is missing (expected list[str])"),
        (lambda m: m["models"]["text"].pop("max_history"), "models.text.max_history", "is missing (expected int)"),
        (lambda m: m["models"]["text_new"].pop("max_events"), "models.text_new.max_events", "is missing"),
        (
            lambda m: m["models"]["text_popular"].update(temperature="0.05"),
            "models.text_popular.temperature",
            "must be float, found str",
        ),
        (lambda m: m["models"]["als"].pop("kind"), "models.als.kind", "is missing (expected str)"),
        # list("rank_als,rank_text") would silently make one feature of each character.
        (lambda m: m["ranker"].update(features="rank_als,rank_text"), "ranker.features", "found str 'rank_als,"),
        (
            lambda m: m["models"]["text_zeroshot"].update(max_history="20"),
            "models.text_zeroshot.max_history",
            "found str",
        ),
        (lambda m: m["n_candidates"].update(als=[30]), "n_candidates", "must be dict[str, int], found dict"),
        (lambda m: m.update(now=True), "now", "must be int, found bool True"),
        (lambda m: m.update(ranker=["features"]), "ranker", "must be dict | None, found list"),
        (
            lambda m: m["models"]["itemknn_recent"].update(recency_decay="0.5"),
            "models.itemknn_recent.recency_decay",
            "must be float | None, found str",
        ),
    ],
)
def test_a_missing_or_mistyped_field_inside_meta_json_is_named(pipeline_copy, edit, field, found):
    meta = pipeline_copy / "meta.json"
    edit_json(meta, edit)
    msg = load_fails(pipeline_copy, f"field '{field}'", found, file=meta)
    assert msg.count("field '") == 1, msg  # the one broken field, not every field around it


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # The allowed keys are listed, so a typo can be fixed without reading our code.
        (
            lambda s: s["rules"].update(max_per_cat=2),
            r"'rules' has unknown key\(s\) \['max_per_cat'\] \(allowed: filter_seen, .*max_per_category, ",
        ),
        (lambda s: s["explain"].update(top=2), r"'explain' has unknown key\(s\) \['top'\] \(allowed: enabled, "),
        (lambda s: s["rules"].update(max_per_category="2"), "field 'rules.max_per_category' must be int | None"),
        (lambda s: s["rules"].update(blocklist=[1, 2]), "field 'rules.blocklist' must be Sequence"),
        (lambda s: s["explain"].update(enabled="no"), "field 'explain.enabled' must be bool"),
        (lambda s: s.update(rules=["filter_seen"]), "field 'rules' must be dict, found list"),
    ],
)
def test_a_bad_rules_or_explain_entry_in_serving_json_is_named_at_load(pipeline_copy, edit, match):
    """Checked when the model is loaded: ``BusinessRules(**rules)`` would only fail (or, for a
    string where a number belongs, compare a str with an int) at the first ``predict``."""
    from recsys.export.pyfunc import SERVING_FILE, _load_pyfunc

    serving = pipeline_copy / SERVING_FILE
    edit_json(serving, edit)
    with pytest.raises(InputError, match=match) as info:
        _load_pyfunc(str(pipeline_copy))
    assert info.value.file == str(serving) and str(serving) in str(info.value)


def test_the_rules_and_explanations_serving_json_may_hold_load(pipeline_copy):
    """Keys the rule and explanation classes take, with values of their types (an integer where a
    float belongs, null where None is allowed), still load: the check rejects only what is wrong."""
    from recsys.export.pyfunc import SERVING_FILE, _load_pyfunc

    def edit(s):
        s["rules"] = {"filter_seen": False, "blocklist": ["x"], "max_per_category": 2, "min_score": 0, "at": None}
        s["explain"] = {"enabled": False, "feature_ranks": None}

    edit_json(pipeline_copy / SERVING_FILE, edit)
    model = _load_pyfunc(str(pipeline_copy))
    assert model.serving["rules"]["max_per_category"] == 2


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s["rules"].update(allowlist="/nonexistent/allow.txt"), "rules.allowlist: file not found"),
        (lambda s: s["rules"].update(blocklist="/nonexistent/block.csv"), "rules.blocklist: file not found"),
        (
            lambda s: s["rules"].update(max_per_category=2, category_column="genre"),
            "the items have no 'genre' column",
        ),
    ],
)
def test_what_a_serving_rule_points_at_is_checked_at_load(pipeline_copy, edit, match):
    """A missing allowlist/blocklist file or category column fails when the model loads (it used
    to fail at the first ``predict``)."""
    from recsys.errors import ConfigError
    from recsys.export.pyfunc import SERVING_FILE, _load_pyfunc

    edit_json(pipeline_copy / SERVING_FILE, edit)
    with pytest.raises(ConfigError, match=match):
        _load_pyfunc(str(pipeline_copy))


@pytest.mark.parametrize(
    ("damaged", "content"),
    [
        ("models/als/model.npz", b"not a zip archive"),
        ("models/text/user_encoder.safetensors", b"\x08\x00\x00"),  # truncated header
        ("models/text_zeroshot/item_embeddings.npy", b"\x93NUMPY garbage"),
        ("ranker/lightgbm.txt", b"not a LightGBM model"),
        ("history.parquet", b"PAR1 half a file"),
    ],
)
def test_an_unreadable_pipeline_file_is_named(pipeline_copy, damaged, content):
    (pipeline_copy / damaged).write_bytes(content)
    assert "cannot be read" in load_fails(pipeline_copy, file=pipeline_copy / damaged)


@pytest.mark.parametrize(
    ("content", "match"), [("{'k': 10}", "JSONDecodeError"), ('{"k": 10}', "'scorer'"), ('"fused"', "not an object")]
)
def test_corrupt_serving_json_is_named(pipeline_copy, content, match):
    from recsys.export.pyfunc import SERVING_FILE, _load_pyfunc

    serving = pipeline_copy / SERVING_FILE
    serving.write_text(content)
    with pytest.raises(InputError, match=match) as info:
        _load_pyfunc(str(pipeline_copy))
    assert info.value.file == str(serving) and str(serving) in str(info.value)
    assert "re-run training" in str(info.value)


def test_an_optional_looking_tower_file_that_was_saved_is_required(pipeline_copy, tmp_path):
    """A tower saved with its frozen history side needs it back: loading without it would
    silently score users differently."""
    from recsys.pipeline_model import TrainedPipeline

    p = TrainedPipeline.load(pipeline_copy)
    tower = p.models["text_zeroshot"]
    tower.history_embeddings = tower.item_embeddings * 2.0
    folder = p.save(tmp_path / "with_history")
    again = TrainedPipeline.load(folder).models["text_zeroshot"]
    np.testing.assert_array_equal(again.history_embeddings, tower.history_embeddings)
    (folder / "models/text_zeroshot/history_embeddings.npy").unlink()
    load_fails(folder, "models/text_zeroshot/history_embeddings.npy")


def test_saving_a_loaded_pipeline_again_without_its_bert_is_named(pipeline_copy, tmp_path):
    import shutil

    from recsys.pipeline_model import TrainedPipeline

    shutil.rmtree(pipeline_copy / "models" / "text" / "encoder")
    p = TrainedPipeline.load(pipeline_copy)  # serving does not need the BERT
    with pytest.raises(InputError, match="BERT") as info:
        p.save(tmp_path / "again")
    assert info.value.file == str(pipeline_copy / "models" / "text" / "encoder")
    assert "re-run training" in str(info.value)
    assert not (tmp_path / "again").exists()  # nothing half-written


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
    """Named before Lightning is even imported (~10 s): here importing it would fail the job."""
    _, items = files(tmp_path)
    missing = str(tmp_path / "exports" / "events.csv")
    poisoned = tmp_path / "poisoned" / "lightning"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text("raise ImportError('lightning imported before the data was checked')\n")
    overrides = ["data=files", f"data.interactions={missing}", f"data.items={items}"]
    proc = run_cli(tmp_path, "out", *overrides, extra_env={"PYTHONPATH": str(poisoned.parent)})
    assert_clean_failure(proc, missing, "file not found")
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # failed before any run was started


@pytest.mark.slow
def test_cli_export_from_an_incomplete_pipeline_folder(pipeline_copy, tmp_path):
    from reliability_support import run_recommend

    (pipeline_copy / "models" / "text_zeroshot" / "user_encoder.safetensors").unlink()
    proc = run_recommend(tmp_path, f"model_uri={pipeline_copy}", f"output={tmp_path / 'recs.parquet'}")
    assert_clean_failure(proc, str(pipeline_copy), "models/text_zeroshot/user_encoder.safetensors", "re-run training")
    assert not (tmp_path / "recs.parquet").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folder", "file"])
def test_cli_export_refuses_a_bad_layout_before_loading_the_model(tmp_path, layout):
    """``layout=folder`` (no such layout), or ``layout=file`` onto an existing folder: refused by
    name before the model is resolved (the model URI here does not even exist)."""
    from reliability_support import run_recommend

    (tmp_path / "recs.parquet").mkdir()
    proc = run_recommend(
        tmp_path,
        f"model_uri={tmp_path / 'no-such-pipeline'}",
        f"output={tmp_path / 'recs.parquet'}",
        f"layout={layout}",
    )
    expected = "layout must be one of ['file', 'parts'], got 'folder'" if layout == "folder" else "is a folder"
    assert_clean_failure(proc, expected)
    assert "no-such-pipeline" not in proc.stderr + proc.stdout
    assert list((tmp_path / "recs.parquet").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("parallel=fork", "parallel must be one of ['threads', 'processes'], got 'fork'"),
        ("workers=0", "workers must be a whole number >= 1, got 0"),
        ("chunk_size=many", "chunk_size must be a whole number >= 1, got 'many'"),
        ("k=2.5", "k must be a whole number >= 1, got 2.5"),
        ("k=true", "k must be a whole number >= 1, got True"),
        ("histories_mode=append", "histories_mode must be one of ['extend', 'replace'], got 'append'"),
        ("column_map=customer", "column_map must be null (the model's data.column_map) or a mapping"),
    ],
)
def test_cli_export_refuses_bad_settings_before_loading_the_model(tmp_path, override, expected):
    """Refused by name before the model is resolved (the model URI here does not even exist),
    not as a traceback after loading it."""
    from reliability_support import run_recommend

    proc = run_recommend(
        tmp_path, f"model_uri={tmp_path / 'no-such-pipeline'}", f"output={tmp_path / 'r.parquet'}", override
    )
    assert_clean_failure(proc, expected)
    assert "no-such-pipeline" not in proc.stderr + proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_given_as_model_uri_points_at_the_pipeline_inside(tmp_path):
    """``model_uri=outputs/<date>`` (the run folder, not its ``pipeline/``): the error names the
    saved pipeline one level down, before MLflow reads the path as an artifact URI."""
    from recsys.recommend import resolve_model

    run = tmp_path / "2026-12-05_10-00-00"
    (run / "pipeline").mkdir(parents=True)
    (run / "pipeline" / "meta.json").write_text("{}")
    with pytest.raises(InputError, match=f"is a folder but not a saved pipeline: use model_uri={run / 'pipeline'}"):
        resolve_model(str(run), None)
    with pytest.raises(InputError, match=r"is a folder but not a saved pipeline \(no meta.json in it\)"):
        resolve_model(str(tmp_path), None)  # a folder holding neither
    assert resolve_model(str(run / "pipeline"), None)[0] == run / "pipeline"
