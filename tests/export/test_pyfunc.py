"""The trained pipeline as an MLflow pyfunc model: registered, loadable, and equal to the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pandas as pd
import polars as pl
import pytest
from export_support import MODEL_NAME, REPO, trained_run
from polars.testing import assert_frame_equal

from recsys.columns import Columns


@pytest.fixture(scope="module")
def run():
    r = trained_run()
    mlflow.set_tracking_uri(r.tracking_uri)
    return r


def test_model_is_registered_with_alias_and_explicit_requirements(run):
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.run_id == run.run_id
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion")
    with open(os.path.join(local, "requirements.txt")) as f:
        reqs = f.read()
    assert "torch==2.13.0" in reqs and "lightgbm==" in reqs and "implicit==" in reqs
    files = [os.path.join(d, f) for d, _, fs in os.walk(local) for f in fs]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin"))], "nothing pickled"


@pytest.mark.slow
def test_predict_equals_cli_export_for_the_same_users(run, tmp_path):
    """Known users (stored history), a known user with a new history, and a brand-new user."""
    users_df = pl.read_parquet(run.pipeline_dir / "users.parquet")
    known = users_df[Columns.User].sort().to_list()[:6]
    items = pl.read_parquet(run.pipeline_dir / "items.parquet")[Columns.Item].sort().to_list()
    histories = pl.DataFrame(
        {
            Columns.User: ["zz_new"] * 3 + [known[0]] * 2,
            Columns.Item: items[:3] + items[10:12],
            Columns.Timestamp: [1, 2, 3, 1, 2],
            Columns.Event: ["click", "purchase", "click", "click", "click"],
        }
    )
    histories.write_csv(tmp_path / "histories.csv")
    (tmp_path / "users.txt").write_text("\n".join([*known, "zz_new"]))
    out = tmp_path / "recs.parquet"
    cmd = [
        sys.executable,
        "-m",
        "recsys.recommend",
        f"model_uri=models:/{MODEL_NAME}@champion",
        f"paths.mlruns_dir={run.mlruns}",
        f"users={tmp_path / 'users.txt'}",
        f"histories={tmp_path / 'histories.csv'}",
        f"output={out}",
        "k=15",
        "progress=false",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cli = pl.read_parquet(out)

    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    request = pd.concat(
        [histories.to_pandas(), pd.DataFrame({Columns.User: known[1:]})], ignore_index=True
    )  # item_id null for users 1..5: their stored history
    # The CLI extends a known user's stored history with the file's rows (histories_mode=extend,
    # its default); the pyfunc model does so when asked (it replaces it by default).
    got = pl.from_pandas(model.predict(request, params={"k": 15, "histories_mode": "extend"}))
    assert set(cli[Columns.User]) == {*known, "zz_new"}
    assert cli.filter(pl.col(Columns.User) == "zz_new").height == 15
    assert_frame_equal(got.select(cli.columns), cli)
    # The extended history changed that user's list; the stored one still gives the training export.
    plain = pl.from_pandas(model.predict(pd.DataFrame({Columns.User: [known[0]]}), params={"k": 15}))
    assert plain[Columns.Item].to_list() != cli.filter(pl.col(Columns.User) == known[0])[Columns.Item].to_list()


def test_bad_input_is_a_clear_error(run):
    from recsys.errors import InputError

    model = mlflow.pyfunc.load_model(f"runs:/{run.run_id}/model")
    with pytest.raises(Exception, match="event outside"):
        model.predict(pd.DataFrame({Columns.User: ["u"], Columns.Item: ["x"], Columns.Event: ["view"]}))
    assert issubclass(InputError, Exception)
