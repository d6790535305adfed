"""The report's building blocks against independent references: metrics (torchmetrics.retrieval
and brute force), beyond-accuracy measures (brute force), segments (exact partitions), rendering."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torchmetrics.functional import retrieval as tm

from recsys.evaluation.beyond import beyond_accuracy, gini, intra_list_diversity
from recsys.evaluation.metrics import accuracy_metrics, curves, hits_matrix, ranking_metrics
from recsys.evaluation.render import Document, Figure, Section, Table, Text, to_html, to_markdown
from recsys.evaluation.segments import build_segments, history_bucket_labels, popularity_deciles

KS = (5, 10, 20, 50)


def random_case(n_users: int = 40, n_items: int = 120, max_rel: int = 4, seed: int = 0):
    """Random positive scores over the whole catalogue (no ties) and 1..max_rel relevant items."""
    rng = np.random.default_rng(seed)
    scores = rng.random((n_users, n_items)) + 0.01  # torchmetrics' AP ignores targets with score <= 0
    rel = np.zeros((n_users, n_items), dtype=bool)
    for u in range(n_users):
        rel[u, rng.choice(n_items, rng.integers(1, max_rel + 1), replace=False)] = True
    ranked = np.argsort(-scores, axis=1, kind="stable")
    return scores, rel, ranked


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_torchmetrics_retrieval(seed):
    scores, rel, ranked = random_case(seed=seed)
    ours = accuracy_metrics(ranked[:, :60], sp.csr_matrix(rel.astype(np.float32)), KS)
    for u in range(len(scores)):
        p, t = torch.tensor(scores[u]), torch.tensor(rel[u])
        for k in KS:
            ref = {
                "recall": tm.retrieval_recall(p, t, top_k=k),
                "ndcg": tm.retrieval_normalized_dcg(p, t, top_k=k),
                "mrr": tm.retrieval_reciprocal_rank(p, t, top_k=k),
                "hitrate": tm.retrieval_hit_rate(p, t, top_k=k),
                "precision": tm.retrieval_precision(p, t, top_k=k),
            }
            for name, value in ref.items():
                assert ours[f"{name}_at_{k}"][u] == pytest.approx(float(value), abs=1e-6), (name, k, u)


def brute_force_map(ranked_row: np.ndarray, relevant: set[int], k: int) -> float:
    hits, total = 0, 0.0
    for i, item in enumerate(ranked_row[:k], start=1):
        if item in relevant:
            hits += 1
            total += hits / i
    return total / min(len(relevant), k)


def test_map_matches_brute_force_and_torchmetrics_with_one_target():
    scores, rel, ranked = random_case(max_rel=5, seed=3)
    ours = accuracy_metrics(ranked[:, :60], sp.csr_matrix(rel.astype(np.float32)), KS)
    for u in range(len(scores)):
        for k in KS:
            assert ours[f"map_at_{k}"][u] == pytest.approx(brute_force_map(ranked[u], set(np.flatnonzero(rel[u])), k))
    # With one relevant item per user (leave-one-out) MAP@K is torchmetrics' AP@K.
    scores, rel, ranked = random_case(max_rel=1, seed=4)
    ours = accuracy_metrics(ranked[:, :60], sp.csr_matrix(rel.astype(np.float32)), KS)
    for u in range(len(scores)):
        ref = tm.retrieval_average_precision(torch.tensor(scores[u]), torch.tensor(rel[u]), top_k=20)
        assert ours["map_at_20"][u] == pytest.approx(float(ref))


def test_extended_metrics_agree_with_the_training_table_and_curves():
    _, rel, ranked = random_case(seed=5)
    relevant = sp.csr_matrix(rel.astype(np.float32))
    lists = ranked[:, :50].copy()
    lists[::7, 30:] = -1  # padded lists: shorter than K
    old, new = ranking_metrics(lists, relevant, (10, 20)), accuracy_metrics(lists, relevant, (10, 20, 50))
    for name in ("recall_at_10", "ndcg_at_20", "hitrate_at_10", "precision_at_20"):
        np.testing.assert_allclose(new[name], old[name])
    np.testing.assert_allclose(new["mrr_at_50"], old["mrr"])
    c = curves(hits_matrix(lists, relevant), np.diff(relevant.indptr))
    assert c["ndcg"][9] == pytest.approx(new["ndcg_at_10"].mean())
    assert c["recall"][49] == pytest.approx(new["recall_at_50"].mean())


def test_beyond_accuracy_against_brute_force():
    rng = np.random.default_rng(0)
    n_items, k = 30, 5
    lists = np.array([rng.choice(n_items, k, replace=False) for _ in range(12)])
    lists[0, 3:] = -1
    emb = rng.normal(size=(n_items, 8))
    counts = rng.integers(0, 20, n_items)
    got = beyond_accuracy(lists, counts, emb)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    ild = []
    for row in lists:
        items = row[row >= 0]
        cos = [unit[i] @ unit[j] for a, i in enumerate(items) for b, j in enumerate(items) if a != b]
        ild.append(1 - np.mean(cos))
    assert got["diversity"] == pytest.approx(np.mean(ild), rel=1e-5)
    items = lists[lists >= 0]
    assert got["coverage"] == pytest.approx(len(set(items.tolist())) / n_items)
    p = (counts + 1) / (counts.sum() + n_items)
    assert got["novelty"] == pytest.approx(np.mean([-np.log2(p[i]) for i in items]))
    pct = [100 * (np.sum(counts < counts[i]) + (np.sum(counts == counts[i]) - 1) / 2) / (n_items - 1) for i in items]
    assert got["popularity_percentile"] == pytest.approx(np.mean(pct))
    exposure = np.bincount(items, minlength=n_items)
    mean_abs_diff = np.abs(exposure[:, None] - exposure[None, :]).sum() / (2 * n_items**2 * exposure.mean())
    assert got["gini"] == pytest.approx(mean_abs_diff)


def test_gini_and_diversity_extremes():
    assert gini(np.ones(10)) == 0.0
    assert gini(np.r_[np.zeros(9), 5.0]) == pytest.approx(0.9)
    same = np.tile([[1.0, 0.0]], (4, 1))
    assert intra_list_diversity(np.array([[0, 1, 2, 3]]), same) == pytest.approx(0.0)


def test_segments_partition_users_items_and_target_events():
    rng = np.random.default_rng(2)
    n_users, n_items = 300, 80
    history = rng.integers(0, 70, n_users)
    counts = np.where(rng.random(n_items) < 0.2, 0, rng.integers(1, 50, n_items))
    relevant = [rng.choice(n_items, rng.integers(1, 4), replace=False) for _ in range(n_users)]
    segs = build_segments(history, counts, relevant)
    kinds = {s.kind for s in segs}
    assert kinds == {"user history length", "target item", "target item popularity"}
    users = [s for s in segs if s.kind == "user history length"]
    np.testing.assert_array_equal(np.sum([s.users for s in users], axis=0), np.ones(n_users))
    n_targets = sum(len(r) for r in relevant)
    for kind in ("target item", "target item popularity"):
        item_segs = [s for s in segs if s.kind == kind]
        cover = np.sum([s.item_mask for s in item_segs], axis=0)
        # Every item whose segment has a target is in exactly one segment; no item twice.
        assert cover.max() == 1
        targeted = np.zeros(n_items, bool)
        targeted[np.concatenate(relevant)] = True
        assert cover[targeted].min() == 1
        events = sum(int(s.item_mask[r].sum()) for s in item_segs for r, u in zip(relevant, s.users) if u)
        assert events == n_targets
    deciles = popularity_deciles(counts)
    assert set(deciles[counts == 0]) == {"cold"}
    warm = counts > 0
    # Deciles are monotone in popularity.
    order = np.argsort(counts[warm])
    dec = np.array([int(d[1:]) for d in deciles[warm]])[order]
    assert np.all(np.diff(dec) >= 0)


def test_history_buckets_cover_every_length():
    lengths = np.arange(0, 200)
    labels = history_bucket_labels(lengths)
    assert labels[0] == "0" and labels[1] == "1-2" and labels[5] == "3-5" and labels[199] == "51+"
    assert len(set(labels.tolist())) == 7


def test_render_escapes_and_embeds():
    png = b"\x89PNG\r\n\x1a\nfake"
    doc = Document(
        "T <x>",
        "sub",
        [
            Section(
                "a", "A & B", [Text("fused beats ALS", True), Table(["m", "v"], [["<b>", 0.5]]), Figure("f", png, "c")]
            )
        ],
    )
    html = to_html(doc)
    assert "&lt;b&gt;" in html and "<b>" not in html.replace("<body>", "")
    assert "data:image/png;base64,iVBORw0KGgpmYWtl" in html
    md = to_markdown(doc)
    assert "![c](plots/f.png)" in md and "| <b> | 0.5000 |" in md and "**fused beats ALS**" in md


def test_bundle_written_in_parts_reads_back_every_list(tmp_path, monkeypatch):
    """The recommendations file is written a block of users at a time: reading it back must give
    every model's lists (padding included), scores and the fused lists' sources."""
    import polars as pl

    import recsys.evaluation.bundle as bundle_mod
    from recsys.columns import Columns

    monkeypatch.setattr(bundle_mod, "_PART_USERS", 3)  # 8 users: parts of 3, 3 and 2
    rng = np.random.default_rng(0)
    users = np.array([2, 5, 6, 9, 11, 12, 20, 31])
    recommended, scores = {}, {}
    for name in ("fused", "als", "popularity"):
        items = rng.integers(0, 40, size=(len(users), 6))
        items[1, 4:] = -1  # a short list
        sc = np.where(items >= 0, rng.random(items.shape), np.nan).astype(np.float32)
        recommended[name], scores[name] = items, sc
    sources = rng.choice(np.array(["als", "itemknn", "text"], dtype=object), size=(len(users), 6))
    targets = pl.DataFrame({Columns.UserIdx: users, Columns.ItemIdx: rng.integers(0, 40, len(users))})
    history = pl.DataFrame({Columns.UserIdx: users, Columns.ItemIdx: rng.integers(0, 40, len(users))})
    protocol = bundle_mod.make_protocol(
        run_id="r", experiment="e", data_name="d", data_hash="h", n_users=40, n_items=40, split={},
        split_counts={}, seen_filtering=True, availability_filtering=False, ks=[5], max_k=6, seed=0,
        targets=targets, models=list(recommended), root=tmp_path,
    )  # fmt: skip
    bundle_mod.write_bundle(
        tmp_path, protocol=protocol, users=users, recommended=recommended, scores=scores, sources=sources,
        targets=targets, history=history, n_items=40,
    )  # fmt: skip
    b = bundle_mod.read_bundle(tmp_path)
    whole = b.recommendations.lazy().collect()
    assert whole.equals(bundle_mod.recommendation_frame(users, recommended, scores, sources))
    for name in recommended:
        items, sc = b.lists(name)
        assert np.array_equal(items, recommended[name])
        assert np.array_equal(sc, scores[name], equal_nan=True)
    fused = whole.filter(pl.col("model") == "fused").sort(Columns.UserIdx, Columns.Rank)
    keep = recommended["fused"].ravel() >= 0
    assert fused[Columns.Source].cast(pl.String).to_list() == sources.ravel()[keep].tolist()


def small_bundle(
    folder, targets, history, recommended: dict[str, np.ndarray], sampled_from: int | None = None, finetuning=None
):
    """A bundle of a few users over 10 items, read back from ``folder``."""
    import polars as pl

    import recsys.evaluation.bundle as bundle_mod
    from recsys.columns import Columns

    targets = pl.DataFrame({Columns.UserIdx: targets[0], Columns.ItemIdx: targets[1]})
    history = pl.DataFrame({Columns.UserIdx: history[0], Columns.ItemIdx: history[1]})
    users = np.unique(targets[Columns.UserIdx].to_numpy())
    k = next(iter(recommended.values())).shape[1]
    scores = {m: -np.arange(k, dtype=np.float32)[None].repeat(len(users), 0) for m in recommended}
    protocol = bundle_mod.make_protocol(
        run_id="r", experiment="e", data_name="d", data_hash="h", n_users=int(users.max()) + 1, n_items=10,
        split={}, split_counts={}, seen_filtering=True, availability_filtering=False, ks=[5], max_k=k, seed=0,
        targets=targets, models=list(recommended), root=folder, test_users_sampled_from=sampled_from,
    )  # fmt: skip
    bundle_mod.write_bundle(
        folder, protocol=protocol, users=users, recommended=recommended, scores=scores, sources=None,
        targets=targets, history=history, n_items=10, finetuning=finetuning,
    )  # fmt: skip
    return bundle_mod.read_bundle(folder)


def test_item_segments_count_a_repeated_target_once(tmp_path):
    """User 0 picked the cold item 3 twice in the test period. Relevance is binary: fused ranks
    item 3 first, NDCG@10 1 for that user overall, and so 1 in the cold segment too (the segment
    once counted the item twice: ideal DCG of two relevant items, 0.613)."""
    from recsys.evaluation.report import Reporter

    lists = {
        "fused": np.array([[3, 0, 1, 2, 4, 5, 6, 7, 8, 9], [4, 0, 1, 2, 3, 5, 6, 7, 8, 9]]),
        "als": np.array([[0, 3, 1, 2, 4, 5, 6, 7, 8, 9], [0, 1, 4, 2, 3, 5, 6, 7, 8, 9]]),
    }
    bundle = small_bundle(tmp_path, ([0, 0, 1], [3, 3, 4]), ([0, 1, 1], [7, 4, 5]), lists)
    reporter = Reporter(ks=(5, 10), n_bootstrap=50)
    _, numbers = reporter.document(bundle)
    assert numbers["models"]["fused"]["ndcg_at_10"] == pytest.approx(1.0)
    segments = {(s["kind"], s["segment"]): s for s in numbers["segments"]}
    cold = segments[("target item", "cold")]
    assert cold["users"] == 1 and cold["target_events"] == 1
    assert cold["ndcg_at_10"]["fused"] == pytest.approx(1.0)
    assert cold["ndcg_at_10"]["als"] == pytest.approx(1 / np.log2(3))
    # The item segments and the user segments count the same targets.
    for kind in ("target item", "target item popularity"):
        assert sum(s["target_events"] for s in numbers["segments"] if s["kind"] == kind) == 2
    assert sum(s["target_events"] for s in numbers["segments"] if s["kind"] == "user history length") == 2


def test_comparison_of_sampled_runs_says_the_users_are_a_sample(tmp_path):
    """Two runs of eval.max_users are compared on a sample of the test users: the comparison's
    subtitle and headline say so, as the single run's report does (not only a protocol row)."""
    from recsys.evaluation.compare import compare_document
    from recsys.evaluation.report import Reporter

    lists = {"fused": np.tile(np.arange(10), (2, 1)), "als": np.tile(np.arange(10)[::-1], (2, 1))}
    args = (([0, 1], [3, 4]), ([0, 1], [7, 5]), lists)
    a = small_bundle(tmp_path / "a", *args, sampled_from=300)
    b = small_bundle(tmp_path / "b", *args, sampled_from=300)
    doc, _ = compare_document(Reporter(ks=(5, 10), n_bootstrap=20), a, b)
    note = "a seeded random sample of the 300"
    assert "2 test users" in doc.subtitle and note in doc.subtitle
    assert note in doc.sections[0].blocks[0].text
    plain = small_bundle(tmp_path / "c", *args)
    doc, _ = compare_document(Reporter(ks=(5, 10), n_bootstrap=20), plain, plain)
    assert "random sample" not in doc.subtitle + doc.sections[0].blocks[0].text


