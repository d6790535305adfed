"""The list rules (``apply_rules_dense``, and ``apply_rules`` on a long frame, which runs it)
against a plain Python loop over each user's ranked candidates: same lists, ranks and counts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import polars as pl
import pytest

from recsys.columns import Columns
from recsys.rank.rules import BusinessRules, CompiledRules, apply_rules, apply_rules_dense
from recsys.topk import top_k

N_ITEMS = 15


def catalogue() -> pl.DataFrame:
    return pl.DataFrame(
        {
            Columns.Item: [f"i{i}" for i in range(N_ITEMS)],
            Columns.ItemIdx: np.arange(N_ITEMS, dtype=np.int32),
            "category": [f"c{i % 4}" if i % 7 else None for i in range(N_ITEMS)],  # nulls: one more category
            "available_from": [None if i % 5 else 50 for i in range(N_ITEMS)],  # i0, i5, i10 listed later
        }
    )


def reference(frame: pl.DataFrame, rules: BusinessRules, k: int) -> tuple[list[tuple[int, int, int]], Counter]:
    """(user, item, rank) of every kept row, and the rows each active rule removed: each user's
    finite candidates by (score desc, item asc); a candidate is dropped by the first rule it
    breaks, in the order item rules, minimum score, category cap; the rest are ranked and cut."""
    items = catalogue()
    category = items["category"].fill_null("").to_list()
    allowed = np.ones(N_ITEMS, dtype=bool)
    if rules.allowlist is not None:
        allowed &= np.isin(items[Columns.Item].to_numpy(), list(rules.allowlist))
    if rules.blocklist is not None:
        allowed &= ~np.isin(items[Columns.Item].to_numpy(), list(rules.blocklist))
    if rules.at is not None:
        allowed &= np.array([v is None or v <= rules.at for v in items["available_from"].to_list()])
    # A rule that is on is counted even when it removed nothing; the catalogue's availability
    # column makes the item rules always on.
    removed: Counter = Counter()
    for name, on in (
        ("item_rules_late", True),
        ("min_score", rules.min_score is not None),
        ("category_cap", rules.max_per_category is not None),
    ):
        if on:
            removed[name] += 0
    kept = []
    for user in sorted(set(frame[Columns.UserIdx].to_list())):
        rows = frame.filter(pl.col(Columns.UserIdx) == user)
        cands = [
            (float(s), int(i))
            for i, s in zip(rows[Columns.ItemIdx].to_list(), rows[Columns.Score].to_list(), strict=True)
            if s is not None and np.isfinite(s)
        ]
        per_category: Counter = Counter()
        rank = 0
        for s, i in sorted(cands, key=lambda c: (-c[0], c[1])):
            if not allowed[i]:
                removed["item_rules_late"] += 1
            elif rules.min_score is not None and s < rules.min_score:
                removed["min_score"] += 1
            elif rules.max_per_category is not None and per_category[category[i]] >= rules.max_per_category:
                removed["category_cap"] += 1
            else:
                per_category[category[i]] += 1
                rank += 1
                if rank <= k:
                    kept.append((user, i, rank))
    return kept, removed


RULES = [
    BusinessRules(),
    BusinessRules(max_per_category=2),
    BusinessRules(min_score=0.4, max_per_category=1),
    BusinessRules(blocklist=["i1", "i7"], max_per_category=2, min_score=0.2),
    BusinessRules(allowlist=[f"i{i}" for i in range(0, N_ITEMS, 2)], min_score=0.5),
    BusinessRules(at=40, max_per_category=2),  # the availability window: i0, i5, i10 not yet listed
]


def assert_exercised(rules: BusinessRules, total: Counter) -> None:
    """Each rule a case turns on removed something in some trial (``total``: summed counts)."""
    if rules.allowlist or rules.blocklist or rules.at is not None:
        assert total["item_rules_late"] > 0
    if rules.min_score is not None:
        assert total["min_score"] > 0
    if rules.max_per_category is not None:
        assert total["category_cap"] > 0


def compiled(rules: BusinessRules) -> CompiledRules:
    return rules.compile(catalogue(), now=100)


def random_frame(rng: np.random.Generator, n_users: int) -> pl.DataFrame:
    """Candidates in random row order, some users with none, scores tied (one decimal), some
    -inf, NaN or null."""
    users, items = np.nonzero(rng.random((n_users, N_ITEMS)) < 0.6)
    scores = np.round(rng.random(len(users)), 1)
    scores[rng.random(len(users)) < 0.1] = -np.inf
    scores[rng.random(len(users)) < 0.05] = np.nan
    order = rng.permutation(len(users))
    frame = pl.DataFrame(
        {
            Columns.UserIdx: users[order].astype(np.int32) * 3,  # user ids with gaps
            Columns.ItemIdx: items[order].astype(np.int32),
            Columns.Score: scores[order],
            "extra": np.arange(len(users)),
        }
    )
    return frame.with_columns(
        pl.when(pl.col("extra") % 17 == 0).then(None).otherwise(pl.col(Columns.Score)).alias(Columns.Score)
    )


@pytest.mark.parametrize("rules", RULES, ids=range(len(RULES)))
def test_apply_rules_on_a_frame_equals_the_reference(rules):
    rng = np.random.default_rng(0)
    total: Counter = Counter()
    for trial in range(20):
        frame = random_frame(rng, int(rng.integers(0, 12)))
        k = int(rng.integers(1, 8))
        c = compiled(rules)
        out = apply_rules(frame, c, k)
        ref, ref_removed = reference(frame, rules, k)
        got = list(zip(*(out[col].to_list() for col in (Columns.UserIdx, Columns.ItemIdx, Columns.Rank)), strict=True))
        assert got == ref, f"trial {trial}"
        assert dict(c.removed) == dict(ref_removed), f"trial {trial}"
        total += c.removed
        assert out.columns == [*frame.columns, Columns.Rank]
        # Each kept row is the frame's own row (its extra column and score come along).
        joined = out.join(frame, on="extra", suffix="_in")
        assert joined.height == out.height
        assert (joined[Columns.ItemIdx] == joined[f"{Columns.ItemIdx}_in"]).all()
    assert_exercised(rules, total)


@pytest.mark.parametrize("rules", RULES, ids=range(len(RULES)))
def test_apply_rules_dense_on_ranked_blocks_equals_the_reference(rules):
    """The export's path: a dense ``[users, items]`` block, ranked by ``top_k`` and cut at n."""
    rng = np.random.default_rng(1)
    total: Counter = Counter()
    for trial in range(20):
        n_users, k, n = int(rng.integers(1, 10)), int(rng.integers(1, 8)), int(rng.integers(1, N_ITEMS + 1))
        scores = np.round(rng.random((n_users, N_ITEMS)), 1).astype(np.float32)
        scores[rng.random(scores.shape) < 0.2] = -np.inf  # seen
        c = compiled(rules)
        items, top = top_k(scores, n)
        rank = apply_rules_dense(items, top, c, k)
        r, col = np.nonzero(rank)
        got = list(zip(r.tolist(), items[r, col].tolist(), rank[r, col].tolist(), strict=True))
        # The reference sees only the n cells of each row that the block holds.
        u = np.repeat(np.arange(n_users), n)
        frame = pl.DataFrame({Columns.UserIdx: u, Columns.ItemIdx: items.ravel(), Columns.Score: top.ravel()})
        ref, ref_removed = reference(frame, rules, k)
        assert got == ref, f"trial {trial}"
        assert dict(c.removed) == dict(ref_removed), f"trial {trial}"
        total += c.removed
    assert_exercised(rules, total)


