"""An export whose rules leave lists shorter than k says so (a warning with what each list rule
removed), and one whose rules leave every list empty says so louder, naming the rule and, for
``rules.min_score``, the range the scorer's scores are on (the fused ranker's are LambdaMART raw
scores, not probabilities); an export with full lists says nothing."""

from __future__ import annotations

import logging

import polars as pl
import pytest

from recsys.columns import Columns
from recsys.export.batch import export_recommendations
from recsys.export.engine import Engine, ExplainOptions
from recsys.rank.rules import BusinessRules

LOGGER = "recsys.export.batch"


@pytest.fixture(scope="module")
def pipeline():
    from export_support import trained_run

    from recsys.pipeline_model import TrainedPipeline

    return TrainedPipeline.load(trained_run().pipeline_dir)


def export(pipeline, tmp_path, rules: BusinessRules, k: int = 5, scorer: str = "fused", users=None):
    p = pipeline
    engine = Engine(p, rules.compile(p.items, p.now), k, scorer, ExplainOptions(enabled=False, top_features=0))
    users = list(p.users.ids[:6]) if users is None else users
    return export_recommendations(engine, users, tmp_path / "r.parquet", chunk_size=4, progress=False)


def messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_full_lists_log_nothing(pipeline, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    m = export(pipeline, tmp_path, BusinessRules()).manifest
    assert m["lists_shorter_than_k"] == 0 and m["rows"] == 6 * 5
    assert messages(caplog, logging.WARNING) == [] and messages(caplog, logging.ERROR) == []


def test_a_min_score_above_every_score_is_an_error_naming_it_and_the_score_range(pipeline, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # A LambdaMART raw score of 10 is out of reach (the reported 0.1 was, for most users).
    result = export(pipeline, tmp_path, BusinessRules(min_score=10.0))
    m = result.manifest
    assert m["rows"] == 0 and m["lists_shorter_than_k"] == 6
    lo, hi = m["score_range"]
    assert lo <= hi < 10.0
    (error,) = messages(caplog, logging.ERROR)
    assert "every one of the 6 list(s) is empty" in error
    assert f"rules.min_score=10.0 removed all {m['removed_by_rule']['min_score']} candidates" in error
    assert f"scores range from {lo:.4g} to {hi:.4g}" in error and str(result.manifest_path) in error


def test_short_lists_are_a_warning_with_the_rule_counts(pipeline, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    p = pipeline
    # Between the lowest and the highest fused score: some rows stay, the lists come out short.
    full = export(p, tmp_path / "full", BusinessRules(), k=10)
    scores = pl.read_parquet(full.path)[Columns.Score].sort()
    caplog.clear()
    m = export(p, tmp_path / "cut", BusinessRules(min_score=float(scores[len(scores) // 2])), k=10).manifest
    assert 0 < m["rows"] < 6 * 10 and m["lists_shorter_than_k"] > 0
    assert messages(caplog, logging.ERROR) == []
    (warning,) = messages(caplog, logging.WARNING)
    assert f"{m['lists_shorter_than_k']} of 6 list(s) shorter than k=10" in warning
    assert f"rules.min_score removed {m['removed_by_rule']['min_score']}" in warning
    lo, hi = m["score_range"]
    assert f"scores range from {lo:.4g} to {hi:.4g}" in warning


def test_the_category_cap_of_the_readme_example_is_a_warning_naming_it(pipeline, tmp_path, caplog):
    """``k=50 rules.max_per_category=3`` (README) on a catalogue of 10 categories: at most 30 rows."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    m = export(pipeline, tmp_path, BusinessRules(max_per_category=3), k=50).manifest
    assert m["lists_shorter_than_k"] == 6 and 0 < m["rows"] <= 6 * 30
    (warning,) = messages(caplog, logging.WARNING)
    assert "6 of 6 list(s) shorter than k=50" in warning
    assert f"rules.max_per_category removed {m['removed_by_rule']['category_cap']}" in warning
    assert m["score_range"] is None  # only counted while rules.min_score is set


def test_users_without_history_explain_an_empty_export_of_a_history_reading_scorer(pipeline, tmp_path, caplog):
    """Unknown users given no history get no list from ALS (it reads histories); the error said
    only that 'the model had no candidates left'. Fused still lists them, from popularity."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    m = export(pipeline, tmp_path / "als", BusinessRules(), scorer="als", users=["nobody", "no-one"]).manifest
    assert m["rows"] == 0 and m["unknown_users_without_history"] == 2
    (error,) = messages(caplog, logging.ERROR)
    assert "every user is unknown to the model and given no history; the als scorer reads" in error
    caplog.clear()
    m = export(pipeline, tmp_path / "fused", BusinessRules(), users=["nobody"]).manifest
    assert m["rows"] == 5 and messages(caplog, logging.ERROR) == []


def test_a_k_beyond_the_fused_candidates_is_a_warning_naming_them_not_the_catalogue(pipeline, tmp_path, caplog):
    """The fused scorer ranks only each user's candidates (the union of ``rank.n_candidates``):
    ``k=200`` on MovieLens-100k (1,682 items, candidates 190 at most) left every list at 124-158
    rows, and the warning blamed 'the catalogue less the user's history', which held 1,500+."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    p = pipeline
    k = sum(p.n_candidates.values()) + 1
    m = export(p, tmp_path / "fused", BusinessRules(), k=k).manifest
    assert m["lists_shorter_than_k"] == 6 and m["rows"] <= 6 * (k - 1)
    (warning,) = messages(caplog, logging.WARNING)
    assert "6 of 6 list(s) shorter than k=" in warning
    assert f"rank.n_candidates: {dict(p.n_candidates)}, at most {k - 1} items" in warning
    assert "the catalogue less" not in warning
    caplog.clear()
    # What it says of a single scorer stays (ALS ranks the whole catalogue: full lists where it has k items).
    k_als = p.n_items + 1
    m = export(p, tmp_path / "als", BusinessRules(), k=k_als, scorer="als").manifest
    (warning,) = messages(caplog, logging.WARNING)
    assert "the catalogue less the user's history and the masked items holds fewer than k" in warning
    assert "rank.n_candidates" not in warning
