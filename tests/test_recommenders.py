"""One shared test for every ``Recommender`` (in the spirit of implicit's recommender_base_test).

Each implementation is fitted on the block world of ``conftest.py``: 4 blocks of 25 items, 20
users per block, each user consumed 8 items of its own block. The answer is known: a CF model
(or a fine-tuned text tower, whose item texts carry the block's topic words) must recommend a
user's own block first.
"""

from __future__ import annotations

import inspect

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys.cf import ALS, BPR, EASE, ItemKNN, Popularity, SASRec, SequentialKNN
from recsys.cf.models import fold_in, top_per_dense_row, top_per_row
from recsys.cf.sasrec import right_aligned, text_start
from recsys.columns import Columns
from recsys.errors import ConfigError
from recsys.pipeline import HybridPipeline
from recsys.recommender import (
    BLOCK_CELLS,
    DERIVED_SOURCES,
    History,
    ModelUpdate,
    NearestText,
    NewItemText,
    PopularText,
    Recommender,
    Updatable,
    derived_models,
)
from recsys.text.recommender import TextRecommender
from recsys.topk import top_k


def fit_text(request, trained: bool, history: History) -> Recommender:
    untrained_net, trained_net, ids, lengths = request.getfixturevalue("block_towers")
    net = trained_net if trained else untrained_net
    return TextRecommender.from_tokens(net, ids, lengths).fit(history)


MODELS = {
    "als": lambda h, r: ALS(factors=4, iterations=15, seed=0).fit(h),
    "bpr": lambda h, r: BPR(factors=8, iterations=100, seed=0).fit(h),
    "itemknn": lambda h, r: ItemKNN(neighbours=50).fit(h),
    "itemknn_recent": lambda h, r: ItemKNN(neighbours=50, recency_decay=0.5).fit(h),
    "itemknn_next": lambda h, r: SequentialKNN(neighbours=50).fit(h),
    "ease": lambda h, r: EASE(regularization=10.0, neighbours=50).fit(h),
    "sasrec": lambda h, r: SASRec(dim=16, layers=1, max_history=8, dropout=0.1, epochs=100, seed=0).fit(h),
    "popularity": lambda h, r: Popularity().fit(h),
    "text": lambda h, r: fit_text(r, True, h),
    "text_untrained": lambda h, r: fit_text(r, False, h),
    "text_popular": lambda h, r: popular_text(fit_text(r, True, h), h),
    "text_nearest": lambda h, r: NearestText(fit_text(r, True, h), 5).fit(h),
}
# Models that must find the blocks (popularity and an untrained tower cannot).
KNOWS_BLOCKS = {
    "als",
    "bpr",
    "ease",
    "itemknn",
    "itemknn_next",
    "itemknn_recent",
    "sasrec",
    "text",
    "text_popular",
    "text_nearest",
}


def popular_text(text: TextRecommender, history: History) -> PopularText:
    return PopularText(text, text.net.temperature).fit(history)


@pytest.fixture(params=list(MODELS))
def fitted(request, block_world) -> tuple[str, Recommender]:
    name = request.param
    return name, MODELS[name](block_world.history, request)


@pytest.fixture(params=sorted(KNOWS_BLOCKS))
def block_model(request, block_world) -> tuple[str, Recommender]:
    name = request.param
    return name, MODELS[name](block_world.history, request)


def events(users: list[int], items: list[int], times: list[int]) -> pl.DataFrame:
    """One unit-weight event per (user, item, time)."""
    return pl.DataFrame(
        {
            Columns.UserIdx: users,
            Columns.ItemIdx: items,
            Columns.Timestamp: times,
            Columns.Weight: [1.0] * len(users),
        }
    )


def brute_force_top(scores: np.ndarray, seen: np.ndarray | None, k: int) -> np.ndarray:
    """Top-k score values per row by a plain sort, seen items removed."""
    s = scores.astype(np.float64).copy()
    if seen is not None:
        s[seen] = -np.inf
    return -np.sort(-s, axis=1)[:, :k]


def test_recommend_is_best_first_with_k_columns(fitted, block_world):
    name, model = fitted
    users = np.arange(block_world.n_users)
    k = 7
    items, scores = model.recommend(users, k)
    assert items.shape == scores.shape == (len(users), k)
    assert np.all(np.diff(scores, axis=1) <= 0), "not best first"
    full = model.score_users(users)
    assert full.shape == (len(users), block_world.n_items)
    np.testing.assert_allclose(scores, np.take_along_axis(full, items, 1), rtol=1e-6)
    np.testing.assert_allclose(scores, brute_force_top(full, None, k), rtol=1e-5, atol=1e-6)
    assert all(len(set(row)) == k for row in items.tolist())


def test_recommend_excludes_seen(fitted, block_world):
    name, model = fitted
    h = block_world.history
    users = np.arange(h.n_users)
    k = 10
    items, scores = model.recommend(users, k, exclude=h.matrix)
    seen = h.matrix.toarray() > 0
    assert not np.take_along_axis(seen[users], items, 1).any(), "a seen item was recommended"
    assert np.isfinite(scores).all()  # every user has >= k unseen items
    full = model.score_users(users)
    np.testing.assert_allclose(scores, brute_force_top(full, seen, k), rtol=1e-5, atol=1e-6)
    # Chunking changes nothing.
    items_c, scores_c = model.recommend(users, k, exclude=h.matrix, chunk=7)
    np.testing.assert_allclose(scores_c, scores, rtol=1e-6)  # BLAS may round another block size differently
    assert not np.take_along_axis(seen[users], items_c, 1).any()


def test_a_user_without_history_gets_no_list_from_a_model_that_reads_histories(request, block_world):
    """Regression: ALS, item-kNN and the text tower scored a user with no event all alike, and the
    top-N's tie rule made their list the first items of the catalogue (counted in evaluation,
    proposed as candidates, exported). Such a user gets no list and missing features; a model
    that reads no history (popularity) still lists them."""
    from recsys.rank.candidates import ScoreBlock, generate_candidates
    from recsys.rank.features import build_features

    h = block_world.history
    with_empty = History(h.interactions, h.n_users + 2, h.n_items)  # users n, n+1: no event
    users = np.array([0, h.n_users, h.n_users + 1, 1])
    for name, make in MODELS.items():
        model = make(with_empty, request)
        items, scores = model.recommend(users, 5)
        reads = name != "popularity"
        assert np.isfinite(scores[[0, 3]]).all(), name
        assert np.isfinite(scores[[1, 2]]).any() != reads, name
        blank = model.users_without_history(users)
        assert (blank is not None and blank.tolist() == [False, True, True, False]) == reads, name
        block = ScoreBlock(model, users)
        cands = generate_candidates(users, {name: block}, {name: 5}, None)
        assert set(cands[Columns.UserIdx].to_list()) == ({0, 1} if reads else set(users.tolist())), name
    als = MODELS["als"](with_empty, request)
    pairs = pl.DataFrame({Columns.UserIdx: [0, 0, h.n_users, h.n_users], Columns.ItemIdx: [0, 1, 0, 1]})
    feats = build_features(pairs, with_empty, {"als": als}, [])
    assert feats["score_als"].is_nan().to_list() == [False, False, True, True]


