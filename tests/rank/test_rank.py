"""Fusion: candidate union, features, and a LambdaMART ranker that learns a planted signal."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys.cf import ItemKNN, Popularity
from recsys.columns import Columns
from recsys.data import LeaveLastOutSplit, listing_times
from recsys.errors import ConfigError
from recsys.rank.candidates import generate_candidates, rank_column
from recsys.rank.features import build_features, feature_columns, item_statistics
from recsys.rank.ranker import LambdaMARTRanker
from recsys.recommender import History, Recommender


class FixedScores(Recommender):
    """A recommender whose scores are given: the answer of every candidate test is known."""

    def __init__(self, scores: np.ndarray, name: str = "fixed") -> None:
        self.scores, self.name = np.asarray(scores, dtype=np.float32), name

    def fit(self, history: History) -> FixedScores:
        return self

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return self.scores[users]


# 2 users x 6 items. "a" likes low items, "b" likes high items.
A = FixedScores([[6, 5, 4, 3, 2, 1], [1, 6, 5, 4, 3, 2]], "a")
B = FixedScores([[1, 2, 3, 4, 5, 6], [6, 1, 2, 3, 4, 5]], "b")


def test_candidates_union_ranks_and_source():
    seen = sp.csr_matrix(np.array([[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=np.float32))
    users = np.array([0, 1])
    cands = generate_candidates(users, {"a": A, "b": B}, {"a": 2, "b": 3}, exclude=seen)
    assert cands.columns[:2] == [Columns.UserIdx, Columns.ItemIdx]
    assert set(cands.columns) == {Columns.UserIdx, Columns.ItemIdx, "rank_a", "rank_b", Columns.Source}
    got = {(r[Columns.UserIdx], r[Columns.ItemIdx]): r for r in cands.iter_rows(named=True)}
    # user 0: a's top 2 unseen = 0, 2 (1 is seen); b's top 3 = 5, 4, 3.
    # user 1: a's top 2 = 1, 2; b's top 3 = 0, 5, 4.
    assert set(got) == {(0, 0), (0, 2), (0, 5), (0, 4), (0, 3), (1, 1), (1, 2), (1, 0), (1, 5), (1, 4)}
    assert got[(0, 0)]["rank_a"] == 1 and got[(0, 0)]["rank_b"] is None and got[(0, 0)]["source"] == "a"
    assert got[(0, 2)]["rank_a"] == 2
    assert got[(0, 3)]["rank_b"] == 3 and got[(0, 3)]["rank_a"] is None and got[(0, 3)]["source"] == "b"
    assert got[(1, 0)]["rank_b"] == 1
    # No seen item, no duplicate pair, sorted by user then item.
    assert (0, 1) not in got
    assert cands.height == len(got)
    assert cands.equals(cands.sort(Columns.UserIdx, Columns.ItemIdx))


def test_candidates_source_is_the_first_source_in_config_order():
    users = np.array([0])
    both = generate_candidates(users, {"a": A, "b": A}, {"a": 3, "b": 3}, exclude=None)
    assert both[Columns.Source].to_list() == ["a"] * 3
    assert both["rank_a"].to_list() == both["rank_b"].to_list() == [1, 2, 3]
    reversed_ = generate_candidates(users, {"a": A, "b": A}, {"b": 3, "a": 3}, exclude=None)
    assert reversed_[Columns.Source].to_list() == ["b"] * 3


def test_candidates_skip_padding_when_few_items_are_unseen():
    seen = sp.csr_matrix(np.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=np.float32))
    cands = generate_candidates(np.array([0, 1]), {"a": A}, {"a": 4}, exclude=seen)
    assert cands.filter(pl.col(Columns.UserIdx) == 0)[Columns.ItemIdx].to_list() == [4, 5]
    assert cands.filter(pl.col(Columns.UserIdx) == 1).height == 4


@pytest.fixture
def stage(tiny_dataset):
    data = tiny_dataset
    split = LeaveLastOutSplit().split(data.interactions)
    hist = History(split.train, data.n_users, data.n_items)
    models = {"popularity": Popularity().fit(hist), "itemknn": ItemKNN(neighbours=10).fit(hist)}
    users = split.val[Columns.UserIdx].unique().sort().to_numpy()
    return users, hist, models


def test_build_features_one_row_per_candidate(stage):
    users, hist, models = stage
    n_cands = {"itemknn": 10, "popularity": 5}
    cands = generate_candidates(users, models, n_cands, exclude=hist.matrix)
    df = build_features(cands, hist, models, list(n_cands))
    assert df.height == cands.height
    assert df.select(Columns.UserIdx, Columns.ItemIdx).is_duplicated().sum() == 0
    assert df.select(Columns.UserIdx, Columns.ItemIdx).equals(cands.select(Columns.UserIdx, Columns.ItemIdx))
    for name, model in models.items():
        col = f"score_{name}"
        assert df[col].null_count() == 0 and not df[col].is_nan().any()
        # Every model scores every candidate, also those it did not propose.
        expected = model.score_pairs(df[Columns.UserIdx].to_numpy(), df[Columns.ItemIdx].to_numpy())
        np.testing.assert_allclose(df[col].to_numpy(), expected, rtol=1e-6)
    assert df["n_sources"].to_list() == [
        int(a is not None) + int(b is not None)
        for a, b in zip(df[rank_column("itemknn")], df[rank_column("popularity")], strict=True)
    ]
    feats = feature_columns(df)
    assert Columns.UserIdx not in feats and Columns.ItemIdx not in feats and Columns.Source not in feats
    assert {"score_itemknn", "score_popularity", "rank_itemknn", "item_events"} <= set(feats)


@pytest.mark.parametrize("score_gaps", [False, True])
def test_build_features_equal_a_plain_polars_reference(stage, score_gaps):
    """The block-wise numpy features against the plain definitions: per-user z-scores and score
    gaps by polars windows, item and user statistics by joins."""
    from recsys.rank.features import user_statistics

    users, hist, models = stage
    n_cands = {"itemknn": 10, "popularity": 5}
    cands = generate_candidates(users, models, n_cands, exclude=hist.matrix)
    got = build_features(cands, hist, models, list(n_cands), score_gaps=score_gaps)
    ref = cands
    for name, model in models.items():
        col = f"score_{name}"
        s = pl.Series(col, model.score_pairs(cands[Columns.UserIdx].to_numpy(), cands[Columns.ItemIdx].to_numpy()))
        ref = ref.with_columns(s)
        z = (pl.col(col) - pl.col(col).mean().over(Columns.UserIdx)) / (pl.col(col).std().over(Columns.UserIdx) + 1e-6)
        ref = ref.with_columns(z.alias(f"{col}_z"))
    n_sources = pl.sum_horizontal(pl.col(rank_column(s)).is_not_null().cast(pl.Int8) for s in n_cands)
    ref = ref.with_columns(n_sources.alias("n_sources"))
    ref = ref.join(item_statistics(hist), on=Columns.ItemIdx, how="left")
    ref = ref.join(user_statistics(hist), on=Columns.UserIdx, how="left")
    gaps = [f"score_{name}_gap" for name in models] if score_gaps else []
    for col in gaps:  # the last columns, after everything a ranker without them reads
        score = pl.col(col.removesuffix("_gap"))
        ref = ref.with_columns((score - score.max().over(Columns.UserIdx)).alias(col))
    assert set(got.columns) == set(ref.columns)
    assert got.columns[len(got.columns) - len(gaps) :] == gaps
    if score_gaps:  # each user's best candidate of each model is 0 behind it, the others behind
        best = got.group_by(Columns.UserIdx).agg(pl.col(gaps).max())
        assert (best.select(gaps).to_numpy() == 0).all()
        assert (got.select(gaps).to_numpy() < 0).any()
    for c in ref.columns:
        if ref[c].dtype.is_float():
            a, b = got[c].cast(pl.Float64).to_numpy(), ref[c].cast(pl.Float64).to_numpy()
            # one candidate: NaN (numpy) where polars has null; the ranker reads both as missing
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=c)
        else:
            assert got[c].equals(ref[c]), c


def test_item_statistics_come_from_the_history():
    df = pl.DataFrame(
        {
            Columns.UserIdx: [0, 1, 1],
            Columns.ItemIdx: [0, 0, 2],
            Columns.Timestamp: [0, 86400 * 20, 86400 * 30],
            Columns.Weight: [1.0, 4.0, 1.0],
        }
    )
    stats = item_statistics(History(df, 2, 4))
    assert stats[Columns.ItemIdx].to_list() == [0, 1, 2, 3]
    assert stats["item_events"].to_list() == [2.0, 0.0, 1.0, 0.0]
    assert stats["item_weight"].to_list() == [5.0, 0.0, 1.0, 0.0]
    assert stats["item_events_14d"].to_list() == [1.0, 0.0, 1.0, 0.0]  # days 20 and 30 of 30
    assert stats["item_age_days"].to_list() == [30.0, None, 0.0, None]


# --- the ranker learns a planted signal ------------------------------------------------------------


def planted(n_users: int, n_cands: int = 20, seed: int = 0) -> pl.DataFrame:
    """One relevant item per user; ``signal`` = label + noise, the other features pure noise."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), n_cands)
    label = np.zeros(n_users * n_cands, dtype=np.int32)
    label[np.arange(n_users) * n_cands + rng.integers(0, n_cands, n_users)] = 1
    return pl.DataFrame(
        {
            Columns.UserIdx: users.astype(np.int32),
            Columns.ItemIdx: np.tile(np.arange(n_cands), n_users).astype(np.int32),
            "noise_a": rng.normal(size=len(users)),
            "signal": label + rng.normal(scale=0.2, size=len(users)),
            "noise_b": rng.random(len(users)),
            "label": label,
        }
    )


