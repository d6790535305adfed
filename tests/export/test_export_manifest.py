"""The export's manifest counts what a user of the output should know (issue 24): unknown users
with no history (nothing personal to rank on), history rows naming an item outside the
catalogue (ignored), and lists shorter than k."""

from __future__ import annotations

import json

import polars as pl
import pytest

from recsys.columns import Columns
from recsys.export.batch import export_recommendations
from recsys.export.engine import Engine, ExplainOptions
from recsys.rank.rules import BusinessRules


@pytest.fixture(scope="module")
def pipeline():
    from export_support import trained_run

    from recsys.pipeline_model import TrainedPipeline

    return TrainedPipeline.load(trained_run().pipeline_dir)


def test_manifest_counts_unknown_users_ignored_history_rows_and_short_lists(pipeline, tmp_path):
    p = pipeline
    known = list(p.users.ids[:5])
    items = p.items[Columns.Item].to_list()
    given = pl.DataFrame(
        {
            Columns.User: ["fresh", "fresh", "fresh", "ghost-only"],
            Columns.Item: [items[0], "no-such-item", items[1], "also-missing"],
            Columns.Timestamp: [1, 2, 3, 4],
        }
    )
    users = [*known, "fresh", "ghost-only", "stranger"]
    k = p.n_items + 5  # longer than the catalogue: every list is shorter than k
    engine = Engine(p, BusinessRules().compile(p.items, p.now), k, "fused", ExplainOptions())
    out = tmp_path / "r.parquet"
    result = export_recommendations(engine, users, out, histories=given, chunk_size=3, progress=False)
    m = result.manifest
    # "ghost-only" brought rows, but none with a known item: as unknown as "stranger".
    assert m["unknown_users_without_history"] == 2
    assert m["history_rows_with_unknown_items"] == 2
    assert m["lists_shorter_than_k"] == len(users)
    assert json.loads(result.manifest_path.read_text())["history_rows_with_unknown_items"] == 2

    engine = Engine(p, BusinessRules().compile(p.items, p.now), 5, "fused", ExplainOptions())
    plain = export_recommendations(engine, known, tmp_path / "plain.parquet", progress=False).manifest
    assert (plain["unknown_users_without_history"], plain["history_rows_with_unknown_items"]) == (0, 0)
    assert plain["lists_shorter_than_k"] == 0