@pytest.mark.parametrize("model", [ALS(factors=4, iterations=3, seed=0), ItemKNN(neighbours=5)])
def test_later_blocks_are_scored_into_one_kept_array(block_world, model):
    """Block after block, a model that writes into given memory gets the same array (a fresh
    one is page-faulted in each time: 154 MB a block at 150,000 items), and its lists, masked
    in place there, equal those of one block of every user."""
    h = block_world.history
    model.fit(h)
    users = np.arange(h.n_users)
    _, want_scores = model.recommend(users, 10, exclude=h.matrix, chunk=h.n_users)
    outs = []
    score_users = model.score_users

    def recording(users, out=None):
        outs.append(out)
        return score_users(users, out=out)

    model.score_users = recording
    items, scores = model.recommend(users, 10, exclude=h.matrix, chunk=7)
    assert outs[0] is None and len(outs) == -(-h.n_users // 7) > 2
    assert all(np.shares_memory(o, outs[1]) for o in outs[2:])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)  # BLAS may round another block size differently
    assert not np.take_along_axis(h.matrix.toarray() > 0, items, 1).any()


@pytest.mark.parametrize("cold_share", [0.02, 0.5])
def test_new_item_text_keeps_the_base_scores_of_cold_items_only(cold_share):
    """``text_new``'s block: the base's scores where an item is cold, -inf elsewhere, whether
    built by a mask over a copy (many cold items) or from the cold columns alone (few), into
    given memory or not; the base block is left as it was."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((9, 400)).astype(np.float32)
    model = NewItemText(None)
    model.warm = rng.random(400) >= cold_share
    want = np.where(model.warm, -np.inf, base).astype(np.float32)
    before = base.copy()
    for out in (None, np.full_like(base, 7.0)):
        np.testing.assert_array_equal(model.derive_into(base, np.arange(9), out), want)
    np.testing.assert_array_equal(base, before)


@pytest.mark.parametrize("max_events", [0, 2])
@pytest.mark.parametrize(
    ("with_events", "n_events", "earliest_cut"),
    [(10, 300, 0), (390, 8000, 950)],  # many new items (copy and mask), few (their columns only)
)
def test_new_item_text_counts_each_users_new_items_as_of_their_cut(max_events, with_events, n_events, earliest_cut):
    """Regression: with per-user cuts (leave-last-out, ``eval.as_of_cut``) ``text_new`` counted
    the stage's events up to its end, so an item new at a user's cut that other users touched
    later left that user's pool (on MovieLens-100k 23 of 38 test targets new at the cut)."""
    rng = np.random.default_rng(3)
    n_users, n_items = 12, 400
    late = [390, 391, 391, 392, 392, 392] * 3  # first touched between the cuts
    df = events(
        rng.integers(0, n_users, n_events).tolist() + [0] * len(late),
        rng.integers(0, with_events, n_events).tolist() + late,  # items past 392: no event
        rng.integers(0, 1000, n_events).tolist() + rng.integers(960, 1000, len(late)).tolist(),
    ).sort(Columns.UserIdx, Columns.Timestamp)
    cuts = rng.integers(earliest_cut, 1000, n_users).astype(np.int64)
    history = History(df, n_users, n_items, user_now=cuts)
    model = NewItemText(None, max_events=max_events).fit(history)
    base = rng.standard_normal((n_users, n_items)).astype(np.float32)
    users = np.arange(n_users)
    item, ts = df[Columns.ItemIdx].to_numpy(), df[Columns.Timestamp].to_numpy()
    counts = np.array([[np.sum((item == i) & (ts <= cuts[u])) for i in range(n_items)] for u in users])
    want = np.where(counts > max_events, -np.inf, base).astype(np.float32)
    np.testing.assert_array_equal(model.derive_into(base, users), want)
    np.testing.assert_array_equal(model.derive(base.copy(), users), want)
    assert (counts <= max_events).sum() > (~model.warm).sum() * n_users  # the stage's end said fewer


def test_score_pairs_agrees_with_score_users(fitted, block_world):
    name, model = fitted
    rng = np.random.default_rng(0)
    users = rng.integers(0, block_world.n_users, 500)
    items = rng.integers(0, block_world.n_items, 500)
    full = model.score_users(np.arange(block_world.n_users))
    expected = full[users, items]
    np.testing.assert_allclose(model.score_pairs(users, items), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.score_pairs(users, items, chunk=3), expected, rtol=1e-5, atol=1e-6)


def test_a_subset_of_users_scores_like_the_full_set(fitted, block_world):
    name, model = fitted
    full = model.score_users(np.arange(block_world.n_users))
    some = np.array([5, 0, 5, 17])
    np.testing.assert_allclose(model.score_users(some), full[some], rtol=1e-5, atol=1e-6)


def test_users_get_their_own_block_first(block_model, block_world):
    name, model = block_model
    h = block_world.history
    users = np.arange(h.n_users)
    items, _ = model.recommend(users, 10, exclude=h.matrix)
    same = block_world.block_of_item[items] == block_world.block_of_user[:, None]
    # Every user's top 5 is entirely from its own block; top 10 nearly so (chance: 1/4).
    assert same[:, :5].all(), f"{name}: users with a foreign item in their top 5: {np.flatnonzero(~same[:, :5].all(1))}"
    assert same.mean() >= 0.9, f"{name}: own-block share of the top 10 {same.mean():.2f}"


def test_untrained_text_tower_does_not_know_the_blocks(request, block_world):
    # The control for the known-answer test above: the right answer comes from training.
    model = fit_text(request, False, request.getfixturevalue("block_world").history)
    h = block_world.history
    items, _ = model.recommend(np.arange(h.n_users), 10, exclude=h.matrix)
    same = block_world.block_of_item[items] == block_world.block_of_user[:, None]
    assert same.mean() < 0.5


def test_popularity_counts_weighted_events(block_world):
    h = block_world.history
    df = h.interactions.with_columns(
        pl.when(pl.col(Columns.ItemIdx) == 3).then(4.0).otherwise(pl.col(Columns.Weight)).alias(Columns.Weight)
    )
    model = Popularity().fit(History(df, h.n_users, h.n_items))
    expected = np.zeros(h.n_items)
    np.add.at(expected, df[Columns.ItemIdx].to_numpy(), df[Columns.Weight].to_numpy())
    np.testing.assert_allclose(model.score_users(np.array([0]))[0], expected)
    # A user who saw the most popular item gets the next ones.
    best = int(np.argmax(expected))
    user = int(df.filter(pl.col(Columns.ItemIdx) == best)[Columns.UserIdx][0])
    items, _ = model.recommend(np.array([user]), 3, exclude=h.matrix)
    assert best not in items[0]


def test_popularity_window_counts_recent_events_only():
    h = History(events([0, 1, 2, 0], [0, 0, 0, 1], [0, 0, 0, 30 * 86400]), 3, 2)
    assert Popularity().fit(h).counts.tolist() == [3.0, 1.0]
    assert Popularity(window_days=7).fit(h).counts.tolist() == [0.0, 1.0]


