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


def test_timestamps_as_int_seconds_iso_strings_or_datetimes_are_accepted(run):
    """Regression: the signature declared ``timestamp`` double, so MLflow refused integer
    seconds (``Can not safely convert int64 to float64``), ISO strings and datetimes before
    ``predict`` ran. Every form of the same times now gives the same rows; milliseconds are
    refused as the CLI refuses them."""
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    items = pl.read_parquet(run.pipeline_dir / "items.parquet")[Columns.Item].sort().to_list()[:2]
    seconds = [1_700_000_000, 1_700_000_060]
    forms = [
        seconds,
        [float(t) for t in seconds],
        ["2023-11-14T22:13:20Z", "2023-11-14T22:14:20Z"],
        pd.to_datetime(seconds, unit="s"),
    ]
    outs = [
        model.predict(pd.DataFrame({Columns.User: ["new", "new"], Columns.Item: items, Columns.Timestamp: ts}))
        for ts in forms
    ]
    for out in outs[1:]:
        pd.testing.assert_frame_equal(out, outs[0])
    # Regression: seconds and an ISO string in one column (JSON mixes them) failed in pyarrow.
    mixed = pd.Series([seconds[0], "2023-11-14T22:14:20Z"], dtype=object)
    got = model.predict(pd.DataFrame({Columns.User: ["new", "new"], Columns.Item: items, Columns.Timestamp: mixed}))
    pd.testing.assert_frame_equal(got, outs[0])
    with pytest.raises(MlflowException, match="divide by 1000"):
        ms = [t * 1000 for t in seconds]
        model.predict(pd.DataFrame({Columns.User: ["new", "new"], Columns.Item: items, Columns.Timestamp: ms}))


def test_a_row_without_user_id_is_refused_not_dropped(run):
    """Regression: ``split_input`` dropped a row whose ``user_id`` is null, so the request was
    answered for fewer users than it named; it is now refused as a history row's empty id is,
    naming the request's row (a 400 over REST, tests/export/test_serve.py)."""
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    known = pl.read_parquet(run.pipeline_dir / "users.parquet")[Columns.User].sort().to_list()[0]
    with pytest.raises(MlflowException, match=r"column 'user_id', row 2: 1 row\(s\) have an empty value"):
        model.predict(pd.DataFrame({Columns.User: [known, None]}))


def test_a_dict_of_lists_is_taken_as_a_frame_and_a_ragged_one_is_a_clear_error(run):
    """Regression: a dict input failed with a raw polars error when the model object was called
    directly (MLflow's wrapper turns a dict into a pandas frame first). A dict of equal-length
    lists is now the frame it spells; one polars cannot make a table of is an ``InputError``."""
    from recsys.errors import InputError
    from recsys.export.pyfunc import _load_pyfunc

    model = _load_pyfunc(str(run.pipeline_dir))
    known = pl.read_parquet(run.pipeline_dir / "users.parquet")[Columns.User].sort().to_list()[:2]
    got = model.predict({Columns.User: known}, params={"k": 3})
    pd.testing.assert_frame_equal(got, model.predict(pd.DataFrame({Columns.User: known}), params={"k": 3}))
    with pytest.raises(Exception, match="the input dict is no table") as info:
        model.predict({Columns.User: known, Columns.Item: ["I00001"]})
    assert isinstance(info.value.__cause__, InputError)
    with pytest.raises(Exception, match="the input is a list: send a pandas DataFrame"):
        model.predict([known])
    # Through MLflow's wrapper, which makes the dict one row holding the lists (a polars
    # InvalidOperationError before): the same rows.
    wrapped = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    pd.testing.assert_frame_equal(wrapped.predict({Columns.User: known}, params={"k": 3}), got)
