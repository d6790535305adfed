"""What training registers is the pipeline refitted on every event (``model.refit_all``)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
from export_support import MODEL_NAME, trained_run

from recsys.columns import Columns
from recsys.export.pyfunc import PipelineModel, serving_defaults
from recsys.pipeline_model import TrainedPipeline

# Each test reads the shared trained run's MLflow store (model registry, cards): end to end.
pytestmark = pytest.mark.slow


def test_served_model_holds_each_users_last_event_and_it_changes_their_lists():
    run = trained_run()
    served = TrainedPipeline.load(run.output / "pipeline")
    evaluated = TrainedPipeline.load(run.output / "pipeline_evaluated")
    # Every event of the data set, test events included, is in the served history.
    last = served.history.sort(Columns.UserIdx, Columns.Timestamp).group_by(Columns.UserIdx).last()
    old = evaluated.history.join(last, on=[Columns.UserIdx, Columns.ItemIdx, Columns.Timestamp], how="semi")
    assert served.history.height > evaluated.history.height
    held_out = last.join(old, on=[Columns.UserIdx, Columns.ItemIdx, Columns.Timestamp], how="anti")
    assert held_out.height > 0.5 * last.height  # users with a test event: their last one is new

    users = served.users.ids[held_out[Columns.UserIdx].to_numpy()].tolist()
    frame = pl.DataFrame({Columns.User: users})
    k = 10
    before = PipelineModel(evaluated, serving_defaults(k=k)).predict(frame)
    after = PipelineModel(served, serving_defaults(k=k)).predict(frame)
    lists = {
        name: df.group_by(Columns.User).agg(pl.col(Columns.Item).sort_by(Columns.Rank)).sort(Columns.User)
        for name, df in (("before", before), ("after", after))
    }
    changed = np.mean(
        [a != b for a, b in zip(lists["before"][Columns.Item], lists["after"][Columns.Item], strict=True)]
    )
    assert changed > 0.5, changed
    # The held-out item is now history: the served model never proposes it again.
    item_ids = served.item_ids
    last_item = dict(zip(users, item_ids[held_out[Columns.ItemIdx].to_numpy()].tolist(), strict=True))
    assert not after.filter(pl.col(Columns.Item) == pl.col(Columns.User).replace_strict(last_item)).height
    assert before.filter(pl.col(Columns.Item) == pl.col(Columns.User).replace_strict(last_item)).height > 0


def test_the_evaluated_pipeline_is_logged_beside_the_registered_one():
    run = trained_run()
    mlflow.set_tracking_uri(run.tracking_uri)
    version = mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.run_id == run.run_id
    experiment = mlflow.get_run(run.run_id).info.experiment_id
    logged = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    assert {"model", "model_evaluated"} <= {m.name for m in logged if m.source_run_id == run.run_id}
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion")) / "data" / "pipeline"
    assert TrainedPipeline.load(local).history.height == TrainedPipeline.load(run.output / "pipeline").history.height


def test_the_card_states_the_feature_time_and_the_table_has_recent_popularity():
    import json

    run = trained_run()
    card = json.loads((run.output / "evaluation" / "protocol.json").read_text())
    # The shared run uses split=global_time: one cut for everybody (test_asof covers per-user cuts).
    assert card["feature_time"].startswith("as of the stage's end: one cut for everybody"), card["feature_time"]
    assert "recent_popularity" in card["models"]
    table = pl.read_csv(run.output / "metrics.csv")
    assert "recent_popularity" in table["model"].to_list()
