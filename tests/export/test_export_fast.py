"""The export's block-wise paths against plain reference code, on tiny cases: same items, same
order, same rule counts, scores within float tolerance."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch
from export_support import trained_run

from recsys.columns import Columns
from recsys.export.engine import Engine, ExplainOptions
from recsys.pipeline_model import TrainedPipeline
from recsys.rank import explain as explain_module
from recsys.rank.candidates import ScoreBlock, generate_candidates, score_blocks
from recsys.rank.rules import BusinessRules, apply_rules
from recsys.recommender import constant_top_k
from recsys.topk import top_k


def random_seen(rng: np.random.Generator, n: int, m: int, density: float) -> sp.csr_matrix:
    return sp.csr_matrix((rng.random((n, m)) < density).astype(np.float32))


def test_constant_top_k_equals_the_masked_dense_block():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n, m = int(rng.integers(1, 20)), int(rng.integers(1, 40))
        row = rng.integers(0, 5, m).astype(np.float32)  # popularity counts: ties everywhere
        seen = random_seen(rng, n, m, float(rng.choice([0.0, 0.2, 0.6])))
        allowed = rng.random(m) < 0.8 if trial % 2 else None
        k = int(rng.integers(1, m + 3))
        dense = np.array(np.broadcast_to(row, (n, m)), dtype=np.float32)
        if allowed is not None:
            dense[:, ~allowed] = -np.inf
        dense[seen.nonzero()] = -np.inf
        ref_i, ref_v = top_k(dense, k)
        got_i, got_v = constant_top_k(row, seen, n, k, allowed)
        np.testing.assert_array_equal(np.isfinite(got_v), np.isfinite(ref_v), err_msg=f"trial {trial}")
        fin = np.isfinite(ref_v)
        np.testing.assert_array_equal(got_i[fin], ref_i[fin], err_msg=f"trial {trial}")
        np.testing.assert_array_equal(got_v[fin], ref_v[fin])


# --- on the trained test pipeline --------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline() -> TrainedPipeline:
    return TrainedPipeline.load(trained_run().pipeline_dir)


def test_in_place_candidates_equal_copied_ones(pipeline):
    p = pipeline
    ph = p.histories(list(p.users.ids))
    scorers = p.scorers(ph)
    users = np.arange(len(p.users))
    seen = ph.history.matrix
    fresh = {n: ScoreBlock(m, users) for n, m in scorers.items()}
    ref = generate_candidates(users, fresh, p.n_candidates, seen, None)
    masked = {n: ScoreBlock(m, users) for n, m in scorers.items()}
    got = generate_candidates(users, masked, p.n_candidates, seen, None, in_place=True)
    assert got.equals(ref)
    # The features read candidate pairs only: masking in place left those untouched.
    u, i = ref[Columns.UserIdx].to_numpy(), ref[Columns.ItemIdx].to_numpy()
    for name in fresh:
        np.testing.assert_array_equal(masked[name].score_pairs(u, i), fresh[name].score_pairs(u, i))


def test_derived_blocks_equal_the_models_own_scores(pipeline):
    """``text_new`` and ``text_popular`` rewrite a copy of the text block (``score_blocks``, as
    candidates and the export build them), and a ``NearestText`` (a feature, but a source if
    named so) writes its own into that copy: the same cells as their own ``score_users``, and the
    towers' blocks themselves are left as they were."""
    p = pipeline
    scorers = p.scorers(p.histories(list(p.users.ids)))
    users = np.arange(len(p.users))
    derived = sorted(p.derived)
    bases = {"text_new": "text", "text_popular": "text", "text_nearest": "text"}
    bases["text_zeroshot_nearest"] = "text_zeroshot"
    assert p.derived == bases
    blocks = score_blocks(scorers, [*derived, "text", "text_zeroshot"], users)
    for tower in ("text", "text_zeroshot"):
        np.testing.assert_array_equal(blocks[tower].scores, scorers[tower].score_users(users))
    for name in derived:
        np.testing.assert_array_equal(blocks[name].scores, scorers[name].score_users(users))
    popular = blocks["text_popular"].scores
    assert np.isfinite(popular).all() and not np.array_equal(popular, blocks["text"].scores)