def test_a_shared_score_row_is_ranked_once_not_scored_per_user(block_world):
    """Popularity gives every user one row: its lists come from that row's order
    (``constant_top_k``) without a dense users x items block, which at 150,000 items cost 16x
    a scored block's time per cell (a broadcast row's copy is column-ordered). The lists equal
    the dense block's masked top-k, ties and all."""
    h = block_world.history
    model = Popularity().fit(h)
    counts = model.score_users(np.array([0]))[0].copy()
    users = np.arange(h.n_users)

    def no_dense_block(users):
        raise AssertionError("a dense block was scored")

    model.score_users = no_dense_block
    items, scores = model.recommend(users, 12, exclude=h.matrix, chunk=7)
    dense = np.tile(counts.astype(np.float32), (len(users), 1))
    dense[h.matrix.nonzero()] = -np.inf
    want_items, want_scores = top_k(dense, 12)
    finite = np.isfinite(want_scores)
    np.testing.assert_array_equal(np.isfinite(scores), finite)
    np.testing.assert_array_equal(items[finite], want_items[finite])
    np.testing.assert_array_equal(scores[finite], want_scores[finite])


@pytest.mark.parametrize("model", [ALS(factors=4, iterations=5, seed=0), BPR(factors=4, iterations=5, seed=0)])
def test_items_without_events_get_zero_factor_scores(block_world, model):
    h = block_world.history
    wider = History(h.interactions, h.n_users, h.n_items + 3)  # 3 items nobody touched
    model.fit(wider)
    scores = model.score_users(np.arange(h.n_users))
    assert np.all(scores[:, h.n_items :] == 0.0)
    assert np.any(scores[:, : h.n_items] != 0.0)


def test_recency_rows_weigh_items_by_how_many_distinct_items_came_after():
    from recsys.cf.models import recency_rows

    # user 0: items 3, 1, 3, 2 in time order -> 2 last (k=0), 3 before it (k=1), 1 first (k=2);
    # user 1: no events; user 2: one item twice.
    df = events([0, 0, 0, 0, 2, 2], [3, 1, 3, 2, 0, 0], [10, 20, 30, 40, 5, 6])
    m = recency_rows(History(df, 3, 4), 0.5).toarray()
    np.testing.assert_allclose(m, [[0, 0.25, 1.0, 0.5], [0, 0, 0, 0], [1.0, 0, 0, 0]])


def test_recency_weighted_knn_scores_the_last_items_neighbours_higher():
    """Two users with the same items in opposite orders: each ranks higher the items that
    co-occur with what it consumed last."""
    # items 0-2 co-occur with item 6 only, items 3-5 with item 7 only (other users); user 0
    # consumed 6 then 7, user 1 consumed 7 then 6.
    rows = [(0, 6, 1), (0, 7, 2), (1, 7, 1), (1, 6, 2)]
    u = 2
    for group, anchor in ((range(3), 6), (range(3, 6), 7)):
        for item in group:
            rows += [(u, item, 1), (u, anchor, 2)]
            u += 1
    df = events(*map(list, zip(*rows, strict=True))).sort(Columns.UserIdx, Columns.Timestamp)
    h = History(df, u, 8)
    plain = ItemKNN(neighbours=10).fit(h).score_users(np.array([0, 1]))
    np.testing.assert_allclose(plain[0], plain[1])  # order-blind
    s = ItemKNN(neighbours=10, recency_decay=0.5).fit(h).score_users(np.array([0, 1]))
    assert s[0, 3:6].min() > s[0, 0:3].max()  # user 0 ended with 7: items 3-5 first
    assert s[1, 0:3].min() > s[1, 3:6].max()


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5])
@pytest.mark.parametrize("model", [ItemKNN, SequentialKNN])
def test_knn_recency_decay_out_of_range_is_refused(model, decay):
    with pytest.raises(ValueError, match=f"{model.__name__} recency_decay must be in"):
        model(recency_decay=decay)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"neighbours": 0}, "neighbours must be >= 1"), ({"window": 0}, "window")]
)
def test_sequential_knn_bad_sizes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SequentialKNN(**kwargs)


def test_sequential_knn_counts_what_came_next_within_the_window():
    # user 0: 0 -> 1 -> 2 -> 3; user 1: 0 -> 2. Window 2, weights 1/gap, scaled by
    # 1/sqrt(events_j * events_i) (events: item 0: 2, item 1: 1, item 2: 2, item 3: 1).
    df = events([0, 0, 0, 0, 1, 1], [0, 1, 2, 3, 0, 2], [1, 2, 3, 4, 1, 2])
    m = SequentialKNN(neighbours=10, window=2, recency_decay=None).fit(History(df, 2, 4))
    want = np.zeros((4, 4))
    want[0, 1] = 1 / np.sqrt(2 * 1)
    want[0, 2] = (0.5 + 1) / np.sqrt(2 * 2)  # user 0 at gap 2, user 1 at gap 1
    want[1, 2] = 1 / np.sqrt(1 * 2)
    want[1, 3] = 0.5 / np.sqrt(1 * 1)
    want[2, 3] = 1 / np.sqrt(2 * 1)
    np.testing.assert_allclose(m.similarity.toarray(), want, rtol=1e-6)
    # Directional: nothing leads back; and only the top neighbour per item is kept with k=1.
    top1 = SequentialKNN(neighbours=1, window=2, recency_decay=None).fit(History(df, 2, 4)).similarity.toarray()
    np.testing.assert_allclose(top1, np.where(want == want.max(1, keepdims=True), want, 0) * (want > 0), rtol=1e-6)


def test_ease_weights_are_each_items_ridge_regression_on_the_other_items():
    # EASE's closed form B = -P / diag(P) (zero diagonal) is, column by column, the ridge
    # regression of item j's column of X on the other items' columns: checked by solving those.
    rng = np.random.default_rng(0)
    n_users, n_items, lam = 30, 6, 3.0
    x = (rng.random((n_users, n_items)) < 0.4).astype(float)
    u, i = np.nonzero(x)
    h = History(
        events(u.tolist(), i.tolist(), list(range(len(u)))).sort(Columns.UserIdx, Columns.Timestamp), n_users, n_items
    )
    got = EASE(regularization=lam, neighbours=n_items).fit(h).similarity.toarray()
    want = np.zeros((n_items, n_items))
    for j in range(n_items):
        others = [k for k in range(n_items) if k != j]
        a = x[:, others]
        want[others, j] = np.linalg.solve(a.T @ a + lam * np.eye(n_items - 1), a.T @ x[:, j])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert (got < 0).any()  # unlike a cosine: neighbours that explain each other away
    # Kept: the `neighbours` largest weights of each row, as an ItemKNN keeps its similarities.
    top2 = EASE(regularization=lam, neighbours=2).fit(h).similarity
    assert np.diff(top2.indptr).max() == 2
    np.testing.assert_allclose(top2.toarray().max(1), want.max(1), rtol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 7, 9])
def test_top_per_dense_row_keeps_what_the_sparse_top_keeps(k):
    rng = np.random.default_rng(1)
    m = rng.normal(size=(11, 7))
    m[4] = 0.0  # an all-zero row (an item without events) stores nothing
    got = top_per_dense_row(m, k, chunk=3)  # several chunks, the last one short
    want = top_per_row(sp.coo_matrix(m), k)
    assert got.has_sorted_indices and got.nnz == want.nnz
    np.testing.assert_allclose(got.toarray(), want.toarray(), rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"regularization": 0.0}, ConfigError, "EASE regularization must be > 0"),
        ({"max_items": 0}, ConfigError, "EASE max_items must be a whole number >= 1"),
        ({"max_items": 2.5}, ConfigError, "EASE max_items must be a whole number"),
        ({"neighbours": 0}, ValueError, "neighbours must be >= 1"),  # ItemKNN's checks
        ({"recency_decay": 1.5}, ValueError, "recency_decay must be in"),
    ],
)
def test_ease_bad_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        EASE(**kwargs)