@pytest.mark.parametrize("objective", ["lambdarank", "rank_xendcg", "binary"])
def test_ranker_learns_a_planted_signal(objective):
    train, test = planted(300, seed=0), planted(100, seed=1)
    features = ["noise_a", "signal", "noise_b"]
    kw = dict(min_child_samples=5, early_stopping_rounds=10, seed=0, objective=objective)
    ranker = LambdaMARTRanker(n_estimators=60, **kw)
    ranker.fit(train, features)
    scores = ranker.predict(test)
    assert scores.shape == (test.height,) and np.isfinite(scores).all()
    ranked = test.with_columns(pl.Series("score", scores)).sort(Columns.UserIdx, "score", descending=[False, True])
    top1 = ranked.group_by(Columns.UserIdx, maintain_order=True).first()["label"].mean()
    # Sorting by the planted feature itself is the best possible; chance is 1/20.
    oracle = (
        test.sort(Columns.UserIdx, "signal", descending=[False, True])
        .group_by(Columns.UserIdx, maintain_order=True)
        .first()["label"]
        .mean()
    )
    assert top1 >= 0.9 and top1 >= oracle - 0.05, (top1, oracle)
    # The planted feature is the one that matters, by a wide margin.
    imp = ranker.feature_importance()
    assert imp["feature"][0] == "signal"
    assert imp["gain"][0] > 5 * imp["gain"][1:].sum()
    assert 1 <= ranker.best_iteration <= round(60 / 0.8)  # refit_full scales the trees to all users