@pytest.mark.parametrize("scorer", ["als", "popularity", "itemknn"])
def test_single_stage_equals_a_per_user_reference(pipeline, scorer):
    """The single-stage block path (masked scores, fast top-k, dense rules) against the plain
    one: full-catalogue stable sort per user, then the frame rules."""
    p = pipeline
    rules = BusinessRules(max_per_category=2, blocklist=list(p.item_ids[:3]))
    e = Engine(p, rules.compile(p.items, p.now), 10, scorer, ExplainOptions(enabled=False, top_features=0))
    users = list(p.users.ids[:40])
    ph = p.histories(users)
    got = e.recommend(ph)
    model = p.scorers(ph)[scorer]
    ref_rules = rules.compile(p.items, p.now)
    rows = []
    for u in range(len(users)):
        s = ref_rules.mask_scores(model.score_users(np.array([u])), ph.history.matrix[u])
        order = np.argsort(-s[0], kind="stable")[: 10 * e.overfetch]  # the documented overfetch cut
        rows += [(u, int(i), float(s[0, i])) for i in order if np.isfinite(s[0, i])]
    frame = pl.DataFrame(rows, schema=[Columns.UserIdx, Columns.ItemIdx, Columns.Score], orient="row")
    ref = apply_rules(frame.with_columns(pl.col(Columns.Score).cast(pl.Float32)), ref_rules, 10)
    ids = np.asarray(users, dtype=object)
    assert got[Columns.User].to_list() == ids[ref[Columns.UserIdx].to_numpy()].tolist()
    assert got[Columns.Item].to_list() == p.item_ids[ref[Columns.ItemIdx].to_numpy()].tolist()
    assert got[Columns.Rank].to_list() == ref[Columns.Rank].to_list()
    np.testing.assert_allclose(got[Columns.Score].to_numpy(), ref[Columns.Score].to_numpy(), rtol=1e-5, atol=1e-6)