def test_ease_refuses_a_catalogue_past_max_items_before_the_dense_inversion(block_world):
    n = block_world.history.n_items
    with pytest.raises(ConfigError, match=rf"{n:,} items need about .* GB .* past its max_items \({n - 1:,}\)"):
        EASE(max_items=n - 1).fit(block_world.history)


@pytest.mark.parametrize(
    ("make", "bar"),
    [
        (lambda p: ALS(iterations=3, progress=p), "3/3"),  # implicit's bar over the iterations
        (lambda p: BPR(iterations=3, progress=p), "3/3"),
        (lambda p: SASRec(dim=8, layers=1, epochs=3, progress=p), "sasrec epochs"),  # its own, over the epochs
    ],
)
def test_cf_fits_show_a_progress_bar_unless_told_not_to(make, bar, block_world, capfd, monkeypatch):
    make(True).fit(block_world.history)
    assert bar in capfd.readouterr().err
    make(False).fit(block_world.history)
    assert capfd.readouterr().err == ""
    # By default only on a terminal: BPR's bar redraws every iteration, a record each in a log file.
    make(None).fit(block_world.history)
    assert capfd.readouterr().err == ""  # captured: not a terminal
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    make(None).fit(block_world.history)
    assert bar in capfd.readouterr().err


@pytest.mark.parametrize("cls", [ALS, BPR])
def test_a_warm_refit_continues_from_the_given_factors_and_learns_new_rows(block_world, cls):
    """``fit(start=...)``: the earlier model's factors (without the last user and item) are the
    starting point, so one iteration lands next to it, where a cold one does not; the new user
    and item get rows of their own."""
    h = block_world.history
    last_user, last_item = h.n_users - 1, int(np.flatnonzero(h.item_counts)[-1])  # the last item with events
    old = h.interactions.filter((pl.col(Columns.UserIdx) < last_user) & (pl.col(Columns.ItemIdx) < last_item))
    earlier = cls(factors=8, iterations=30, seed=0).fit(History(old, last_user, last_item))
    warm = cls(factors=8, iterations=1, seed=1).fit(h, start=(earlier.user_factors, earlier.item_factors))
    cold = cls(factors=8, iterations=1, seed=1).fit(h)
    assert warm.user_factors.shape == cold.user_factors.shape and warm.item_factors.shape == cold.item_factors.shape
    before = earlier.score_users(np.arange(last_user)).ravel()

    def agreement(m) -> float:
        return float(np.corrcoef(before, m.score_users(np.arange(last_user))[:, :last_item].ravel())[0, 1])

    assert agreement(warm) > 0.9 and agreement(warm) > agreement(cold) + 0.2, (agreement(warm), agreement(cold))
    assert np.abs(warm.user_factors[last_user]).sum() > 0 and np.abs(warm.item_factors[last_item]).sum() > 0


def test_popular_text_adds_the_log_count_as_of_each_users_cut_to_the_tempered_text_score(request, block_world):
    """``text_popular`` = text score / temperature + log(1 + the item's events up to the user's cut):
    an item's events after a user's cut (``History.user_now``) never raise it for that user."""
    text = fit_text(request, True, request.getfixturevalue("block_world").history)
    h = block_world.history
    df = h.interactions
    late = int(df[Columns.Timestamp].max()) + 1000
    # Item 0 gets 50 more events after everybody's cut; user 1's cut is before them, user 0's after.
    extra = events([2] * 50, [0] * 50, [late + i for i in range(50)])
    now = np.full(h.n_users, late + 100, dtype=np.int64)
    now[1] = late - 1
    cut = History(
        pl.concat([df, extra.cast(df.schema)]).sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True),
        h.n_users,
        h.n_items,
        user_now=now,
    )
    text.fit(cut)
    model = PopularText(text, 0.25).fit(cut)
    users = np.array([0, 1])
    counts = Popularity().fit(cut).counts_at(now[users])
    want = text.score_users(users) / np.float32(0.25) + np.log1p(counts)
    np.testing.assert_allclose(model.score_users(users), want, rtol=1e-5, atol=1e-5)
    assert counts[0, 0] == counts[1, 0] + 50  # user 1 is scored without the 50 late events
    # Served (no per-user cuts): everybody gets the counts as of the history's end.
    served = PopularText(text, 0.25).fit(History(cut.interactions, h.n_users, h.n_items))
    end = np.log1p(cut.item_counts.astype(np.float32))
    got = served.score_users(users) - text.score_users(users) / np.float32(0.25)
    np.testing.assert_allclose(got, np.repeat(end[None, :], 2, axis=0), rtol=1e-5, atol=1e-4)


def test_nearest_text_is_the_cosine_of_the_closest_recent_history_item(request, block_world):
    text = fit_text(request, True, block_world.history)
    m = NearestText(text, history_items=3).fit(block_world.history)
    vectors = text.item_space()
    seqs = block_world.history.sequences
    rng = np.random.default_rng(0)
    users = rng.integers(0, block_world.history.n_users, 200)
    items = rng.integers(0, block_world.history.n_items, 200)
    want = [max(vectors[i] @ vectors[j] for j in seqs[u][-3:]) for u, i in zip(users, items, strict=True)]
    np.testing.assert_allclose(m.score_pairs(users, items), want, rtol=1e-5, atol=1e-6)
    # Only the last history_items count: with one, the last item alone.
    last = NearestText(text, history_items=1).fit(block_world.history).score_pairs(users, items)
    np.testing.assert_allclose(
        last, [vectors[i] @ vectors[seqs[u][-1]] for u, i in zip(users, items, strict=True)], rtol=1e-5, atol=1e-6
    )
    # A user without history: NaN (missing, to the ranker), and no list.
    df = block_world.history.interactions.filter(pl.col(Columns.UserIdx) != 0)
    empty = History(df, block_world.history.n_users, block_world.history.n_items)
    served = NearestText(text, history_items=3).for_users(empty, np.arange(empty.n_users))
    assert np.isnan(served.score_pairs(np.array([0]), np.array([1])))[0]
    assert np.isfinite(served.score_pairs(np.array([1]), np.array([1])))[0]


def test_nearest_text_builds_its_space_once_for_every_served_block(request, block_world, monkeypatch):
    import recsys.rank.explain as explain

    built = []
    real = explain.nearest_space
    monkeypatch.setattr(explain, "nearest_space", lambda v: built.append(1) or real(v))
    text = fit_text(request, True, block_world.history)
    users, items = np.arange(5), np.arange(5)
    want = NearestText(text, history_items=3).fit(block_world.history).score_pairs(users, items)
    built.clear()
    m = NearestText(text, history_items=3).fit(block_world.history)  # as loaded: never scored itself
    for _ in range(3):  # as the export serves block after block: over the tower, for the block's users
        block = m.over(text).for_users(block_world.history, np.arange(block_world.history.n_users))
        np.testing.assert_array_equal(block.score_pairs(users, items), want)
    assert len(built) == 1