def test_refit_full_retrains_on_all_users_with_the_early_stopped_tree_count_scaled():
    frame, features = planted(300, seed=0), ["noise_a", "signal", "noise_b"]
    kw = dict(n_estimators=60, min_child_samples=5, early_stopping_rounds=10, early_stopping_fraction=0.25, seed=0)
    held = LambdaMARTRanker(refit_full=False, **kw).fit(frame, features)
    full = LambdaMARTRanker(refit_full=True, **kw).fit(frame, features)
    # Same early-stopping run, then a model on every user with 1/(1 - 0.25) times the trees.
    assert full.best_iteration == max(1, round(held.best_iteration / 0.75))
    assert full.booster.num_trees() == full.best_iteration
    # It learned from rows the held-back model never saw: different scores, the signal still leads.
    assert not np.allclose(full.predict(frame), held.predict(frame))
    assert full.feature_importance()["feature"][0] == "signal"


def test_ranker_ignores_users_without_a_positive_and_fails_when_none_has_one():
    frame = planted(50)
    extra = frame.filter(pl.col(Columns.UserIdx) < 5).with_columns(
        pl.col(Columns.UserIdx) + 1000, pl.lit(0).cast(pl.Int32).alias("label")
    )
    ranker = LambdaMARTRanker(n_estimators=5, min_child_samples=5, seed=0)
    ranker.fit(pl.concat([frame, extra]), ["signal"])  # users with no positive do not break the groups
    with pytest.raises(Exception, match="nothing to learn"):
        LambdaMARTRanker(n_estimators=5).fit(extra, ["signal"])


