"""The generated data set's sampler draws what its documented weights say, without repeats."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.columns import Columns
from recsys.data.synthetic import ItemSampler, generate

# Two topics; topic 0 holds five items, two of them late (released at 0.95 and 0.97).
TOPIC = np.array([0, 0, 0, 0, 0, 1, 1])
GROUP = np.array([0, 1, 0, 1, 0, 0, 1])
FACET = np.array([0, 0, 1, 2, 0, 1, 2])
POP = np.array([1.0, 2.0, 0.5, 3.0, 1.5, 1.0, 1.0])
RELEASE = np.array([0.0, 0.0, 0.0, 0.95, 0.97, 0.0, 0.0])


def sampler() -> ItemSampler:
    return ItemSampler(TOPIC, GROUP, FACET, POP, RELEASE, 2, 2, group_affinity=4.0, facet_affinity=6.0)


def documented_weights(topic: int, group: int, facet: int, t: float) -> np.ndarray:
    """The weights as the docstring states them, written out independently of the cumulative sums."""
    w = POP * np.where(group == GROUP, 4.0, 1.0) * np.where(facet == FACET, 6.0, 1.0)
    fresh = (RELEASE > 0) & (t - RELEASE < 0.03)
    w = w * (t >= RELEASE) * np.where(fresh, 6.0, 1.0) * (topic == TOPIC)
    return w / w.sum()


def test_draws_follow_the_documented_weights_at_every_time():
    rng = np.random.default_rng(0)
    n = 200_000
    # Before any release, while item 3 is fresh and item 4 not out, both fresh, item 3 stale.
    for t, group, facet in ((0.5, 0, 0), (0.96, 1, 2), (0.975, 0, 0), (0.99, 1, 0)):
        drawn = sampler().draw(rng, np.zeros(n, dtype=np.int64), np.full(n, group * 3 + facet), np.full(n, t))
        freq = np.bincount(drawn, minlength=len(TOPIC)) / n
        expected = documented_weights(0, group, facet, t)
        assert np.abs(freq - expected).sum() / 2 < 0.01, (t, freq.round(3), expected.round(3))


def test_topic_with_nothing_released_gives_no_item():
    topic = np.array([0, 1])
    release = np.array([0.0, 0.9])
    s = ItemSampler(topic, np.zeros(2, int), np.zeros(2, int), np.ones(2), release, 2, 1, 4.0, 6.0)
    drawn = s.draw(np.random.default_rng(0), np.array([1, 1, 0]), np.zeros(3, int), np.array([0.5, 0.95, 0.5]))
    assert drawn.tolist() == [-1, 1, 0]


def test_second_event_is_drawn_from_the_weights_without_the_first_item():
    """Rejection of repeats must give exactly w_b / (W - w_a) for the second item, given the first a."""
    rng = np.random.default_rng(1)
    users = 60_000
    n_events = np.full(users, 2)
    start = np.arange(users) * 2
    cls = np.full(2 * users, 0)  # group 0, facet 0
    item = sampler().draw_without_repeats(rng, np.zeros(2 * users, int), cls, np.full(2 * users, 0.5), n_events, start)
    first, second = item[0::2], item[1::2]
    assert (first != second).all()
    w = documented_weights(0, 0, 0, 0.5)
    joint = np.zeros((len(w), len(w)))
    np.add.at(joint, (first, second), 1.0 / users)
    expected = w[:, None] * w[None, :] / np.where(w < 1, 1 - w, 1)[:, None]
    np.fill_diagonal(expected, 0.0)
    assert np.abs(joint - expected).sum() / 2 < 0.02


def test_users_who_exhaust_a_topic_get_no_repeats_and_lose_those_events():
    # Ten items over ten topics and users with ~25 events: most draws must fall back to the exact
    # sampler or find nothing left to pick.
    inter, items = generate(n_users=30, n_items=10, mean_events=25.0, seed=2)
    assert inter.height > 0
    assert inter.height == inter.select(Columns.User, Columns.Item).unique().height
    listed = inter.join(items.select(Columns.Item, Columns.AvailableFrom), on=Columns.Item)
    assert listed.filter(pl.col(Columns.AvailableFrom) > pl.col(Columns.Timestamp)).height == 0


def test_generated_events_are_in_time_order_per_user_with_two_final_week_visits():
    inter, _ = generate(n_users=200, n_items=1500, seed=3)  # enough items per topic that no visit is lost
    assert inter.equals(inter.sort(Columns.User, Columns.Timestamp, maintain_order=True))
    span = 180 * 24 * 3600
    last_two = inter.group_by(Columns.User).agg(pl.col(Columns.Timestamp).sort().tail(2).min())
    assert (last_two[Columns.Timestamp] >= 1_700_000_000 + int(0.95 * span)).mean() > 0.98


def test_the_world_replays_the_generated_data_and_its_probabilities_explain_the_last_events(tmp_path):
    """``GeneratedDataSource.world()`` replays the hidden state (the items it writes are the data
    set's), its next-event probabilities sum to one, and the true world gives each user's last
    event a higher likelihood than worlds with one setting changed: the ceiling scorer of
    ``bench/text_ceiling.py`` is the generator's own distribution, not an approximation of it."""
    from dataclasses import replace

    from recsys.data.synthetic import BASE_TS, SPAN, GeneratedDataSource

    source = GeneratedDataSource(str(tmp_path), n_users=3000, n_items=120, seed=5)
    data = source.load()
    world = source.world()
    items = world.items_frame()
    assert items[Columns.Item].to_list() == data.items[Columns.Item].to_list()
    assert items["title"].to_list() == data.items["title"].to_list()

    events = (
        data.interactions.with_columns(pl.col(Columns.User).str.slice(1).cast(pl.Int64).alias("u"))
        .with_columns(pl.col(Columns.Item).str.slice(1).cast(pl.Int64).alias("i"))
        .group_by("u", maintain_order=True)
        .agg("i", pl.col(Columns.Timestamp).last().alias("ts"))
    )
    users = events["u"].to_numpy()
    histories = [np.array(h, dtype=np.int64) for h in events["i"].to_list()]
    last = np.array([h[-1] for h in histories])
    t = (events["ts"].to_numpy() - BASE_TS) / SPAN
    seen = [h[:-1] for h in histories]

    def mean_log_likelihood(w) -> float:
        return float(w.next_event_log_probs(users, t, seen)[np.arange(len(users)), last].mean())

    logp = world.next_event_log_probs(users, t, seen)
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, rtol=1e-9)
    assert np.isfinite(logp[np.arange(len(users)), last]).all()  # every real event was possible
    assert np.isneginf(logp[0, seen[0]]).all()  # a user's earlier items cannot come again

    # Calibrated: as many last events fall on fresh, same-group and same-facet items as predicted.
    probs = np.exp(logp)
    fresh = (world.release[None, :] > 0) & (t[:, None] - world.release[None, :] < 0.03)
    for in_class in (
        fresh,
        world.item_group[None, :] == world.user_group[users][:, None],
        world.item_facet[None, :] == world.user_facet[users][:, None],
    ):
        p_class = (probs * in_class).sum(axis=1)
        observed = in_class[np.arange(len(users)), last].sum()
        assert abs(observed - p_class.sum()) < 4 * np.sqrt((p_class * (1 - p_class)).sum())

    true = mean_log_likelihood(world)
    for changed in (
        replace(world, group_affinity=world.group_affinity / 2),
        replace(world, group_affinity=world.group_affinity * 2),
        replace(world, facet_affinity=world.facet_affinity / 2),
        replace(world, facet_affinity=world.facet_affinity * 2),
        replace(world, topic_noise=0.3),
        replace(world, user_group=np.roll(world.user_group, 1)),
        replace(world, release=np.zeros_like(world.release)),  # no release times: no freshness
    ):
        assert mean_log_likelihood(changed) < true


