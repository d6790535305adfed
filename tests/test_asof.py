"""Leave-last-out without a time leak: every time-dependent feature as of the user's own cut."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.cf.models import Popularity
from recsys.columns import Columns
from recsys.pipeline import stage_history
from recsys.rank.candidates import rank_column
from recsys.rank.features import DAY, build_features, item_statistics, item_statistics_at
from recsys.recommender import History


def events(rows: list[tuple[int, int, float]], weight: float = 1.0) -> pl.DataFrame:
    """``(user, item, day)`` rows as a history frame sorted by user, time."""
    return pl.DataFrame(
        {
            Columns.UserIdx: [r[0] for r in rows],
            Columns.ItemIdx: [r[1] for r in rows],
            Columns.Timestamp: [int(r[2] * DAY) for r in rows],
            Columns.Weight: [weight] * len(rows),
        },
        schema={
            Columns.UserIdx: pl.Int64,
            Columns.ItemIdx: pl.Int64,
            Columns.Timestamp: pl.Int64,
            Columns.Weight: pl.Float32,
        },
    ).sort(Columns.UserIdx, Columns.Timestamp)


def leaky_world() -> tuple[History, pl.DataFrame]:
    """User 0 is held out on day 10. Before it, item 1 was the hit; from day 100 on, item 2 is
    (users 1-4, whose own held-out events come much later). Item 3 is only bought after day 100."""
    rows = [(0, 0, 1), (0, 1, 9)]
    rows += [(u, 1, 5 + u) for u in (1, 2)]
    rows += [(u, 2, 100 + d) for u in range(1, 5) for d in (0, 1)]
    rows += [(u, 3, 101) for u in (3, 4)]
    train = events(rows)
    targets = events([(0, 2, 10)] + [(u, 0, 200) for u in range(1, 5)])
    return History(train, 5, 4), targets


def test_under_leave_last_out_no_feature_sees_an_event_after_the_held_out_one():
    history, targets = leaky_world()
    staged = stage_history(history, targets)
    assert staged.user_now is not None and staged.user_now[0] == int(10 * DAY) - 1

    pop = Popularity(window_days=7).fit(staged)
    leaky = Popularity(window_days=7).fit(history)
    # The leak would change the ranking: as of the history's end, item 2 is the recent hit; as of
    # user 0's own day 10, items 1 (days 6, 7, 9) leads and item 2 has not been bought yet.
    assert int(np.argmax(leaky.score_users(np.array([0]))[0])) == 2
    assert pop.score_users(np.array([0]))[0].tolist() == [0.0, 3.0, 0.0, 0.0]

    cands = pl.DataFrame(
        {
            Columns.UserIdx: np.zeros(4, dtype=np.int32),
            Columns.ItemIdx: np.arange(4, dtype=np.int32),
            rank_column("recent_popularity"): np.arange(1, 5, dtype=np.int32),
        }
    )
    df = build_features(cands, staged, {"recent_popularity": pop}, ["recent_popularity"])
    cut = staged.user_now[0]
    visible = history.interactions.filter(pl.col(Columns.Timestamp) <= cut)
    counts = np.bincount(visible[Columns.ItemIdx].to_numpy(), minlength=4)
    assert df["item_events"].to_list() == counts.tolist() == [1, 3, 0, 0]
    assert df["item_idle_days"].to_list()[2:] == [None, None]  # items 2, 3: first bought after the cut
    assert df["item_age_days"].to_list()[:2] == pytest.approx([(cut - DAY) / DAY, (cut - 6 * DAY) / DAY])
    assert df["item_events_14d"].to_list() == [1, 3, 0, 0]
    assert df["user_idle_days"].to_list() == pytest.approx([(cut - 9 * DAY) / DAY] * 4)
    assert df["score_recent_popularity"].to_list() == [0.0, 3.0, 0.0, 0.0]
    # Without the cut the same features would have seen items 2 and 3 selling after day 100.
    leak = build_features(cands, history, {"recent_popularity": leaky}, ["recent_popularity"])
    assert leak["item_events"].to_list() == [1, 3, 8, 2]


def test_a_global_cut_leaves_the_history_as_it_is():
    history, _ = leaky_world()
    later = events([(u, 0, 300) for u in range(5)])
    assert stage_history(history, later).user_now is None


def test_item_statistics_are_the_as_of_statistics_at_the_end():
    history, _ = leaky_world()
    end = int(history.interactions[Columns.Timestamp].max())
    table = item_statistics(history)
    pairs = item_statistics_at(history, np.arange(4), np.full(4, end))
    for name, col in pairs.items():
        assert table[name].to_list() == col.to_list(), name


@pytest.mark.parametrize(("window", "half_life"), [(None, None), (3.0, None), (None, 2.0), (30.0, 5.0)])
def test_popularity_as_of_matches_a_direct_count(window, half_life):
    rng = np.random.default_rng(0)
    n_users = 300  # more distinct cuts than Popularity sums at once
    rows = [
        (int(u), int(i), float(d))
        for u, i, d in zip(
            rng.integers(0, n_users, 900), rng.integers(0, 15, 900), rng.uniform(0, 60, 900), strict=True
        )
    ]
    train = events(rows)
    now = rng.integers(0, int(70 * DAY), n_users)
    model = Popularity(window_days=window, half_life_days=half_life)
    got = model.fit(History(train, n_users, 15, user_now=now)).score_users(np.arange(n_users))
    ts = train[Columns.Timestamp].to_numpy()
    items = train[Columns.ItemIdx].to_numpy()
    for u in range(n_users):
        keep = ts <= now[u]
        if window is not None:
            keep &= ts >= now[u] - int(window * DAY)
        w = np.ones(len(ts)) if half_life is None else 0.5 ** ((now[u] - ts) / (half_life * DAY))
        want = np.bincount(items[keep], weights=w[keep], minlength=15)
        np.testing.assert_allclose(got[u], want, rtol=1e-5, atol=1e-5)