def test_ranker_is_deterministic():
    frame = planted(100)
    a = LambdaMARTRanker(n_estimators=20, min_child_samples=5, seed=3).fit(frame, ["noise_a", "signal"])
    b = LambdaMARTRanker(n_estimators=20, min_child_samples=5, seed=3).fit(frame, ["noise_a", "signal"])
    np.testing.assert_array_equal(a.predict(frame), b.predict(frame))


def test_stage_exclusion_removes_seen_and_not_yet_listed_items():
    from recsys.pipeline import stage_exclusion

    # user 0 saw item 0; item 2 is listed at t=50, item 3 at t=500; item 1 always existed.
    history = History(
        pl.DataFrame(
            {Columns.UserIdx: [0], Columns.ItemIdx: [0], Columns.Timestamp: [1], Columns.Weight: [1.0]},
            schema={
                Columns.UserIdx: pl.Int32,
                Columns.ItemIdx: pl.Int32,
                Columns.Timestamp: pl.Int64,
                Columns.Weight: pl.Float32,
            },
        ),
        n_users=2,
        n_items=4,
    )
    items = pl.DataFrame({Columns.ItemIdx: [0, 1, 2, 3], Columns.AvailableFrom: [None, None, 50, 500]})
    targets = pl.DataFrame({Columns.UserIdx: [0, 1], Columns.Timestamp: [100, 1000]})
    ex = stage_exclusion(history, items, targets).tocsr().toarray().astype(bool)
    assert ex[0].tolist() == [True, False, False, True]  # seen item 0; item 3 not listed yet at t=100
    assert ex[1].tolist() == [False, False, False, False]  # everything exists at t=1000
    # Without the column only seen items are excluded.
    plain = stage_exclusion(history, items.drop(Columns.AvailableFrom), targets).toarray().astype(bool)
    assert plain[0].tolist() == [True, False, False, False]
    # Listing times in item order whatever the table's order, NaN for items listed from the start;
    # a catalogue without any is one without the column.
    listed = listing_times(items.reverse())
    assert listed is not None and np.isnan(listed[:2]).all() and listed[2:].tolist() == [50.0, 500.0]
    assert listing_times(items.with_columns(pl.lit(None, pl.Int64).alias(Columns.AvailableFrom))) is None
    assert listing_times(items.drop(Columns.AvailableFrom)) is None
    nulls = items.with_columns(pl.lit(None, pl.Int64).alias(Columns.AvailableFrom))
    assert (stage_exclusion(history, nulls, targets).toarray().astype(bool) == plain).all()


def test_generated_items_are_listed_before_their_first_event(tmp_path):
    from recsys.data import GeneratedDataSource

    data = GeneratedDataSource(str(tmp_path), n_users=200, n_items=150, seed=3).load()
    listed = data.items.select(Columns.ItemIdx, Columns.AvailableFrom)
    joined = data.interactions.join(listed, on=Columns.ItemIdx)
    assert data.items[Columns.AvailableFrom].is_not_null().sum() > 0  # some items are released late
    assert (joined[Columns.Timestamp] >= joined[Columns.AvailableFrom]).all()