def test_nearest_text_refuses_an_empty_window(request, block_world):
    with pytest.raises(ValueError, match="history_items must be >= 1"):
        NearestText(fit_text(request, True, block_world.history), history_items=0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_popular_text_refuses_a_temperature_that_is_not_positive(request, temperature):
    with pytest.raises(ValueError, match="temperature > 0"):
        PopularText(fit_text(request, True, request.getfixturevalue("block_world").history), temperature)


def test_derived_models_are_named_as_the_job_checks_them_before_training(request, block_world):
    text = fit_text(request, True, request.getfixturevalue("block_world").history)
    assert tuple(derived_models(text, text.net.temperature, block_world.history)) == DERIVED_SOURCES


def test_derived_sources_are_explained_in_the_text_space(request, block_world):
    """An item that ``text_new`` or ``text_popular`` proposed is explained by the closest history
    item in the text tower's space, as one the text tower proposed."""
    from recsys.rank.explain import HistoryExplainer

    text = fit_text(request, True, request.getfixturevalue("block_world").history)
    h = block_world.history
    models = {"text": text, "text_new": NewItemText(text).fit(h), "text_popular": popular_text(text, h)}
    rows = pl.DataFrame({Columns.UserIdx: [0, 0, 0], Columns.ItemIdx: [5, 5, 5], Columns.Source: list(models)})
    item, sim = HistoryExplainer(models)(rows, h.sequences)
    assert (item >= 0).all() and np.isfinite(sim).all()
    assert len(set(item.tolist())) == 1 and np.ptp(sim) == 0


class _RecordingScores(Recommender):
    """Seeded random scores for ``n_items`` items; records how many users each call scored."""

    def __init__(self, n_items: int) -> None:
        self.n_items, self.calls = n_items, []

    def fit(self, history):
        return self

    def score_users(self, users):
        self.calls.append(len(users))
        rng = np.random.default_rng(0)
        base = rng.random(self.n_items, dtype=np.float32)
        return base[None, :] + np.asarray(users, dtype=np.float32)[:, None] % 7


def test_long_loops_report_each_scored_block_to_a_progress_bar(capsys):
    """``recommend`` tells its caller each block's users (the evaluation's bar counts them);
    ``user_bar`` prints only for loops of at least ``MIN_CELLS`` users x items x passes, so the
    default data set's sub-second loops stay quiet and the 10x and 100x ones show progress."""
    from recsys.progress import MIN_CELLS, user_bar

    model = _RecordingScores(150_000)
    done: list[int] = []
    model.recommend(np.arange(1_000), 5, progress=done.append)
    assert done == model.calls == [256, 256, 256, 232]
    with user_bar("quiet loop", 3_000, 1_500, passes=7) as bar:  # the default data's evaluation
        bar.update(3_000 * 7)
        assert bar.disable
    assert "quiet loop" not in capsys.readouterr().err
    users = int(MIN_CELLS // 15_000) + 1
    with user_bar("loud loop", users, 15_000) as bar:
        bar.update(users)
        assert not bar.disable and bar.n == bar.total == users
    assert "loud loop" in capsys.readouterr().err
    # The fused ranker's loops (candidates and features, the test users' ranking) count the
    # blocks of ``FusedRecommender.blocks`` as each is done.
    from recsys.rank.fused import FusedRecommender

    blocks = list(FusedRecommender({}, None).blocks(np.arange(users), 15_000, desc="loud blocks"))
    np.testing.assert_array_equal(np.concatenate(blocks), np.arange(users))
    assert len(blocks) > 1 and "loud blocks" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("n_items", "n_users", "blocks", "chunk", "fixed"),
    [(1_000, 5_000, [256, 4096, 648], 2048, [2048, 2048, 904]), (150_000, 700, [256, 256, 188], 300, [300, 300, 100])],
)
def test_score_blocks_follow_the_catalogue_not_a_fixed_user_count(n_items, n_users, blocks, chunk, fixed):
    """A block of 2,048 users was 1.2 GB of float32 at 150,000 items; now a block holds about
    BLOCK_CELLS cells (at least 256 users, at most 4,096) whatever the catalogue."""
    model = _RecordingScores(n_items)
    users = np.arange(n_users)
    items, scores = model.recommend(users, 5)
    assert model.calls == blocks
    assert max(c * n_items for c in model.calls[1:]) <= max(BLOCK_CELLS, 256 * n_items)
    model.calls = []
    items_fixed, scores_fixed = model.recommend(users, 5, chunk=chunk)
    assert model.calls == fixed
    np.testing.assert_array_equal(items, items_fixed)
    np.testing.assert_array_equal(scores, scores_fixed)
    pairs_users = np.array([n_users - 1, 0, 300, 300])
    pairs_items = np.array([3, 1, 2, n_items - 1])
    np.testing.assert_array_equal(
        model.score_pairs(pairs_users, pairs_items), model.score_users(pairs_users)[np.arange(4), pairs_items]
    )


def cycle_history(n_users: int, n_items: int, length: int, seed: int) -> History:
    """Each user walks the item cycle 0 -> 1 -> ... -> n_items - 1 -> 0 from a random start:
    the next item follows from the last one alone, and only in one direction."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        start = int(rng.integers(n_items))
        users += [u] * length
        items += [(start + k) % n_items for k in range(length)]
    return History(events(users, items, list(range(len(users)))), n_users, n_items)


@pytest.mark.parametrize("negatives", [None, 12])
def test_sasrec_learns_which_item_comes_next_where_an_order_free_model_cannot(negatives):
    # Held-out users (served through for_users, as the export serves them): SASRec names the
    # item after their last one; the cosine item-kNN sees the item before and the item after
    # the last one as equally near, so it cannot tell which comes next.
    n_items = 30
    train = cycle_history(200, n_items, 6, seed=0)
    new = cycle_history(50, n_items, 4, seed=1)
    last = np.array([s[-1] for s in new.sequences])
    model = SASRec(dim=16, layers=1, max_history=5, dropout=0.1, epochs=60, learning_rate=1e-2, negatives=negatives)
    served = model.fit(train).for_users(new, np.full(50, -1))
    hit = served.recommend(np.arange(50), 1, exclude=new.matrix)[0][:, 0] == (last + 1) % n_items
    knn = ItemKNN(neighbours=10).fit(train).for_users(new, np.full(50, -1))
    knn_hit = knn.recommend(np.arange(50), 1, exclude=new.matrix)[0][:, 0] == (last + 1) % n_items
    assert hit.mean() >= 0.9 and knn_hit.mean() <= 0.7, (hit.mean(), knn_hit.mean())


def test_sasrec_same_seed_same_scores_and_the_fit_does_not_move_the_global_random_state(block_world):
    import torch

    h = block_world.history
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = SASRec(dim=8, layers=1, epochs=5, seed=3).fit(h)
    after = torch.rand(3)
    b = SASRec(dim=8, layers=1, epochs=5, seed=3).fit(h)
    c = SASRec(dim=8, layers=1, epochs=5, seed=4).fit(h)
    users = np.arange(h.n_users)
    np.testing.assert_array_equal(a.score_users(users), b.score_users(users))
    assert not np.array_equal(a.score_users(users), c.score_users(users))
    np.testing.assert_array_equal(before, after)


def test_sasrec_scores_a_user_from_its_history_whatever_else_is_served(block_world, tmp_path):
    # The fit's user vectors, a served history holding a few of the same users (other rows
    # around them), and a saved and loaded copy all score a user alike: no per-user weights,
    # and a user's vector does not depend on its block.
    h = block_world.history
    model = SASRec(dim=16, layers=1, max_history=8, epochs=5, seed=0).fit(h)
    some = np.array([7, 3, 70, 300 % h.n_users])
    rows = [
        h.interactions.filter(pl.col(Columns.UserIdx) == u).with_columns(pl.lit(i).alias(Columns.UserIdx))
        for i, u in enumerate(some)
    ]
    served_history = History(pl.concat(rows), len(some), h.n_items)
    served = model.for_users(served_history, np.full(len(some), -1))
    np.testing.assert_array_equal(served.score_users(np.arange(len(some))), model.score_users(some))
    info = model.save(tmp_path / "sasrec")
    assert info["kind"] == "SASRec" and info["epochs"] == 5 and info["negatives"] is None
    loaded = SASRec.load(tmp_path / "sasrec", info).for_users(served_history, np.full(len(some), -1))
    np.testing.assert_array_equal(loaded.score_users(np.arange(len(some))), model.score_users(some))


def test_sasrec_reads_a_batch_trimmed_of_its_left_padding_as_the_full_width_batch(block_world):
    # Length-bucketed training trims each batch to its longest history: positions count from the
    # right, so the newest item reads the same position embedding whatever the width.
    import torch

    model = SASRec(dim=8, layers=2, max_history=6, epochs=1, seed=0).fit(block_world.history)
    seqs = torch.from_numpy(right_aligned([np.array([1, 2]), np.array([3, 4, 5]), np.array([6])], 6))
    with torch.inference_mode():
        full = model.network(seqs)[:, -3:]
        trimmed = model.network(seqs[:, -3:])
    real = (seqs[:, -3:] > 0).unsqueeze(-1).expand_as(full)
    torch.testing.assert_close(trimmed[real], full[real])


def test_sasrec_length_buckets_cover_every_sequence_once_in_batches_of_like_length():
    lengths = np.random.default_rng(0).integers(1, 21, 203)
    batches = SASRec(batch_size=16)._batches(lengths, np.random.default_rng(1))
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(203))
    assert [len(b) for b in batches].count(16) == 12
    # Cut from the length-sorted order: two batches share at most a boundary length.
    spans = sorted((int(lengths[b].min()), int(lengths[b].max())) for b in batches)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:])), spans
    # ... and served in a shuffled order, another one each epoch.
    firsts = [int(lengths[b].min()) for b in batches]
    assert firsts != sorted(firsts)
    rng = np.random.default_rng(1)
    one, two = SASRec(batch_size=16)._batches(lengths, rng), SASRec(batch_size=16)._batches(lengths, rng)
    assert [b.tolist() for b in one] != [b.tolist() for b in two]
    # Without buckets: random batches of every length.
    plain = SASRec(batch_size=16, length_buckets=False)._batches(lengths, np.random.default_rng(1))
    assert max(int(lengths[b].max()) - int(lengths[b].min()) for b in plain) > 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 10, "heads": 4}, r"SASRec dim \(10\) must be a multiple of heads \(4\)"),
        ({"dropout": 1.0}, "SASRec dropout"),
        ({"epochs": 0}, "SASRec epochs must be a whole number >= 1"),
        ({"negatives": 0}, "SASRec negatives must be a whole number >= 1 or null"),
        ({"learning_rate": 0}, "SASRec learning_rate"),
        ({"max_history": 2.5}, "SASRec max_history must be a whole number"),
        ({"text_init_std": 0}, "SASRec text_init_std"),
        ({"length_buckets": "yes"}, "SASRec length_buckets must be true or false"),
    ],
)
def test_sasrec_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SASRec(**kwargs)


def test_sasrec_full_softmax_past_its_limit_asks_for_sampled_negatives(block_world, monkeypatch):
    monkeypatch.setattr("recsys.cf.sasrec.FULL_SOFTMAX_ITEMS", block_world.n_items - 1)
    with pytest.raises(ConfigError, match=r"full softmax over 100 items is past 99: set its negatives"):
        SASRec(epochs=1).fit(block_world.history)
    SASRec(dim=8, layers=1, epochs=1, negatives=10).fit(block_world.history)  # sampling fits


def test_sasrec_grown_catalogue_keeps_old_scores_and_scores_new_items_as_an_average_item(block_world):
    h = block_world.history
    model = SASRec(dim=8, layers=1, epochs=3, seed=0).fit(h)
    grown = model.with_items(h.n_items + 2)
    same = History(h.interactions, h.n_users, h.n_items + 2)
    scores = grown.for_users(same, np.arange(h.n_users)).score_users(np.arange(h.n_users))
    np.testing.assert_allclose(scores[:, : h.n_items], model.score_users(np.arange(h.n_users)), rtol=1e-5, atol=1e-6)
    mean = model.item_vectors.mean(0)
    np.testing.assert_allclose(scores[:, h.n_items :], (model.user_vectors @ mean)[:, None].repeat(2, 1), rtol=1e-4)
    with pytest.raises(ValueError, match="cannot shrink"):
        model.with_items(h.n_items - 1)


def test_sasrec_warm_refit_continues_from_the_given_network_over_a_grown_catalogue(block_world):
    h = block_world.history
    last_item = int(np.flatnonzero(h.item_counts)[-1])
    old = h.interactions.filter(pl.col(Columns.ItemIdx) < last_item)
    earlier = SASRec(dim=16, layers=1, max_history=8, dropout=0.1, epochs=100, seed=0).fit(
        History(old, h.n_users, last_item)
    )
    warm = SASRec(dim=16, layers=1, max_history=8, dropout=0.1, epochs=1, seed=1).fit(h, start=earlier)
    cold = SASRec(dim=16, layers=1, max_history=8, dropout=0.1, epochs=1, seed=1).fit(h)
    users = np.arange(h.n_users)
    before = earlier.score_users(users).ravel()

    def agreement(m) -> float:
        return float(np.corrcoef(before, m.score_users(users)[:, :last_item].ravel())[0, 1])

    assert agreement(warm) > 0.9 and agreement(warm) > agreement(cold) + 0.2, (agreement(warm), agreement(cold))
    assert warm.item_vectors.shape == (h.n_items, 16)
    assert earlier.network.items.weight.shape[0] == last_item + 1  # the start is left as it was


def grouped_cold_history(seed: int) -> tuple[History, np.ndarray, np.ndarray]:
    """Two item groups (0-19, 20-39) whose text says which group an item is in; each user's
    events stay in one group, and items 15-19 and 35-39 have no events at all."""
    rng = np.random.default_rng(seed)
    n_items, per = 40, 20
    cold = np.r_[15:20, 35:40]
    group = np.arange(n_items) // per
    users, items = [], []
    for u in range(200):
        pool = np.setdiff1d(np.arange(u % 2 * per, (u % 2 + 1) * per), cold)
        users += [u] * 6
        items += rng.choice(pool, 6, replace=False).tolist()
    text = np.c_[3 * np.eye(2)[group], rng.normal(size=(n_items, 6))].astype(np.float32)
    return History(events(users, items, list(range(len(users)))), 200, n_items), text, cold


def test_sasrec_started_from_text_scores_never_seen_items_by_their_text():
    # Items without events get no gradient but as negatives: from random embeddings where they
    # end up is chance (on some seeds a user's own group's come first, on others not); started
    # from the text, the user's own group's come first on every seed.
    h, text, cold = grouped_cold_history(seed=0)

    def own_group_first(model: SASRec) -> float:
        s = model.score_users(np.arange(h.n_users))
        a, b = s[:, cold[:5]].mean(1), s[:, cold[5:]].mean(1)
        first_group = np.arange(h.n_users) % 2 == 0
        return float((np.where(first_group, a, b) > np.where(first_group, b, a)).mean())

    got = []
    for seed in (0, 1, 2):
        settings = {"dim": 16, "layers": 1, "max_history": 5, "dropout": 0.1, "epochs": 30, "seed": seed}
        texted = SASRec(**settings, text_init_std=0.2).fit(h, item_text=text)
        plain = SASRec(**settings).fit(h, item_text=text)  # ignored without text_init_std
        got.append((own_group_first(texted), own_group_first(plain)))
    assert min(t for t, _ in got) >= 0.95 and min(p for _, p in got) <= 0.7, got


def test_sasrec_places_items_its_network_never_saw_by_their_text():
    # Items 15-19 and 35-39 join after the fit (renumbered last, as an update appends them): by
    # their text, each user ranks their own group's new items first; at the mean vector all tie.
    h, text, cold = grouped_cold_history(seed=0)
    order = np.r_[np.setdiff1d(np.arange(h.n_items), cold), cold]  # new index -> old index
    index = np.argsort(order)
    df = h.interactions.with_columns(pl.Series(Columns.ItemIdx, index[h.interactions[Columns.ItemIdx].to_numpy()]))
    known = h.n_items - len(cold)
    before, after = History(df, h.n_users, known), History(df, h.n_users, h.n_items)
    model = SASRec(dim=16, layers=1, max_history=5, dropout=0.1, epochs=30, seed=0).fit(before)
    users = np.arange(h.n_users)

    def own_group_first(grown: SASRec) -> float:
        s = grown.for_users(after, users).score_users(users)
        a, b = s[:, known : known + 5].mean(1), s[:, known + 5 :].mean(1)  # the new items of group 0, of 1
        first_group = users % 2 == 0
        return float((np.where(first_group, a, b) > np.where(first_group, b, a)).mean())

    by_text = model.with_items(h.n_items, text[order])
    assert own_group_first(by_text) >= 0.95
    # Without text every new item sits at one vector, so each user's scores of them tie, up to the
    # float rounding of the BLAS kernel's column blocks (bit-equal on some CPUs, not on others).
    plain = model.with_items(h.n_items)
    np.testing.assert_array_equal(plain.item_vectors[known:], np.repeat(plain.item_vectors[known:][:1], len(cold), 0))
    new_scores = plain.for_users(after, users).score_users(users)[:, known:]
    np.testing.assert_allclose(new_scores, np.repeat(new_scores[:, :1], len(cold), 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(by_text.item_vectors[:known], model.item_vectors)  # known items kept
    with pytest.raises(ValueError, match="item_text has 39 rows for 40 items"):
        model.with_items(h.n_items, text[:39])


def test_sasrec_text_start_is_the_texts_top_principal_components_at_the_asked_scale():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(300, 12)) * np.linspace(3, 0.5, 12) + 5.0
    z = text_start(text, 4, 0.2)
    assert z.shape == (300, 4) and z.dtype == np.float32
    assert np.isclose(z.std(), 0.2, rtol=1e-4)
    u = np.linalg.svd(text - text.mean(0), full_matrices=False)[0]
    for j in range(4):  # each column is one principal component (up to sign), largest first
        assert abs(np.corrcoef(z[:, j], u[:, j])[0, 1]) > 0.999
    np.testing.assert_allclose(z, text_start(text[:, ::-1], 4, 0.2), atol=1e-5)  # the same items, the same start
    wide = text_start(text[:, :3], 8, 0.2)  # narrower text: its 3 components, then random columns
    assert np.allclose(wide[:, :3].std(), 0.2, rtol=1e-4) and wide[:, 3:].std() < 0.05


def test_sasrec_started_from_text_needs_the_catalogues_text(block_world):
    h = block_world.history
    model = SASRec(dim=8, layers=1, epochs=1, text_init_std=0.2)
    with pytest.raises(ValueError, match="needs the catalogue's item_text"):
        model.fit(h)
    with pytest.raises(ValueError, match=f"item_text has 3 rows for {h.n_items} items"):
        model.fit(h, item_text=np.ones((3, 4), dtype=np.float32))
    # The pipeline hands the text tower's item vectors to the models that read them, and only those.
    text = np.random.default_rng(0).normal(size=(h.n_items, 4)).astype(np.float32)
    fitted = HybridPipeline({"sasrec": model, "popularity": Popularity()}, None).fit_cf(h, item_text=text)
    assert fitted["sasrec"].reads_item_text and not fitted["popularity"].reads_item_text


# --- an update's two modes (``Updatable``: ``recsys.update``'s cf_mode), every model alike -------

UPDATABLE = {
    "als": lambda: ALS(factors=4, iterations=15, seed=0),
    "bpr": lambda: BPR(factors=8, iterations=100, seed=0),
    "itemknn": lambda: ItemKNN(neighbours=50, recency_decay=0.5),
    "itemknn_next": lambda: SequentialKNN(neighbours=50),
    "ease": lambda: EASE(regularization=10.0, neighbours=50),
    "sasrec": lambda: SASRec(dim=8, layers=1, max_history=8, dropout=0.1, epochs=20, seed=0),
    "popularity": lambda: Popularity(),
}
#: the models a warm refit continues (``warm_iterations``); the others fit anew whatever it says
CONTINUES = {"als", "bpr", "sasrec"}
#: the refit's ConfigError names the kind of model the config lacks
KIND = {
    "als": "factor model",
    "bpr": "factor model",
    "itemknn": "item-kNN model",
    "itemknn_next": "item-kNN model",
    "ease": "item-kNN model",
    "sasrec": "SASRec model",
}


def concrete_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= concrete_subclasses(sub) | ({sub} if not inspect.isabstract(sub) else set())
    return out


@pytest.fixture(scope="module")
def update_world(block_world) -> tuple[dict[str, Recommender], ModelUpdate]:
    """Every updatable model fitted on the block world, and an update that grows it by one user
    and one item: the new item consumed by the first 10 users of block 0 and by the new user, who
    also consumed three items of block 0."""
    h = block_world.history
    new_user, new_item = h.n_users, h.n_items
    block0 = np.flatnonzero(block_world.block_of_user == 0)[:10].tolist()
    own = h.interactions.filter(pl.col(Columns.UserIdx) == block0[0])[Columns.ItemIdx].to_list()[:3]
    more = events(
        [*block0, new_user, new_user, new_user, new_user],
        [new_item] * len(block0) + [*own, new_item],
        [2_000] * len(block0) + [1_990, 1_991, 1_992, 2_000],
    ).cast({Columns.Weight: pl.Float32})
    grown = History(
        pl.concat([h.interactions, more.select(h.interactions.columns)], how="vertical_relaxed").sort(
            Columns.UserIdx, Columns.Timestamp, maintain_order=True
        ),
        h.n_users + 1,
        h.n_items + 1,
    )
    touched = np.unique(more[Columns.UserIdx].to_numpy())
    return {name: make().fit(h) for name, make in UPDATABLE.items()}, ModelUpdate(grown, touched)


def served(model: Recommender, history: History) -> np.ndarray:
    """Every user of ``history`` scored as a served pipeline scores them (all of them known)."""
    users = np.arange(history.n_users)
    return np.asarray(model.for_users(history, users).score_users(users))


def test_every_updatable_model_is_in_the_shared_update_test():
    assert concrete_subclasses(Updatable) == {type(make()) for make in UPDATABLE.values()}


@pytest.mark.parametrize("mode", ["refit", "warm", "fold_in"])
@pytest.mark.parametrize("name", list(UPDATABLE))
def test_an_update_scores_the_grown_users_and_items(update_world, block_world, name, mode):
    """Either mode serves every user, old and new, over every item, old and new. A cold refit is
    the configured model fitted on every event (the configured one left unfitted); a warm one
    continues from the model (next to it after one iteration) where the model can, else is the
    cold refit; a fold-in keeps what the model learned: the users without new events score the
    old items as before (popularity, which only counts, counts again)."""
    fitted, cold = update_world
    old, h = fitted[name], block_world.history
    update = ModelUpdate(cold.history, cold.touched, warm_iterations=1 if mode == "warm" else None)
    configured = UPDATABLE[name]()
    updated = (old.folded_in if mode == "fold_in" else old.refitted)(name, configured, update)
    assert updated is not old and updated is not configured
    assert vars(configured) == vars(UPDATABLE[name]()), "the configured model was changed"
    scores = served(updated, update.history)
    assert scores.shape == (h.n_users + 1, h.n_items + 1)
    assert np.isfinite(scores).all()
    refit = served(UPDATABLE[name]().fit(update.history), update.history)
    before = served(old, h)
    untouched = np.setdiff1d(np.arange(h.n_users), update.touched)
    if mode == "refit" or (mode == "warm" and name not in CONTINUES) or (mode == "fold_in" and name == "popularity"):
        np.testing.assert_allclose(scores, refit, rtol=1e-5, atol=1e-6)
    elif mode == "warm":
        assert not np.allclose(scores, refit, rtol=1e-3, atol=1e-4), "the warm refit did not continue"
        agreement = np.corrcoef(before[untouched].ravel(), scores[untouched, : h.n_items].ravel())[0, 1]
        assert agreement > 0.9, agreement
    else:
        np.testing.assert_allclose(scores[untouched, : h.n_items], before[untouched], rtol=1e-5, atol=1e-6)
    assert type(updated) is type(old)


@pytest.mark.parametrize("name", ["als", "bpr"])
def test_a_factor_fold_in_gives_new_items_zero_factors_and_solves_only_the_touched_users(update_world, name):
    fitted, update = update_world
    old = fitted[name]
    out = old.folded_in(name, None, update)
    n_users, n_items = old.user_factors.shape[0], old.item_factors.shape[0]
    np.testing.assert_array_equal(out.item_factors[:n_items], old.item_factors)
    assert not out.item_factors[n_items:].any()
    untouched = np.setdiff1d(np.arange(n_users), update.touched)
    np.testing.assert_array_equal(out.user_factors[untouched], old.user_factors[untouched])
    solved = fold_in(out.item_factors, update.history.matrix[update.touched], old.regularization, old.alpha)
    np.testing.assert_array_equal(out.user_factors[update.touched], solved)
    assert update.touched.max() == n_users  # the new user is among them
    assert old.user_factors.shape[0] == n_users and old.item_factors.shape[0] == n_items  # left as it was


@pytest.mark.parametrize("name", ["itemknn", "itemknn_next", "ease"])
def test_an_item_knn_fold_in_keeps_its_similarities_and_gives_new_items_none(update_world, name):
    fitted, update = update_world
    old = fitted[name]
    out = old.folded_in(name, None, update)
    n = old.similarity.shape[0]
    assert out.similarity.shape == (n + 1, n + 1)
    assert (out.similarity[:n, :n] != old.similarity).nnz == 0
    assert out.similarity[n:].nnz == 0 and out.similarity[:, n:].nnz == 0


@pytest.mark.parametrize("configured", [None, Popularity(window_days=1.0)])
@pytest.mark.parametrize("name", sorted(KIND))
def test_a_refit_without_the_configured_model_says_which_kind_is_missing(update_world, name, configured):
    fitted, update = update_world
    with pytest.raises(ConfigError, match=rf"^the model's config has no {KIND[name]} '{name}' to refit$"):
        fitted[name].refitted(name, configured, update)
    fitted[name].folded_in(name, configured, update)  # a fold-in fits nothing the config names


@pytest.mark.parametrize(
    ("name", "configured"),
    [("als", lambda: BPR(factors=4, iterations=5, seed=0)), ("itemknn", lambda: EASE(regularization=10.0))],
)
def test_a_refit_follows_the_configured_model_of_the_same_kind(update_world, name, configured):
    fitted, update = update_world
    out = fitted[name].refitted(name, configured(), update)
    assert type(out) is type(configured())
    np.testing.assert_allclose(
        served(out, update.history), served(configured().fit(update.history), update.history), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["refitted", "folded_in"])
def test_popularity_counts_again_by_the_configured_settings_or_the_defaults(update_world, mode):
    fitted, update = update_world
    old = fitted["popularity"]
    windowed = Popularity(window_days=0.005)  # 432 s: only the new events (at 1,990-2,000)
    assert getattr(old, mode)("popularity", windowed, update).counts.sum() == 14
    assert getattr(old, mode)("popularity", None, update).counts.sum() == update.history.interactions.height
    assert getattr(old, mode)("popularity", ALS(), update).counts.sum() == update.history.interactions.height


def test_a_cold_sasrec_refit_that_starts_from_text_needs_the_towers_item_vectors(update_world):
    fitted, update = update_world
    configured = SASRec(dim=8, layers=1, max_history=8, epochs=1, text_init_std=0.1)
    with pytest.raises(ValueError, match=r"^a cold refit of 'sasrec' starts from the text tower: pass its text_parts$"):
        fitted["sasrec"].refitted("sasrec", configured, update)
    warm = ModelUpdate(update.history, update.touched, warm_iterations=1)  # continues: nothing to start from text
    assert fitted["sasrec"].refitted("sasrec", configured, warm).item_vectors.shape == (update.history.n_items, 8)
    text = np.random.default_rng(0).normal(size=(update.history.n_items, 12)).astype(np.float32)
    with_text = ModelUpdate(update.history, update.touched, item_text=text)
    assert fitted["sasrec"].refitted("sasrec", configured, with_text).item_vectors.shape == (update.history.n_items, 8)
