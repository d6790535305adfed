"""The smoke job as the CLI runs it, in subprocesses sharing one uninterrupted reference run
(``reliability_support.reference_run``; one file, so one worker builds it once):

- kill -9 during training resumes from the last checkpoint and ends exactly where the
  uninterrupted run ended: the same metrics, feature importances, MLflow metrics and export
  bytes (same config and seed, two processes: the determinism check too);
- kill -9 during a write never leaves a partial file under the final name;
- secrets passed as config values never reach the disk or MLflow's params;
- what the job prints, logs and writes: a table row per model, the MLflow run (params, metrics,
  artifacts, dataset input, report images), metrics.csv and the exported recommendations, and
  nothing in the launch directory; bad input is one clear message."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from reliability_support import SECRET, SMOKE, Run, checked, command, env, reference_run, run_cli, session_root

from recsys.atomic import write_parquet_atomic
from recsys.columns import Columns
from recsys.text.datamodule import EpochSampler
from recsys.text.fit import config_key


@pytest.mark.slow
def test_kill_during_training_then_rerun_resumes_and_ends_as_an_uninterrupted_run():
    ref = reference_run()
    root = session_root()
    resume_root = root / "outputs" / "checkpoints"
    assert not resume_root.exists() or not any(resume_root.iterdir()), "a finished run leaves no resume state"

    (root / "cwd").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        command(root, "killed", *SMOKE), cwd=root / "cwd", env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while not list(resume_root.glob("*/last.ckpt")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    [folder] = [p for p in resume_root.iterdir() if p.is_dir()]
    assert not (folder / "done.json").exists(), "killed after training had finished: nothing to resume"
    assert not (root / "killed" / "recommendations.parquet").exists()

    # The same command again: it must continue from last.ckpt, not start over.
    again = checked(run_cli(root, "killed", *SMOKE))
    log = again.stdout + again.stderr
    assert f"resuming from {folder / 'last.ckpt'} (epoch " in log, log[-3000:]
    done = int(log.split(f"resuming from {folder / 'last.ckpt'} (epoch ")[1].split(" ")[0])
    assert 1 <= done < 3

    # ... and end exactly where the uninterrupted run ended (another process, the same seed).
    killed = root / "killed"
    for name in ("metrics.csv", "feature_importance.csv"):
        assert (killed / name).read_text() == (ref.out / name).read_text(), name
    rec = "recommendations.parquet"
    assert (killed / rec).read_bytes() == (ref.out / rec).read_bytes()
    assert mlflow_metrics(ref.log) == mlflow_metrics(log)
    # A finished run removes its resume state and keeps the best checkpoint in its run folder.
    assert not folder.exists()
    assert (root / "killed" / "checkpoints" / "best.ckpt").is_file()


def frames() -> list[pl.DataFrame]:
    return [pl.DataFrame({"user_id": [f"u{i}" for i in range(200_000)], "score": [float(v)] * 200_000}) for v in (1, 2)]


def test_writer_failing_halfway_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "recommendations.parquet"
    old, new = frames()
    write_parquet_atomic(old, path)
    real = pl.DataFrame.write_parquet

    def half_then_crash(self, file, *args, **kwargs):
        real(self, file, *args, **kwargs)
        Path(file).write_bytes(Path(file).read_bytes()[:1000])  # a partial file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(new, path)
    monkeypatch.undo()
    assert pl.read_parquet(path).equals(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "temporary file left behind"


WRITER = """
import sys, polars as pl
from recsys.atomic import write_parquet_atomic
from recsys.columns import Columns
n = 200_000
frames = [pl.DataFrame({"user_id": [f"u{i}" for i in range(n)], "score": [float(v)] * n}) for v in (1, 2)]
print("ready", flush=True)
i = 0
while True:
    write_parquet_atomic(frames[i % 2], sys.argv[1])
    i += 1
"""


@pytest.mark.slow
def test_kill_9_while_writing_never_exposes_a_partial_file(tmp_path):
    path = tmp_path / "recommendations.parquet"
    expected = frames()
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env())
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        if path.exists():  # whichever version it is, it is whole
            got = pl.read_parquet(path)
            assert got.equals(expected[0]) or got.equals(expected[1])


def mlflow_metrics(log: str) -> dict[str, float]:
    """Every test and text-tower metric of the run the log names, but the text tower's minutes (wall time)."""
    import mlflow

    from recsys.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(session_root() / "mlruns"))
    metrics = client.get_run(re.search(r"^MLflow run (\w+);", log, re.M).group(1)).data.metrics
    got = {k: v for k, v in metrics.items() if k.startswith(("test/", "text/")) and not k.endswith("minutes")}
    assert got
    return got


def test_sample_order_is_a_function_of_seed_and_epoch():
    """A fresh sampler told the epoch (what Lightning does after a resume) repeats that epoch."""
    running = EpochSampler(1000, 64, seed=3)
    orders = []
    for epoch in range(3):
        running.set_epoch(epoch)
        orders.append(list(running))
    resumed = EpochSampler(1000, 64, seed=3)
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]
    assert orders[0] != orders[1] != orders[2]  # a new order every epoch
    assert len(set(orders[0])) == 64  # without replacement
    assert list(EpochSampler(1000, 64, seed=4)) != orders[0]
    assert len(EpochSampler(10, 64)) == 10  # never more than there are examples