def test_fused_pair_scores_equal_the_ranked_lists_and_cover_pairs_outside_the_candidates(stage, tiny_dataset):
    from recsys.pipeline import FusionStage, LabelledStage

    users, hist, models = stage
    split = LeaveLastOutSplit().split(tiny_dataset.interactions)
    ranker = LambdaMARTRanker(n_estimators=20, min_child_samples=5, seed=0)
    fusion = FusionStage({"itemknn": 8, "popularity": 4}, ranker).fit(LabelledStage(users, models, hist, split.val))
    items, scores, _ = fusion.recommend(users, models, hist, 5)
    ok = items >= 0
    pairs = pl.DataFrame({Columns.UserIdx: np.repeat(users, 5)[ok.ravel()], Columns.ItemIdx: items[ok]})
    # Inside the candidate set: exactly the scores the ranked lists carry, in the pairs' order.
    np.testing.assert_allclose(fusion.score_pairs(pairs, models, hist), scores[ok], rtol=1e-6)
    # Items no source proposed (here: every item for one user) still get a finite score.
    outside = pl.DataFrame(
        {Columns.UserIdx: np.full(tiny_dataset.n_items, users[0]), Columns.ItemIdx: np.arange(tiny_dataset.n_items)}
    )
    got = fusion.score_pairs(outside, models, hist, exclude=None)
    assert got.shape == (tiny_dataset.n_items,) and np.isfinite(got).all()


def test_a_ranker_that_learned_score_gaps_serves_with_them(stage, tiny_dataset):
    """``rank.score_gap_feature``: the ranker learns from each score's gap to the user's best
    candidate, and a fused recommender rebuilt from the saved ranker alone (as the export and the
    served model build it) computes the gaps again and ranks exactly as the trained stage did."""
    from recsys.pipeline import FusionStage, LabelledStage
    from recsys.rank.fused import FusedRecommender

    users, hist, models = stage
    split = LeaveLastOutSplit().split(tiny_dataset.interactions)
    n_cands = {"itemknn": 8, "popularity": 4}
    lists = {}
    for gaps in (False, True):
        ranker = LambdaMARTRanker(n_estimators=20, min_child_samples=5, seed=0)
        fusion = FusionStage(n_cands, ranker, score_gaps=gaps).fit(LabelledStage(users, models, hist, split.val))
        assert ("score_itemknn_gap" in ranker.features) is gaps
        served = FusedRecommender(n_cands, ranker)
        assert served.score_gaps is gaps
        want = fusion.fused.recommend(users, models, hist, 5, hist.matrix)
        assert served.recommend(users, models, hist, 5, hist.matrix).equals(want)
        lists[gaps] = want
    assert not lists[True].equals(lists[False])  # the gaps are read: they change the ranking
    with pytest.raises(ConfigError, match="rank.score_gap_feature must be true or false, got 'yes'"):
        FusionStage(n_cands, None, score_gaps="yes")


def test_the_sources_lists_read_off_the_fused_rankings_blocks_equal_their_own(stage, tiny_dataset):
    """The evaluation takes each candidate source's top-k from the score blocks the fused
    ranking scored (``BlockLists``) instead of scoring every user x item again: the lists must
    be those ``Recommender.recommend`` gives, whatever the blocks and the in-place masking."""
    from recsys.pipeline import BlockLists, FusionStage, LabelledStage

    users, hist, models = stage
    split = LeaveLastOutSplit().split(tiny_dataset.interactions)
    ranker = LambdaMARTRanker(n_estimators=5, min_child_samples=5, seed=0)
    fusion = FusionStage({"itemknn": 8, "popularity": 4}, ranker).fit(LabelledStage(users, models, hist, split.val))
    shared = BlockLists(["itemknn", "popularity", "not_a_source"], 30, hist.matrix)
    fusion.fused.recommend(users, models, hist, 5, hist.matrix, block_users=7, on_blocks=shared)
    lists = shared.lists(users)
    assert sorted(lists) == ["itemknn", "popularity"] and len(shared.users) > 1
    for name, (items, scores) in lists.items():
        want_items, want_scores = models[name].recommend(users, 30, exclude=hist.matrix)
        finite = np.isfinite(want_scores)
        np.testing.assert_array_equal(np.isfinite(scores), finite)
        np.testing.assert_array_equal(items[finite], want_items[finite])
        np.testing.assert_array_equal(scores[finite], want_scores[finite])
    with pytest.raises(ValueError, match="other users"):
        shared.lists(users[::-1])


