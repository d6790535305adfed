"""The real CLI, end to end, in a subprocess writing into a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from recsys.columns import Columns

pytestmark = pytest.mark.slow

MODELS = ("popularity", "als", "bpr", "text", "fused")


@dataclass
class Run:
    root: Path
    proc: subprocess.CompletedProcess

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"


def run_cli(root: Path, *overrides: str, repo_root: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    cwd = root / "cwd"  # an empty launch directory: nothing may be written into it
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "recsys.train",
        f"paths.mlruns_dir={root / 'mlruns'}",
        f"hydra.run.dir={root / 'out'}",  # the run folder: paths.output_dir follows it
        f"paths.data_dir={root / 'data'}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def smoke(root: Path, repo_root: Path) -> Run:
    proc = run_cli(root, "+experiment=smoke", repo_root=repo_root)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return Run(root, proc)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, repo_root) -> Run:
    return smoke(tmp_path_factory.mktemp("smoke"), repo_root)


def test_prints_a_row_per_model(smoke_run):
    lines = smoke_run.proc.stdout.splitlines()
    for model in MODELS:
        rows = [line for line in lines if line.strip("│┆| ").split(" ")[0] == model]
        assert len(rows) == 1, f"no table row for {model}:\n{smoke_run.proc.stdout}"
        numbers = [float(x) for x in rows[0].replace("┆", " ").replace("│", " ").split()[1:]]
        assert numbers and all(0.0 <= x <= 1.0 for x in numbers)


def test_nothing_written_into_the_launch_directory(smoke_run):
    assert list((smoke_run.root / "cwd").iterdir()) == []


def test_mlflow_run_has_params_metrics_and_artifacts(smoke_run):
    import mlflow

    from recsys.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(smoke_run.mlruns))
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id in smoke_run.proc.stdout

    params = run.data.params
    assert params["seed"] == "42"  # the flattened config
    assert "data.n_users" in params and "trainer.max_epochs" in params

    metrics = run.data.metrics
    for model in MODELS:
        assert 0.0 <= metrics[f"test/{model}/ndcg_at_10"] <= 1.0
    assert "test/fused/recall_at_20" in metrics
    epochs = int(params["trainer.max_epochs"])
    loss = client.get_metric_history(run.info.run_id, "train/loss_epoch")
    val = client.get_metric_history(run.info.run_id, "val/ndcg_at_10")
    assert 1 <= len(loss) <= epochs  # one per epoch (early stopping may end sooner)
    assert len(val) >= len(loss)  # per epoch, plus the zero-shot validation before training

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.csv", "recommendations.parquet"} <= artifacts


def test_metrics_csv_matches_the_logged_metrics(smoke_run):
    import mlflow

    from recsys.tracking import tracking_uri

    table = pl.read_csv(smoke_run.out / "metrics.csv")
    assert set(MODELS) <= set(table["model"].to_list())
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(smoke_run.mlruns))
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    for row in table.iter_rows(named=True):
        assert run.data.metrics[f"test/{row['model']}/ndcg_at_10"] == pytest.approx(row["ndcg_at_10"])


def test_exported_recommendations(smoke_run):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    recs = pl.read_parquet(smoke_run.out / "recommendations.parquet")
    assert recs.columns[:5] == [Columns.User, Columns.Item, Columns.Score, Columns.Rank, Columns.Source]
    assert recs.height > 0
    assert recs.equals(recs.sort(Columns.User, Columns.Rank))
    cfg = OmegaConf.load(smoke_run.out / "config.yaml")  # the resolved config of the run
    k = int(cfg.export.k)
    per_user = recs.group_by(Columns.User).agg(
        pl.col(Columns.Rank), pl.col(Columns.Score), pl.col(Columns.Item).n_unique().alias("n_items")
    )
    for ranks, scores, n_items in per_user.select(Columns.Rank, Columns.Score, "n_items").iter_rows():
        assert ranks == list(range(1, len(ranks) + 1)) and len(ranks) <= k
        assert n_items == len(ranks)
        assert all(a >= b for a, b in zip(scores, scores[1:], strict=False))
    assert per_user.filter(pl.col(Columns.Rank).list.len() == k).height > 0.9 * per_user.height
    assert set(recs[Columns.Source].unique().to_list()) <= set(cfg.rank.n_candidates)

    # No item the user has seen in train + validation (the test stage's history).
    data = instantiate(cfg.data).load()
    split = instantiate(cfg.split).split(data.interactions)
    seen = pl.concat([split.train, split.val]).select(Columns.User, Columns.Item).unique()
    assert recs.join(seen, on=[Columns.User, Columns.Item], how="inner").height == 0
    # Exported users are exactly the test users.
    assert set(recs[Columns.User].unique().to_list()) == set(split.test[Columns.User].unique().to_list())


def test_bad_input_is_one_clear_message(tmp_path, repo_root):
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,timestamp,event\nu1,A,1,click\nu1,B,yesterday,click\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title,description\nA,a telescope,x\nB,a skillet,y\n")
    proc = run_cli(tmp_path, "data=files", f"data.interactions={bad}", f"data.items={items}", repo_root=repo_root)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(bad) in proc.stderr
    assert "'timestamp'" in proc.stderr and "yesterday" in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # failed before any run was started


def test_mlflow_run_has_the_dataset_input_and_the_report_images(smoke_run):
    import mlflow

    from recsys.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(smoke_run.mlruns))
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    (entry,) = run.inputs.dataset_inputs
    tags = {t.key: t.value for t in entry.tags}
    assert entry.dataset.name == "generated" and entry.dataset.digest == run.data.tags["dataset_hash"]
    assert tags["mlflow.data.context"] == "training"
    assert int(tags["events"]) == int(tags["train_events"]) + int(tags["val_events"]) + int(tags["test_events"])
    assert int(tags["users"]) > 0 and int(tags["items"]) > 0
    assert '"num_rows": ' + tags["events"] in entry.dataset.profile
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    for plot in ("curves", "feature_importance", "scores", "segments"):
        assert any(f"report~{plot}+" in p and p.endswith(".png") for p in images), images