def test_resume_key_ignores_output_paths_but_not_settings():
    cfg = {
        "seed": 1,
        "paths": {"output_dir": "/o/2024-01-01_00-00-00", "root_dir": "/r"},
        "x": "/o/2024-01-01_00-00-00/c",
    }
    other_time = {**cfg, "paths": {**cfg["paths"], "output_dir": "/o/2024-01-02_00-00-00"}}
    other_time["x"] = "/o/2024-01-02_00-00-00/c"
    key = config_key(cfg, ["/o/2024-01-01_00-00-00"], "data-hash")
    assert config_key(other_time, ["/o/2024-01-02_00-00-00"], "data-hash") == key
    assert config_key({**cfg, "seed": 2}, ["/o/2024-01-01_00-00-00"], "data-hash") != key
    assert config_key(cfg, ["/o/2024-01-01_00-00-00"], "other-data") != key


@pytest.mark.slow
def test_no_file_a_run_writes_holds_a_secret():
    """Regression: masked in MLflow and config.yaml, but written in plain text to Hydra's
    ``.hydra/config.yaml``, ``overrides.yaml`` and ``hydra.yaml`` in the run folder."""
    ref = reference_run()
    hydra = ref.out / ".hydra"
    assert {p.name for p in hydra.iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert "+service.api_token=***" in (hydra / "overrides.yaml").read_text()
    assert "postgres://bob:***@db:5432/shop" in (hydra / "config.yaml").read_text()
    files = [p for folder in (ref.out, ref.root / "mlruns") for p in Path(folder).rglob("*") if p.is_file()]
    assert len(files) > 20
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert SECRET not in ref.log


@pytest.mark.slow
def test_secrets_are_masked_in_logged_params():
    """MLflow params: secrets masked, the rest as given (the reference run shared with the test above)."""
    import mlflow

    from recsys.tracking import tracking_uri

    ref = reference_run()
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(ref.root / "mlruns"))
    run_id = re.search(r"^MLflow run (\w+);", ref.log, re.M).group(1)
    params = client.get_run(run_id).data.params
    assert params["service.api_token"] == "***"
    assert params["seed"] == "42"  # other params are logged as they are
    assert not [k for k, v in params.items() if SECRET in v]


MODELS = ("popularity", "als", "bpr", "text", "fused")


@pytest.fixture(scope="module")
def smoke_run() -> Run:
    return reference_run()


def mlruns(run: Run) -> Path:
    return run.root / "mlruns"


def logged_run(run: Run):
    """The MLflow run the job printed (the store may also hold the reliability tests' runs)."""
    import mlflow

    from recsys.tracking import tracking_uri

    run_id = re.search(r"MLflow run (\w+);", run.proc.stdout).group(1)
    return mlflow.MlflowClient(tracking_uri=tracking_uri(mlruns(run))), run_id


@pytest.mark.slow
def test_prints_a_row_per_model(smoke_run):
    # The heading names the protocol: the split's figures differ several-fold between splits.
    assert re.search(
        r"Test metrics \(generated, LeaveLastOutSplit\(min_train=1, n_test=1, n_val=1\), \d+ users;",
        smoke_run.proc.stdout,
    )
    lines = smoke_run.proc.stdout.splitlines()
    for model in MODELS:
        rows = [line for line in lines if line.strip("│┆| ").split(" ")[0] == model]
        assert len(rows) == 1, f"no table row for {model}:\n{smoke_run.proc.stdout}"
        numbers = [float(x) for x in rows[0].replace("┆", " ").replace("│", " ").split()[1:]]
        assert numbers and all(0.0 <= x <= 1.0 for x in numbers)


@pytest.mark.slow
def test_prints_none_of_the_known_harmless_library_messages(smoke_run):
    # recsys.quiet and fine_tune's own resume folder: Lightning's logger tip, its LeafSpec
    # deprecation and its warning that the resume folder (holding the run's lock) is not empty.
    out = smoke_run.proc.stdout + smoke_run.proc.stderr
    for message in ("litlogger", "LeafSpec", "exists and is not empty"):
        assert message not in out, out[-3000:]
    # Lightning's messages once, in the job's log format (its own handler printed them again).
    assert out.count("Seed set to") == 1 and "INFO: " not in out, out[-3000:]


@pytest.mark.slow
def test_nothing_written_into_the_launch_directory(smoke_run):
    assert list((smoke_run.root / "cwd").iterdir()) == []


@pytest.mark.slow
def test_mlflow_run_has_params_metrics_and_artifacts(smoke_run):
    client, run_id = logged_run(smoke_run)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "smoke"

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


@pytest.mark.slow
def test_metrics_csv_matches_the_logged_metrics(smoke_run):
    table = pl.read_csv(smoke_run.out / "metrics.csv")
    assert set(MODELS) <= set(table["model"].to_list())
    client, run_id = logged_run(smoke_run)
    run = client.get_run(run_id)
    for row in table.iter_rows(named=True):
        assert run.data.metrics[f"test/{row['model']}/ndcg_at_10"] == pytest.approx(row["ndcg_at_10"])


@pytest.mark.slow
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


@pytest.mark.slow
def test_bad_input_is_one_clear_message(tmp_path):
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,timestamp,event\nu1,A,1,click\nu1,B,yesterday,click\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title,description\nA,a telescope,x\nB,a skillet,y\n")
    proc = run_cli(tmp_path, "out", "data=files", f"data.interactions={bad}", f"data.items={items}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(bad) in proc.stderr
    assert "'timestamp'" in proc.stderr and "yesterday" in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # failed before any run was started


@pytest.mark.slow
def test_mlflow_run_has_the_dataset_input_and_the_report_images(smoke_run):
    client, run_id = logged_run(smoke_run)
    run = client.get_run(run_id)
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