def test_the_ranker_learns_the_same_from_only_the_users_it_can_learn_from(stage, tiny_dataset):
    """Training builds features only for users with a target among their candidates: the ranker
    is the one trained on every user's rows (it drops the others itself), and the candidate
    recall still counts every user."""
    from recsys.pipeline import FusionStage, candidate_recall

    users, hist, models = stage
    split = LeaveLastOutSplit().split(tiny_dataset.interactions)
    n_cands = {"itemknn": 8, "popularity": 4}
    fusion = FusionStage(n_cands, LambdaMARTRanker(n_estimators=20, min_child_samples=5, seed=0))
    every = fusion.labelled_frame(users, models, hist, split.val)
    recall_every = fusion.candidate_recall_val
    assert recall_every == pytest.approx(candidate_recall(every))
    taught = fusion.labelled_frame(users, models, hist, split.val, taught_only=True)
    assert fusion.candidate_recall_val == recall_every < 1.0
    assert 0 < taught.height < every.height
    assert taught[Columns.UserIdx].n_unique() == round(recall_every * every[Columns.UserIdx].n_unique())
    feats = feature_columns(every.drop("label"))
    a = LambdaMARTRanker(n_estimators=20, min_child_samples=5, seed=0).fit(every, feats)
    b = LambdaMARTRanker(n_estimators=20, min_child_samples=5, seed=0).fit(taught, feats)
    np.testing.assert_array_equal(a.predict(every), b.predict(every))


def test_average_models_predicts_and_explains_the_mean_of_its_models():
    import lightgbm as lgb

    from recsys.rank.ranker import average_models

    frame, features = planted(200, seed=0), ["noise_a", "signal", "noise_b"]
    x = frame.select(features).to_numpy()
    groups = frame.group_by(Columns.UserIdx, maintain_order=True).len()["len"].to_numpy()
    data = lgb.Dataset(x, label=frame["label"].to_numpy(), group=groups, free_raw_data=False)
    params = dict(objective="lambdarank", num_leaves=5, min_data_in_leaf=5, feature_fraction=0.7, verbosity=-1)
    models = [lgb.train({**params, "seed": s}, data, num_boost_round=n) for s, n in ((0, 7), (1, 12), (2, 3))]
    merged = lgb.Booster(model_str=average_models([m.model_to_string() for m in models]))
    assert merged.num_trees() == 7 + 12 + 3
    mean = np.mean([m.predict(x) for m in models], axis=0)
    np.testing.assert_allclose(merged.predict(x), mean, rtol=1e-9, atol=1e-12)
    # TreeSHAP is additive over trees: the merged model's contributions are the mean ones too.
    contrib = np.mean([m.predict(x, pred_contrib=True) for m in models], axis=0)
    np.testing.assert_allclose(merged.predict(x, pred_contrib=True), contrib, rtol=1e-7, atol=1e-9)


