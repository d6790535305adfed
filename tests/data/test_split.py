"""Splits: disjoint, complete, in time order, and no stage ever sees the events it is judged on."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.cf import ItemKNN, Popularity
from recsys.columns import Columns
from recsys.data import GlobalTimeSplit, LeaveLastOutSplit
from recsys.data.split import Split
from recsys.errors import ConfigError, InputError
from recsys.pipeline import FusionStage, LabelledStage, check_split
from recsys.rank.ranker import LambdaMARTRanker
from recsys.recommender import History


def with_ids(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_row_index("_event_id")


def event_ids(df: pl.DataFrame) -> set[int]:
    return set(df["_event_id"].to_list())


def check_partition(interactions: pl.DataFrame, split: Split) -> None:
    train, val, test = event_ids(split.train), event_ids(split.val), event_ids(split.test)
    assert not train & val and not train & test and not val & test
    assert train | val | test == event_ids(interactions)
    assert split.train.height + split.val.height + split.test.height == interactions.height
    for part in (split.train, split.val, split.test):
        assert part.equals(part.sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True))


@pytest.fixture
def events(tiny_dataset) -> pl.DataFrame:
    return with_ids(tiny_dataset.interactions)


def test_leave_last_out_parts(events):
    split = LeaveLastOutSplit(n_val=1, n_test=1, min_train=1).split(events)
    check_partition(events, split)
    # Brute force, user by user: test = the events of the last timestamp, val = of the one before.
    for (u,), user_events in events.group_by(Columns.UserIdx):
        times = sorted(set(user_events[Columns.Timestamp].to_list()))
        at = {t: set(user_events.filter(pl.col(Columns.Timestamp) == t)["_event_id"].to_list()) for t in times}
        test = set(split.test.filter(pl.col(Columns.UserIdx) == u)["_event_id"].to_list())
        val = set(split.val.filter(pl.col(Columns.UserIdx) == u)["_event_id"].to_list())
        if len(times) >= 3:
            assert test == at[times[-1]] and val == at[times[-2]]
        else:
            assert test == set() and val == set()


def test_leave_last_out_several_and_short_users():
    df = with_ids(
        pl.DataFrame(
            {
                Columns.UserIdx: [0] * 6 + [1] * 4 + [2] * 1,
                Columns.ItemIdx: [10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 30],
                Columns.Timestamp: [6, 1, 2, 3, 4, 5, 1, 2, 3, 4, 1],
            }
        )
    )
    split = LeaveLastOutSplit(n_val=2, n_test=2, min_train=1).split(df)
    check_partition(df, split)
    assert split.test[Columns.ItemIdx].to_list() == [15, 10]  # the two latest events of user 0, by time
    assert split.val[Columns.ItemIdx].to_list() == [13, 14]
    # Users 1 (4 events < 2 + 2 + 1) and 2 keep everything in train.
    assert split.train[Columns.ItemIdx].to_list() == [11, 12, 20, 21, 22, 23, 30]
    assert split.describe()["test_users"] == 1


def test_leave_last_out_holds_out_a_moment_whole(tmp_path):
    """Events sharing the user's last timestamp (a batch of ratings, one impression's clicks) are
    all test targets: none stays in the history the models read at that moment."""
    from recsys.data import FileDataSource
    from recsys.pipeline import earlier_stages

    (tmp_path / "e.csv").write_text(
        "user_id,item_id,timestamp,event\n"
        "u,C,5,click\nu,A,5,click\nu,B,5,click\nu,D,1,click\nu,E,3,click\nu,F,3,click\nu,G,2,click\n"
        "v,A,7,click\nv,B,7,click\nv,C,7,click\nv,D,8,click\n"  # two moments: not evaluated
    )
    (tmp_path / "i.csv").write_text("item_id,title,description\n" + "".join(f"{c},{c},x\n" for c in "ABCDEFG"))
    data = FileDataSource(str(tmp_path / "e.csv"), str(tmp_path / "i.csv")).load()
    events = with_ids(data.interactions)
    split = LeaveLastOutSplit().split(events)
    check_partition(events, split)
    assert split.test[Columns.Item].to_list() == ["C", "A", "B"]  # the t=5 moment, in file order
    assert split.val[Columns.Item].to_list() == ["E", "F"]
    assert split.train[Columns.Item].to_list() == ["D", "G", "A", "B", "C", "D"]
    # The ranker's earlier labelled stage cuts the training history the same way.
    ((history, targets),) = earlier_stages(split.train, 1)
    assert targets[Columns.Item].to_list() == ["G", "D"]  # u's t=2, v's t=8 (after its t=7 moment)
    assert history[Columns.Item].to_list() == ["D", "A", "B", "C"]


def test_global_time_split(events):
    s = GlobalTimeSplit(val_quantile=0.7, test_quantile=0.85)
    split = s.split(events)
    check_partition(events, split)
    assert split.train[Columns.Timestamp].max() < split.val[Columns.Timestamp].min()
    assert split.val[Columns.Timestamp].max() < split.test[Columns.Timestamp].min()
    n = events.height
    assert 0.6 * n < split.train.height < 0.8 * n
    assert 0.05 * n < split.test.height < 0.25 * n


def test_global_time_split_keeps_undated_events_in_train():
    """Events without a time of their own (MIND's history clicks) are never targets: their
    stand-in times neither place them after a cut nor move the cut points."""
    late = 1_000  # stand-ins of a user first seen late, after every dated event
    df = with_ids(
        pl.DataFrame(
            {
                Columns.UserIdx: [0] * 10 + [1] * 30,
                Columns.ItemIdx: list(range(40)),
                Columns.Timestamp: list(range(1, 11)) + list(range(late, late + 30)),
                Columns.Dated: [True] * 10 + [False] * 29 + [True],
            }
        )
    )
    split = GlobalTimeSplit(val_quantile=0.7, test_quantile=0.8).split(df)
    check_partition(df, split)
    undated = event_ids(df.filter(~pl.col(Columns.Dated)))
    assert undated <= event_ids(split.train)
    # Cut on the 11 dated times (1..10 and the late user's impression): quantiles of those alone.
    assert split.val[Columns.Timestamp].to_list() == [8]
    assert split.test[Columns.Timestamp].to_list() == [9, 10, late + 29]
    counts = split.describe()
    assert [counts[f"{part}_undated_events"] for part in ("train", "val", "test")] == [29, 0, 0]
    # Without the column every event is dated (the cut on all 40 times puts the stand-ins in test).
    plain = GlobalTimeSplit(val_quantile=0.7, test_quantile=0.8).split(df.drop(Columns.Dated))
    assert not event_ids(plain.test) <= event_ids(df.filter(pl.col(Columns.Dated)))
    assert "train_undated_events" not in plain.describe()


def test_global_time_split_needs_dated_events():
    df = pl.DataFrame({Columns.UserIdx: [0, 0], Columns.Timestamp: [1, 2], Columns.Dated: [False, False]})
    with pytest.raises(InputError, match="split=global_time .* no event has one") as info:
        GlobalTimeSplit().split(df)
    assert info.value.column == Columns.Dated and "split=leave_last_out" in str(info.value)
    for bad in ([True, None], ["yes", "no"]):
        with pytest.raises(InputError, match="must be true or false"):
            GlobalTimeSplit().split(df.with_columns(pl.Series(Columns.Dated, bad)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: LeaveLastOutSplit(n_val=-1),
        lambda: LeaveLastOutSplit(n_test=0),
        lambda: GlobalTimeSplit(0.9, 0.8),
        lambda: GlobalTimeSplit(0.0, 0.5),
    ],
)
def test_bad_split_settings(make):
    with pytest.raises(ConfigError):
        make()


# --- leakage: built exactly as recsys/train.py builds each stage ----------------------------------


class SpyRanker(LambdaMARTRanker):
    """Records the frame the fusion ranker is trained on."""

    def fit(self, frame, features, label="label"):
        self.seen_frame = frame
        return super().fit(frame, features, label)


def pairs(df: pl.DataFrame) -> set[tuple[int, int]]:
    return set(zip(df[Columns.UserIdx].to_list(), df[Columns.ItemIdx].to_list(), strict=True))


@pytest.mark.parametrize("splitter", [LeaveLastOutSplit(), GlobalTimeSplit(0.7, 0.85)], ids=["leave_last_out", "time"])
def test_no_stage_sees_its_targets(tiny_dataset, splitter):
    data = tiny_dataset
    events = with_ids(data.interactions)
    split = splitter.split(events)
    val_users, test_users = check_split(data, split)

    hist_val = History(split.train, data.n_users, data.n_items)
    hist_test = hist_val.extend(split.val)
    test_ids, val_ids = event_ids(split.test), event_ids(split.val)
    assert not event_ids(hist_val.interactions) & (test_ids | val_ids)
    assert not event_ids(hist_test.interactions) & test_ids
    assert event_ids(hist_test.interactions) == event_ids(split.train) | val_ids
    # The matrices the models are fitted on (and that remove seen items) hold no test pair.
    test_pairs = pairs(split.test) - pairs(split.train) - pairs(split.val)
    for hist in (hist_val, hist_test):
        m = hist.matrix
        assert all(m[u, i] == 0 for u, i in test_pairs)
    assert all(hist_val.matrix[u, i] == 0 for u, i in pairs(split.val) - pairs(split.train))

    # The fusion ranker learns from the validation stage only: labels = split.val, never test.
    models = {"popularity": Popularity().fit(hist_val), "itemknn": ItemKNN(neighbours=20).fit(hist_val)}
    ranker = SpyRanker(n_estimators=5, min_child_samples=1, early_stopping_fraction=0.0)
    FusionStage({"itemknn": 20, "popularity": 20}, ranker).fit(LabelledStage(val_users, models, hist_val, split.val))
    frame = ranker.seen_frame
    labelled = pairs(frame.filter(pl.col("label") == 1))
    assert labelled, "no validation target among the candidates: the check below would be vacuous"
    assert labelled <= pairs(split.val)
    assert not labelled & test_pairs
    assert set(frame[Columns.UserIdx].to_list()) <= set(val_users.tolist())
    # Candidates never include what the validation-stage history has seen.
    assert not pairs(frame) & pairs(split.train)
    assert len(test_users) > 0


def test_text_tower_trains_on_train_and_validates_on_val(tiny_dataset):
    import torch

    from recsys.text.datamodule import TextDataModule

    data = tiny_dataset
    split = LeaveLastOutSplit().split(data.interactions)
    hist_val = History(split.train, data.n_users, data.n_items)
    n = data.n_items
    dm = TextDataModule(
        item_ids=torch.zeros((n, 4), dtype=torch.int32),
        item_lengths=torch.full((n,), 2, dtype=torch.int32),
        train=hist_val,
        val=split.val,
        batch_size=1000,
        steps_per_epoch=1,
    )
    train_pairs = pairs(split.train)
    # Every next-item example (history -> target) comes from the training events.
    ex = dm.examples
    example_pairs = set()
    for j in range(len(ex)):
        p = ex.positions[j]
        hist, target, _, _ = ex[j]
        u = int(split.train[Columns.UserIdx][int(p)])
        example_pairs.add((u, target))
        assert {(u, int(i)) for i in hist} <= train_pairs
    assert example_pairs <= train_pairs
    # Validation batches score exactly the validation targets, with the full train history as "seen".
    val_rows = split.val.sort(Columns.UserIdx, Columns.Timestamp)
    j = 0
    for batch in dm.val_dataloader():
        for seen, target in zip(batch["seen"], batch["targets"], strict=True):
            u, item = val_rows[Columns.UserIdx][j], val_rows[Columns.ItemIdx][j]
            assert int(target) == item
            assert seen[seen >= 0].tolist() == hist_val.sequences[u].tolist()
            j += 1
    assert j == split.val.height


def test_history_extend_keeps_time_order(tiny_dataset):
    data = tiny_dataset
    split = LeaveLastOutSplit().split(data.interactions)
    hist = History(split.train, data.n_users, data.n_items).extend(split.val)
    df = hist.interactions
    assert df.equals(df.sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True))
    # sequences: per user, items in time order; the validation item is each evaluated user's last.
    last = {int(u): int(i) for u, i in zip(split.val[Columns.UserIdx], split.val[Columns.ItemIdx], strict=True)}
    for u, item in last.items():
        assert int(hist.sequences[u][-1]) == item
    assert sum(len(s) for s in hist.sequences) == df.height
    assert np.array_equal(hist.item_counts, np.bincount(df[Columns.ItemIdx].to_numpy(), minlength=data.n_items))