def test_the_posterior_oracle_infers_each_users_hidden_class_from_the_history(tmp_path):
    """``bench/generator_oracle.py``'s ``PosteriorOracle`` knows the items but not the users: from
    a user's history alone it puts most of its posterior on the user's true taste group and facet
    and main topic, and its predictive probabilities over the items the user can still pick sum
    to one."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from generator_oracle import PosteriorOracle

    from recsys.data.synthetic import GeneratedDataSource
    from recsys.recommender import History

    source = GeneratedDataSource(str(tmp_path), n_users=3000, n_items=1500, seed=5)
    data = source.load()
    world = source.world()
    df = data.interactions.sort(Columns.UserIdx, Columns.Timestamp)
    last = df.group_by(Columns.UserIdx, maintain_order=True).last()
    history = History(df.join(last, on=[Columns.UserIdx, Columns.Timestamp], how="anti"), data.n_users, data.n_items)
    oracle = PosteriorOracle(world, data, last).fit(history)
    n_events = np.diff(history.matrix.indptr)
    long = n_events >= 20
    truth = world.user_group[oracle.user_number] * 3 + world.user_facet[oracle.user_number]
    guess = oracle.post_gf.reshape(data.n_users, -1).argmax(axis=1)
    assert long.sum() > 300 and (guess == truth)[long].mean() > 0.8  # 12 classes: chance is 0.08
    main = world.user_topics[oracle.user_number, 0]
    assert (oracle.topic_share.argmax(axis=1) == main)[long].mean() > 0.9
    users = np.arange(200)
    p = np.exp(oracle.score_users(users).astype(np.float64))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-4)


def test_group_brands_change_only_titles_and_tell_the_taste_group(tmp_path):
    """``group_brand_share`` rewrites the brand (a title's first word) of that share of the items
    to a brand of their hidden taste group; the events and every other text stay the same draws,
    the default data set keeps its cache folder, and an impossible share is refused up front."""
    from recsys.data.synthetic import GeneratedDataSource
    from recsys.errors import ConfigError

    plain = GeneratedDataSource(str(tmp_path), n_users=400, n_items=300, seed=3)
    branded = GeneratedDataSource(str(tmp_path), n_users=400, n_items=300, seed=3, group_brand_share=1.0)
    half = GeneratedDataSource(str(tmp_path), n_users=400, n_items=300, seed=3, group_brand_share=0.5)
    assert (
        plain.paths()
        == GeneratedDataSource(str(tmp_path), n_users=400, n_items=300, seed=3, group_brand_share=0.0).paths()
    )
    assert len({plain.paths(), branded.paths(), half.paths()}) == 3
    a, b, c = plain.load(), branded.load(), half.load()
    cols = [Columns.User, Columns.Item, Columns.Timestamp, Columns.Event]
    assert a.interactions.select(cols).equals(b.interactions.select(cols))
    assert a.items["description"].to_list() == b.items["description"].to_list()
    rest = [t.split(" ", 1)[1] for t in a.items["title"]]
    assert rest == [t.split(" ", 1)[1] for t in b.items["title"]]

    group = branded.world().item_group

    def brand_purity(titles) -> float:  # share of items whose brand's most common group is theirs
        brand = np.array([t.split(" ", 1)[0] for t in titles])
        frame = pl.DataFrame({"brand": brand, "group": group})
        top = frame.group_by("brand").agg(pl.col("group").mode().first().alias("top"))
        return float((frame.join(top, on="brand")["top"] == frame["group"]).mean())

    # Random brands name a group by chance only (with ~7 items a brand, the mode fits some by luck).
    assert brand_purity(b.items["title"]) == 1.0
    assert brand_purity(a.items["title"]) < 0.6
    assert brand_purity(a.items["title"]) < brand_purity(c.items["title"]) < brand_purity(b.items["title"])
    for bad in (1.5, -0.1, float("nan"), "half"):
        with pytest.raises(ConfigError, match="group_brand_share"):
            GeneratedDataSource(str(tmp_path), group_brand_share=bad)