def test_each_bag_learns_from_a_subset_of_the_binned_rows_as_from_its_own_rows():
    """A bag trains on a LightGBM subset of the whole frame's binned Dataset (no matrix of its
    own): the same model as one built from the fold's rows binned with the whole frame's bins."""
    import lightgbm as lgb

    from recsys.rank.ranker import average_models

    frame, features, bags = planted(300, seed=0), ["noise_a", "signal", "noise_b"], 3
    kw = dict(n_estimators=40, min_child_samples=5, early_stopping_rounds=5, seed=0, n_jobs=1)
    ranker = LambdaMARTRanker(bags=bags, **kw).fit(frame, features)
    # The folds as the ranker draws them: users in a seeded order, dealt round-robin.
    order = np.random.default_rng(0).permutation(np.arange(300)).tolist()
    fold = frame[Columns.UserIdx].replace_strict(dict(zip(order, np.arange(300) % bags, strict=True))).to_numpy()

    def rows(keep, reference=None):
        part = frame.filter(pl.Series(keep))
        groups = part.group_by(Columns.UserIdx, maintain_order=True).len()["len"].to_numpy()
        x, y = part.select(features).to_numpy(), part["label"].to_numpy()
        return lgb.Dataset(x, label=y, group=groups, feature_name=features, reference=reference)

    whole = rows(np.ones(frame.height, dtype=bool)).construct()
    models = []
    for k in range(bags):
        booster = lgb.train(
            {**ranker.params, "seed": k},
            rows(fold != k, whole),
            num_boost_round=40,
            valid_sets=[rows(fold == k, whole)],
            callbacks=[lgb.early_stopping(5, verbose=False)],
        )
        models.append(booster.model_to_string(num_iteration=booster.best_iteration or 40))
    expected = lgb.Booster(model_str=average_models(models))
    x = frame.select(features).to_numpy()
    np.testing.assert_array_equal(ranker.booster.predict(x), expected.predict(x))
    assert ranker.booster.num_trees() == expected.num_trees()


def test_bagged_ranker_averages_one_model_per_fold_and_is_deterministic():
    train, test = planted(300, seed=0), planted(100, seed=1)
    features = ["noise_a", "signal", "noise_b"]
    kw = dict(n_estimators=40, min_child_samples=5, early_stopping_rounds=5, seed=0)
    bagged = LambdaMARTRanker(bags=3, n_jobs=3, **kw).fit(train, features)  # the bags at once
    again = LambdaMARTRanker(bags=3, n_jobs=1, **kw).fit(train, features)  # the bags one after another
    single = LambdaMARTRanker(**kw).fit(train, features)
    assert bagged.booster.model_to_string() == again.booster.model_to_string()
    assert bagged.stop_score == again.stop_score
    np.testing.assert_array_equal(bagged.predict(test), again.predict(test))
    assert bagged.best_iteration == bagged.booster.num_trees()
    assert not np.allclose(bagged.predict(test), single.predict(test))
    ranked = test.with_columns(pl.Series("score", bagged.predict(test))).sort(
        Columns.UserIdx, "score", descending=[False, True]
    )
    assert ranked.group_by(Columns.UserIdx, maintain_order=True).first()["label"].mean() >= 0.9
    with pytest.raises(ConfigError, match="ranker.bags must be a whole number >= 1, got 0"):
        LambdaMARTRanker(bags=0)
    with pytest.raises(ConfigError, match="ranker.bags must be a whole number >= 1, got 1.5"):
        LambdaMARTRanker(bags=1.5)
    with pytest.raises(
        ConfigError, match="ranker.objective must be one of lambdarank, rank_xendcg, binary, got 'ndcg'"
    ):
        LambdaMARTRanker(objective="ndcg")
    with pytest.raises(ConfigError, match="ranker.n_jobs must be a whole number >= 1 or null"):
        LambdaMARTRanker(n_jobs=0)
    with pytest.raises(Exception, match="at least 6 users"):
        LambdaMARTRanker(bags=3, **kw).fit(planted(2, seed=0), features)


