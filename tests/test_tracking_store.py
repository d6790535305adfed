"""Where the MLflow store puts artifacts: a moved or copied store, the update's experiment, two
jobs creating the store at once, and the run's status while the job runs."""

from __future__ import annotations

import multiprocessing as mp
import shutil
from pathlib import Path

import mlflow
import pytest

from recsys.errors import ConfigError
from recsys.tracking import Tracker, tracking_uri


def artifact_folder(mlruns: Path, experiment: str) -> Path:
    from mlflow.utils.file_utils import local_file_uri_to_path

    exp = mlflow.MlflowClient(tracking_uri(mlruns)).get_experiment_by_name(experiment)
    return Path(local_file_uri_to_path(exp.artifact_location))


def test_a_copied_store_is_refused_rather_than_writing_into_the_original(tmp_path):
    """MLflow keeps absolute artifact paths: a run in a copy of the project wrote its model and
    files into the original folder's mlruns/artifacts (after a move, into a re-created old path)."""
    first = tmp_path / "project é" / "mlruns"
    Tracker(str(first), "smoke").experiment_id()
    copy = tmp_path / "copy of project" / "mlruns"
    shutil.copytree(first, copy)
    with pytest.raises(ConfigError, match="outside") as err:
        Tracker(str(copy), "smoke").experiment_id()
    assert str(first.resolve()) in str(err.value)
    Tracker(str(first), "smoke").experiment_id()  # the original is fine
    Tracker(str(copy), "another").experiment_id()  # a new experiment in the copy is its own
    assert artifact_folder(copy, "another").is_relative_to(copy.resolve())


def test_the_update_experiment_keeps_its_artifacts_in_mlruns_whatever_the_launch_folder(tmp_path, monkeypatch):
    """mlflow.set_experiment gave the update experiment ./mlruns/<id> of the launch folder."""
    from recsys.update import update_experiment

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    mlruns = tmp_path / "project" / "mlruns"
    update_experiment(None, str(mlruns), "update")
    assert artifact_folder(mlruns, "update") == (mlruns / "artifacts").resolve()
    assert not (elsewhere / "mlruns").exists()


def _open(mlruns: str, barrier, out) -> None:
    barrier.wait()
    try:
        out.put(Tracker(mlruns, "smoke").experiment_id())
    except Exception as e:  # the failure itself is what the test reports
        out.put(f"{type(e).__name__}: {e}")


@pytest.mark.real_mlflow_migrations
def test_jobs_creating_a_fresh_store_at_once_all_get_the_experiment(tmp_path):
    """Two jobs started together on a fresh mlruns/: one failed in MLflow's schema migration."""
    ctx = mp.get_context("fork")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open, args=(str(tmp_path / "mlruns"), barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    assert len(set(results)) == 1, results
    assert results[0].isdigit(), results


def test_the_run_stays_running_after_fine_tuning_until_the_job_ends(tmp_path):
    """Lightning's logger ended the job's run at the end of fit: a job killed after fine-tuning
    stayed FINISHED in MLflow, without its test metrics and model."""
    from recsys.text.fit import RunLogger

    tracker = Tracker(str(tmp_path / "mlruns"), "smoke")
    client = mlflow.MlflowClient(tracker.uri)
    with tracker.start() as run_id:
        logger = RunLogger(experiment_name="smoke", tracking_uri=tracker.uri, run_id=run_id)
        logger.log_metrics({"text/loss": 1.0}, step=0)
        logger.finalize("success")
        assert client.get_run(run_id).info.status == "RUNNING"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_second_job_in_a_run_folder_in_use_is_refused_at_once(tmp_path):
    """Hydra names the run folder by the second: two jobs started in the same second shared it
    and wrote over each other's config, report and model files. The second is now refused at
    once (the first holds the folder's lock), before it writes anything there."""
    import subprocess
    import sys

    from recsys.output import output_lock
    from recsys.train import RUN_FOLDER_BUSY

    folder = tmp_path / "outputs" / "2026-12-06_01-04-27"
    with output_lock(folder, RUN_FOLDER_BUSY):  # the first job, running
        done = subprocess.run(
            [sys.executable, "-m", "recsys.train", "+experiment=smoke", f"hydra.run.dir={folder}",
             f"paths.root_dir={tmp_path}"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "another job started in the same second is using the run folder" in done.stderr
    assert "hydra.run.dir" in done.stderr
    assert not (folder / ".hydra").exists()  # nothing of the second job's written over the first's


def _hold_a_run(mlruns: str, out, release) -> None:
    """A job with its run open: reports the run's id, then is killed (``release`` None) or waits."""
    import os
    import signal

    with Tracker(mlruns, "smoke").start() as run_id:
        out.put(run_id)
        if release is None:
            os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 would: nothing of the job's own runs after
        release.wait(120)


def test_a_run_left_running_by_a_killed_job_is_marked_killed_by_the_next_job(tmp_path):
    """MLflow has no heartbeat: a job killed with its run open left it RUNNING for ever, so the
    store could not tell a killed run from one in progress. The next job of the experiment now
    marks it KILLED, and leaves a run whose process is alive, or one it knows nothing about (a
    sweep's parent run, a run from before run locks), as it is."""
    mlruns = str(tmp_path / "mlruns")
    tracker = Tracker(mlruns, "smoke")
    client = mlflow.MlflowClient(tracker.uri)
    unknown = client.create_run(tracker.experiment_id()).info.run_id  # RUNNING, without a lock
    ctx = mp.get_context("fork")
    out, release = ctx.SimpleQueue(), ctx.Event()  # SimpleQueue: put has written when it returns
    killed = ctx.Process(target=_hold_a_run, args=(mlruns, out, None))
    killed.start()
    dead = out.get()
    killed.join(120)
    assert killed.exitcode == -9
    assert client.get_run(dead).info.status == "RUNNING"  # until a job of the experiment starts
    alive = ctx.Process(target=_hold_a_run, args=(mlruns, out, release))
    alive.start()
    try:
        live = out.get()
        assert client.get_run(dead).info.status == "KILLED"  # by the job that has just started
        assert "killed" in client.get_run(dead).data.tags["ended_by"]
        with tracker.start() as run_id:
            assert client.get_run(live).info.status == "RUNNING"
            assert client.get_run(unknown).info.status == "RUNNING"
    finally:
        release.set()
        alive.join(60)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(live).info.status == "FINISHED"  # its job ended it, and nobody else
    assert list((tmp_path / "mlruns" / ".running").iterdir()) == []  # no lock outlives its run


def test_a_run_that_failed_ends_failed_and_lets_its_lock_go(tmp_path):
    mlruns = str(tmp_path / "mlruns")
    tracker = Tracker(mlruns, "smoke")
    with pytest.raises(RuntimeError), tracker.start() as run_id:
        raise RuntimeError("the job failed")
    assert mlflow.MlflowClient(tracker.uri).get_run(run_id).info.status == "FAILED"
    assert list((tmp_path / "mlruns" / ".running").iterdir()) == []


def test_a_run_stopped_by_ctrl_c_ends_killed_and_lets_its_lock_go(tmp_path):
    """MLflow ends a run that an exception leaves FAILED; Ctrl-C is no failure of the job."""
    tracker = Tracker(str(tmp_path / "mlruns"), "smoke")
    with pytest.raises(KeyboardInterrupt), tracker.start() as run_id:
        raise KeyboardInterrupt
    assert mlflow.MlflowClient(tracker.uri).get_run(run_id).info.status == "KILLED"
    assert mlflow.active_run() is None
    assert list((tmp_path / "mlruns" / ".running").iterdir()) == []