def finetuning_report(folder, finetuning: dict) -> dict:
    """The report's sections, by key, of a small bundle with these fine-tuning figures."""
    from recsys.evaluation.report import Reporter

    lists = {m: np.tile(np.arange(10), (2, 1)) for m in ("fused", "als", "text", "text_zeroshot")}
    bundle = small_bundle(folder, ([0, 1], [3, 4]), ([0, 1], [7, 5]), lists, finetuning=finetuning)
    doc, _ = Reporter(ks=(5, 10), n_bootstrap=20).document(bundle)
    return {s.key: s for s in doc.sections}


# What every run's fine-tuning figures hold (the tests below change one thing each).
FINETUNING = {"text/minutes": 0.5, "text/steps": 10.0, "text/val_ndcg_at_10_zeroshot": 0.1,
              "text/val_ndcg_at_10_finetuned": 0.2, "text/kept_zeroshot": 0.0}  # fmt: skip


def test_finetuning_text_of_a_run_without_time_budget(tmp_path):
    """text.budget_minutes=null: the fine-tuning section says there was no time budget (it printed
    "budget: None min"); the segments define cold by the test stage's history, train + validation."""
    ft = {
        **FINETUNING,
        "text/train_minutes": 0.4,
        "text/zeroshot_minutes": 0.1,
        "curve": [[0, 0.1, 0.1], [10, 0.2, 0.2]],
    }
    texts = {}
    for budget in (None, 1.5):
        sections = finetuning_report(tmp_path / str(budget), {**ft, "budget_minutes": budget})
        texts[budget] = sections["finetuning"].blocks[0].text
        assert "train + validation" in sections["segments"].blocks[0].text
    assert "None" not in texts[None] and "no time budget for training, which took 0.4" in texts[None]
    assert "budget: 1.5 min for training, which took 0.4" in texts[1.5]