def test_cached_similarity_explanations_equal_the_batched_product(pipeline, monkeypatch):
    p = pipeline
    users = list(p.users.ids[:60])

    def run() -> pl.DataFrame:
        e = Engine(p, BusinessRules().compile(p.items, p.now), 10, "fused", ExplainOptions(top_features=0))
        return e.recommend(p.histories(users))

    monkeypatch.setattr(explain_module, "CACHE_MIN_WIDTH", 10**9)  # never cached: batched product
    ref = run()
    monkeypatch.setattr(explain_module, "CACHE_MIN_WIDTH", 0)  # always cached
    got = run()
    assert got.drop("explain_similarity").equals(ref.drop("explain_similarity"))
    assert ref["explain_item"].null_count() < ref.height
    np.testing.assert_allclose(
        got["explain_similarity"].to_numpy(), ref["explain_similarity"].to_numpy(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["dot", "dense", "sparse"])
def test_nearest_history_kernel_equals_a_plain_argmax(kind):
    """Each way of reading similarities against ``np.argmax`` over the masked [rows, H] block:
    same position (the first on ties: integer vectors make many exact ties), same value."""
    from recsys.kernels import DENSE, DOT, SPARSE, nearest_history

    rng = np.random.default_rng(3)
    n_items, n_users, h = 40, 25, 7
    vectors = rng.integers(-2, 3, (n_items, 4)).astype(np.float32)
    sim = vectors @ vectors.T
    knn = sp.random(n_items, n_items, density=0.2, random_state=4, format="csr", dtype=np.float32)
    knn.data = np.round(knn.data * 3).astype(np.float32)  # ties, and stored zeros
    knn.sort_indices()
    hist = rng.integers(0, n_items, (n_users, h))
    mask = rng.random((n_users, h)) < 0.7
    mask[0] = False  # a user with no history: no explanation
    users = rng.integers(0, n_users, 300)
    users[:3] = 0
    items = rng.integers(0, n_items, 300)
    none = np.zeros(0, dtype=np.int32)
    if kind == "dot":
        item, val = nearest_history(DOT, vectors, none, none, hist, mask, users, items)
        table = sim
    elif kind == "dense":
        item, val = nearest_history(DENSE, sim, none, none, hist, mask, users, items)
        table = sim
    else:
        item, val = nearest_history(SPARSE, knn.data[:, None], knn.indptr, knn.indices, hist, mask, users, items)
        table = knn.toarray().T  # entry (j, i) is history item j's similarity to item i
    ref_sims = np.where(mask[users], table[items[:, None], hist[users]], -np.inf)
    ref_arg = np.argmax(ref_sims, axis=1)
    ref_val = ref_sims[np.arange(len(users)), ref_arg]
    has = np.isfinite(ref_val)
    assert (~has).sum() >= 3 and has.sum() > 250
    np.testing.assert_array_equal(val, np.where(has, ref_val, np.nan).astype(np.float32))
    np.testing.assert_array_equal(item, np.where(has, hist[users, ref_arg], -1))
    assert (ref_sims[has] == ref_val[has, None]).sum(axis=1).max() > 1  # the case has ties


def test_recommend_restores_the_callers_thread_settings(pipeline):
    before = torch.get_num_threads()
    e = Engine(pipeline, BusinessRules().compile(pipeline.items, pipeline.now), 5, "als", threads=1)
    e.recommend(pipeline.histories(list(pipeline.users.ids[:5])))
    assert torch.get_num_threads() == before


# --- feature explanations: TreeSHAP per decision pattern ------------------------------------------


@pytest.mark.parametrize("zero_as_missing", [False, True])
def test_pattern_tree_shap_equals_pred_contrib(zero_as_missing):
    """Same contributions as LightGBM's own ``pred_contrib`` on rows with NaN, zeros, values
    below LightGBM's zero threshold, values equal to split thresholds and repeated patterns."""
    import lightgbm as lgb

    from recsys.rank.explain import PatternTreeShap

    rng = np.random.default_rng(5)
    n, f = 3000, 6
    x = rng.normal(size=(n, f))
    x[:, 1] = np.round(x[:, 1], 1)  # few distinct values: many rows share a pattern
    x[rng.random((n, f)) < 0.15] = np.nan
    x[rng.random((n, f)) < 0.1] = 0.0
    y = np.nan_to_num(x[:, 0]) + (x[:, 1] > 0) + np.isnan(x[:, 2]) + rng.normal(scale=0.1, size=n)
    params = {"objective": "regression", "num_leaves": 15, "verbose": -1, "zero_as_missing": zero_as_missing}
    booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=25)
    shap = PatternTreeShap(booster, 20)
    assert shap.trees is not None and len(shap.trees) == 20
    kinds = {m for t in shap.trees for m in t["missing"]}
    assert ("Zero" if zero_as_missing else "NaN") in kinds  # the missing-value branches are exercised
    rows = x[:800].copy()
    rows[:50, 3] = 1e-40  # LightGBM reads it as 0
    thresholds = np.concatenate([t["threshold"][t["feature"] == 0] for t in shap.trees])
    rows[50 : 50 + len(thresholds[:50]), 0] = thresholds[:50]  # exactly on a split
    ref = booster.predict(rows, num_iteration=20, pred_contrib=True)[:, :-1]
    got = shap(rows)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert not np.allclose(got, booster.predict(rows, num_iteration=25, pred_contrib=True)[:, :-1])
    # Later calls read the patterns cached by earlier ones: same values, bit for bit, as a fresh
    # instance and as one without a cache.
    computed: list[int] = []
    predict = booster.predict
    booster.predict = lambda data, **kw: computed.append(len(data)) or predict(data, **kw)
    later = x[500:1500]
    fresh = PatternTreeShap(booster, 20)(later)
    n_fresh = sum(computed)
    computed.clear()
    again = shap(later)
    assert 0 < sum(computed) < n_fresh / 2  # most of its patterns were known already
    booster.predict = predict
    np.testing.assert_array_equal(again, fresh)
    np.testing.assert_array_equal(again, PatternTreeShap(booster, 20, max_cached=0)(later))
    np.testing.assert_allclose(again, booster.predict(later, num_iteration=20, pred_contrib=True)[:, :-1], atol=1e-12)