def test_apply_rules_on_an_empty_frame():
    frame = pl.DataFrame(
        {Columns.UserIdx: [], Columns.ItemIdx: [], Columns.Score: []},
        schema={Columns.UserIdx: pl.Int32, Columns.ItemIdx: pl.Int32, Columns.Score: pl.Float32},
    )
    out = apply_rules(frame, compiled(BusinessRules(max_per_category=1)), 5)
    assert out.height == 0
    assert out.columns == [Columns.UserIdx, Columns.ItemIdx, Columns.Score, Columns.Rank]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        # MovieLens' items carry their genres as a list: casting it was a raw polars error.
        (
            BusinessRules(max_per_category=2, category_column="genres"),
            r"rules.category_column='genres' is a List\(String\) column.*one category per item.*'category'",
        ),
        # Found only when the first block was ranked (float('abc')), after the model had loaded.
        (BusinessRules(min_score="abc"), "rules.min_score must be a number or null, got 'abc'"),
        (BusinessRules(at="2024-05-01"), "rules.at must be a time in whole Unix seconds or null, got '2024-05-01'"),
        (BusinessRules(max_per_category=2.5), "rules.max_per_category must be a whole number >= 1, got 2.5"),
    ],
)
def test_rules_of_the_wrong_type_are_a_config_error_naming_the_setting(rules, message):
    """Every entry point binds the rules with ``compile``, so a setting of the wrong type is one
    ``ConfigError`` there (the CLI's ``error:`` line, exit 2), not a traceback mid-export."""
    from recsys.errors import ConfigError

    items = catalogue().with_columns(pl.Series("genres", [["Drama", "War"]] * N_ITEMS))
    with pytest.raises(ConfigError, match=message):
        rules.compile(items, now=100)
    # numpy integers (a time read from meta.json or an array) stay valid times and caps
    BusinessRules(at=np.int64(100), max_per_category=np.int64(2)).compile(items, now=100)