def test_bags_on_threads_build_their_subsets_of_the_shared_data_one_at_a_time(monkeypatch):
    """LightGBM does not document building subsets of one Dataset from two threads as safe: the
    bags' subsets are built one at a time (and training builds none)."""
    import threading
    import time

    import lightgbm as lgb

    real = lgb.Dataset.construct
    state = {"now": 0, "most": 0, "subsets": 0}
    lock = threading.Lock()

    def construct(self):
        if self.used_indices is None or self._handle is not None:  # not a subset, or built already
            return real(self)
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["subsets"] += 1
        time.sleep(0.05)  # long enough for a second thread to arrive
        try:
            return real(self)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(lgb.Dataset, "construct", construct)
    kw = dict(n_estimators=5, min_child_samples=5, early_stopping_rounds=5, seed=0)
    LambdaMARTRanker(bags=3, n_jobs=3, **kw).fit(planted(60, seed=0), ["noise_a", "signal", "noise_b"])
    assert state["subsets"] == 2 * 3 and state["most"] == 1, state


def test_bags_on_threads_give_lightgbm_one_thread_count_in_every_call(monkeypatch):
    """LightGBM keeps one process-wide thread count that each booster and prediction sets from
    its own ``num_threads``: a prediction that sized its buffers for LightGBM's default while
    another bag's booster set 1 read past them and crashed the process. Every call the bags make
    on their threads names the same count."""
    import lightgbm as lgb

    counts: list = []
    booster_init, predict = lgb.Booster.__init__, lgb.Booster.predict

    def init(self, params=None, *a, **k):
        counts.append(("booster", (params or {}).get("num_threads")))
        booster_init(self, params, *a, **k)

    def predicting(self, *a, **k):
        counts.append(("predict", k.get("num_threads")))
        return predict(self, *a, **k)

    monkeypatch.setattr(lgb.Booster, "__init__", init)
    monkeypatch.setattr(lgb.Booster, "predict", predicting)
    kw = dict(n_estimators=5, min_child_samples=5, early_stopping_rounds=5, seed=0)
    LambdaMARTRanker(bags=3, n_jobs=3, **kw).fit(planted(60, seed=0), ["noise_a", "signal", "noise_b"])
    on_threads = counts[:-1]  # the last booster is the merged model, built after the threads end
    assert {kind for kind, _ in on_threads} == {"booster", "predict"}, counts
    assert all(n == 1 for _, n in on_threads), counts


@pytest.mark.parametrize("bags", [1, 3])
def test_stop_score_is_lightgbms_ndcg_of_the_validation_stage_only(bags):
    """One stage: ``stop_score`` is LightGBM's own NDCG@10 of the held-back users. Two stages:
    only the validation stage (0) counts; an earlier stage whose targets a feature gives away
    (as the text tower's score does for events it was fine-tuned on) must not lift it."""
    features = ["noise_a", "signal", "noise_b"]
    kw = dict(n_estimators=40, min_child_samples=5, early_stopping_rounds=5, seed=0, n_jobs=1, bags=bags)
    one = planted(300, seed=0)
    ranker = LambdaMARTRanker(refit_full=False, **kw).fit(one, features)
    if bags == 1:  # (a refitted or bagged booster has no best_score of its own)
        assert ranker.stop_score == pytest.approx(ranker.booster.best_score["valid_0"]["ndcg@10"], abs=1e-9)
    # The validation stage: the signal is swamped; the earlier stage: the signal is the label.
    noisy = planted(300, seed=1).with_columns(
        (pl.col("label") + pl.Series(np.random.default_rng(2).normal(scale=3.0, size=300 * 20))).alias("signal"),
        pl.lit(0, dtype=pl.Int8).alias(Columns.Stage),
    )
    leaky = planted(300, seed=2).with_columns(
        pl.col("label").cast(pl.Float64).alias("signal"), pl.lit(1, dtype=pl.Int8).alias(Columns.Stage)
    )
    both = LambdaMARTRanker(**kw).fit(pl.concat([noisy, leaky]), features)
    alone = LambdaMARTRanker(**kw).fit(noisy.drop(Columns.Stage), features)
    assert alone.stop_score < 0.45  # a noisy stage scores 0.27-0.33 on its own...
    assert both.stop_score < 0.45  # ...and the leaky stage does not lift it (counted in: 0.63-0.66)