def test_pattern_explanations_equal_the_plain_pred_contrib(pipeline, monkeypatch):
    """The export's ``explain_features`` strings are the same with the per-pattern TreeSHAP as
    with one ``pred_contrib`` call."""
    p = pipeline
    users = list(p.users.ids)

    def run() -> pl.DataFrame:
        opts = ExplainOptions(enabled=False, top_features=3, feature_ranks=None)
        return Engine(p, BusinessRules().compile(p.items, p.now), 10, "fused", opts).recommend(p.histories(users))

    got = run()
    plain = explain_module.PatternTreeShap.__init__

    def no_patterns(self, booster, num_iteration):
        plain(self, booster, num_iteration)
        self.trees = None  # the fallback: one plain pred_contrib call

    monkeypatch.setattr(explain_module.PatternTreeShap, "__init__", no_patterns)
    ref = run()
    assert got.equals(ref)
    assert got["explain_features"].null_count() == 0


@pytest.mark.parametrize("frozen", [False, True])
def test_numpy_user_tower_equals_the_torch_user_encoder(tmp_path, frozen):
    """The export's user tower (numpy + a compiled pooling loop) against ``UserEncoder`` with
    random trained-looking weights: empty histories, histories longer than ``max_history``, a
    frozen history side; after a save/load round trip too."""
    from recsys.text.encoder import UserEncoder
    from recsys.text.history_tower import HistoryTower

    rng = np.random.default_rng(3)
    n_items, d, max_history = 50, 16, 6
    enc = UserEncoder(d, max_history, recency_decay=0.3)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.from_numpy(rng.normal(0, 0.5, tuple(p.shape)).astype(np.float32)))
    items = rng.normal(size=(n_items, d)).astype(np.float32)
    side = rng.normal(size=(n_items, d)).astype(np.float32) if frozen else None
    seqs = [rng.integers(0, n_items, rng.integers(0, 12)) for _ in range(300)] + [np.zeros(0, dtype=np.int64)]
    weights = {k: v.numpy().copy() for k, v in enc.state_dict().items()}
    tower = HistoryTower(weights, items, side)
    with torch.no_grad():
        expected = enc.embed_histories(torch.from_numpy(items if side is None else side), seqs).numpy()
    got = tower.encode_users(seqs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not got[-1].any()  # no history: the zero vector
    again = HistoryTower.load(tmp_path / "again", tower.save(tmp_path / "again"))
    np.testing.assert_array_equal(again.encode_users(seqs), got)


def test_a_user_encoder_of_the_wrong_shape_is_named(tmp_path):
    from safetensors.numpy import save_file

    from recsys.errors import InputError
    from recsys.text.history_tower import HistoryTower

    d = 8
    tower = HistoryTower(
        {
            "position_bias": np.zeros(5, np.float32),
            "content.weight": np.zeros((1, d), np.float32),
            "content.bias": np.zeros(1, np.float32),
            "residual.weight": np.zeros((d, d), np.float32),
        },
        np.ones((4, d), np.float32),
    )
    saved = tower.save(tmp_path / "t")
    with pytest.raises(InputError, match=r"position_bias: \(5,\), not \(7,\)"):
        HistoryTower.load(tmp_path / "t", {**saved, "max_history": 7})
    save_file({"position_bias": np.zeros(5, np.float32)}, str(tmp_path / "t" / HistoryTower.USER_ENCODER))
    with pytest.raises(InputError, match="residual.weight: missing") as info:
        HistoryTower.load(tmp_path / "t", saved)
    assert info.value.file == str(tmp_path / "t" / HistoryTower.USER_ENCODER)


@pytest.mark.parametrize("shuffled", [False, True])
def test_histories_gather_equals_a_filter_and_sort(pipeline, shuffled):
    """``TrainedPipeline.histories`` gathers the stored users' row ranges instead of filtering
    the whole stored history per chunk: same rows, same order, with given histories replacing
    some users' and unknown users, from a stored history in any row order."""
    import dataclasses

    from recsys.pipeline_model import HISTORY_COLUMNS

    p = pipeline
    if shuffled:
        p = dataclasses.replace(p, history=p.history.sample(fraction=1.0, shuffle=True, seed=1))
    rng = np.random.default_rng(5)
    ids = list(p.users.ids)
    users = sorted([ids[j] for j in rng.choice(len(ids), len(ids) // 2, replace=False)] + ["nobody"])
    given = pl.DataFrame({Columns.User: [users[0], users[0], "nobody"], Columns.Item: p.item_ids[:3].tolist()})
    got = p.histories(users, given)
    # The reference: the replaced per-chunk filter, then one sort.
    gidx = p.users.index(users)
    supplied = np.isin(np.arange(len(users)), [0, users.index("nobody")])
    stored = np.flatnonzero((gidx >= 0) & ~supplied)
    remap = np.full(len(p.users), -1, dtype=np.int32)
    remap[gidx[stored]] = stored
    h = p.history.filter(pl.col(Columns.UserIdx).is_in(gidx[stored].tolist()))
    h = h.with_columns(pl.Series(Columns.UserIdx, remap[h[Columns.UserIdx].to_numpy()])).select(HISTORY_COLUMNS)
    ref = pl.concat([got.history.interactions.filter(pl.col(Columns.UserIdx).is_in([0, users.index("nobody")])), h])
    ref = ref.sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True)
    assert got.history.interactions.equals(ref)
    assert got.history.interactions.filter(pl.col(Columns.UserIdx) == 0).height == 2  # given replaced stored
    assert h.height > 300


def test_an_item_knn_row_without_a_neighbour_in_the_recent_history_has_no_explanation():
    """Item-kNN scores the whole history; the explanation reads its last ``history_items``. An
    item that is no neighbour of any of those has no explaining item (null), not the first of
    them at similarity 0 (MovieLens: heavy users were shown an unrelated film "because of" it)."""
    import scipy.sparse as sp

    from recsys.rank.explain import HistoryExplainer

    class Knn:  # item 0 is a neighbour of item 5 only; item 1 of item 2
        def item_space(self):
            return sp.csr_matrix(([0.4, 0.7], ([5, 2], [0, 1])), shape=(6, 6), dtype=np.float32)

    rows = pl.DataFrame({Columns.UserIdx: [0, 0, 1], Columns.ItemIdx: [0, 1, 0], Columns.Source: ["itemknn"] * 3})
    # User 0: item 5 long ago (beyond the 2 recent items read), then 2 and 3; user 1: 3, 5.
    item, sim = HistoryExplainer({"itemknn": Knn()}, history_items=2)(rows, [np.array([5, 2, 3]), np.array([3, 5])])
    assert item.tolist() == [-1, 2, 5]
    assert np.isnan(sim[0]) and sim[1:].tolist() == pytest.approx([0.7, 0.4])


def test_feature_explanations_read_three_decimals_and_no_negative_zero():
    """``name:+0.123`` as documented: "+0.320", not "+0.32"; a contribution that rounds to zero
    reads "+0.000", not "-0.0"; features by absolute contribution."""
    from recsys.rank.explain import feature_explanations

    contributions = np.array([[0.32, -0.0001, 1.23456], [-2.5, 0.0004, 0.1]])
    text = feature_explanations(pl.DataFrame({"r": [0, 1]}), contributions, np.array([True, True]), ["x", "y", "z"], 3)
    assert text.to_list() == ["z:+1.235;x:+0.320;y:+0.000", "x:-2.500;z:+0.100;y:+0.000"]
