"""The REST server's answer is strict JSON: a missing value (no feature explanation past
``explain.feature_ranks``, no history item to explain with) is ``null``, never a bare ``NaN``
token, which ``JSON.parse`` and every strict parser reject."""

from __future__ import annotations

import io
import json

import mlflow
import pandas as pd
import pytest
from export_support import MODEL_NAME, trained_run

from recsys.columns import Columns


def strict_loads(text: str):
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def model():
    mlflow.set_tracking_uri(trained_run().tracking_uri)
    return mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")


def served(model, request: pd.DataFrame, params: dict) -> list[dict]:
    """The ``predictions`` of ``POST /invocations``, written as ``mlflow models serve`` writes them."""
    from mlflow.pyfunc.scoring_server import predictions_to_json

    buf = io.StringIO()
    predictions_to_json(model.predict(request, params=params), buf)
    return strict_loads(buf.getvalue())["predictions"]


def test_the_readme_request_is_strict_json_with_null_feature_explanations(model):
    rows = served(model, pd.DataFrame({Columns.User: ["U00001"]}), {"k": 5})
    assert [r[Columns.Rank] for r in rows] == [1, 2, 3, 4, 5]
    # Feature contributions are computed for ranks <= 3 only (explain.feature_ranks).
    assert all(isinstance(r["explain_features"], str) for r in rows[:3])
    assert [r["explain_features"] for r in rows[3:]] == [None, None]


def test_a_user_without_a_usable_history_gets_null_history_explanations(model):
    # The only history row names an item outside the catalogue: no history item explains the list.
    request = pd.DataFrame({Columns.User: ["ghost"], Columns.Item: ["no-such-item"]})
    rows = served(model, request, {"k": 5})
    assert len(rows) == 5
    for r in rows:
        assert r["explain_item"] is None and r["explain_similarity"] is None
        assert isinstance(r[Columns.Score], float) and isinstance(r[Columns.Item], str)
    assert [r["explain_features"] for r in rows[3:]] == [None, None]


def test_predict_keeps_the_output_dtypes(model):
    """The missing values are None, and a polars round trip still gives the export's schema."""
    import polars as pl

    from recsys.export.engine import OUTPUT_SCHEMA

    out = model.predict(pd.DataFrame({Columns.User: ["U00001"]}), params={"k": 5})
    assert out["explain_features"].isna().tolist() == [False, False, False, True, True]
    assert pl.from_pandas(out).schema == pl.Schema(OUTPUT_SCHEMA)