def test_finetuning_text_says_when_the_time_budget_ended_training(tmp_path):
    """A tower the time budget cut short of its planned steps trained as many as the machine
    allowed: the section says so, and says nothing where the planned length ended it."""
    ft = {**FINETUNING, "text/steps": 1764.0, "budget_minutes": 1.5, "text/planned_steps": 3000.0}
    texts = {
        ended: finetuning_report(tmp_path / str(ended), {**ft, "text/budget_ended": ended})["finetuning"].blocks[0].text
        for ended in (0.0, 1.0)
    }
    assert "the time budget ended it at step 1,764 of the 3,000 planned" in texts[1.0]
    assert "time budget ended" not in texts[0.0]


def test_finetuning_text_names_the_point_between_start_and_trained_weights(tmp_path):
    """text.module.interpolation: the section says where the kept weights lie when they are not
    the trained ones, and says nothing of it when they are."""
    ft = {**FINETUNING, "budget_minutes": 1.5}
    texts = {
        alpha: finetuning_report(tmp_path / str(alpha), {**ft, "text/interpolation": alpha})["finetuning"]
        .blocks[0]
        .text
        for alpha in (0.5, 1.0)
    }
    assert "weights 0.5 of the way from the zero-shot start to the trained ones" in texts[0.5]
    assert "of the way" not in texts[1.0] and texts[1.0].endswith("fine-tuned 0.2000.")
