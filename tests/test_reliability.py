"""The smoke job as the CLI runs it, in subprocesses sharing one uninterrupted reference run
(``reliability_support.reference_run``; one file, so one worker builds it once):

- kill -9 during training resumes from the last checkpoint and ends exactly where the
  uninterrupted run ended: the same metrics, feature importances, MLflow metrics and export
  bytes (same config and seed, two processes: the determinism check too);
- kill -9 during a write never leaves a partial file under the final name;
- secrets passed as config values never reach the disk or MLflow's params."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from reliability_support import SECRET, SMOKE, checked, command, env, reference_run, run_cli, session_root

from recsys.atomic import write_parquet_atomic
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
    """Every test and text-tower metric of the run the log names, but text/minutes (wall time)."""
    import mlflow

    from recsys.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(session_root() / "mlruns"))
    metrics = client.get_run(log.split("MLflow run ")[1].split(";")[0]).data.metrics
    got = {k: v for k, v in metrics.items() if k.startswith(("test/", "text/")) and k != "text/minutes"}
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
    run_id = ref.log.split("MLflow run ")[1].split(";")[0]
    params = client.get_run(run_id).data.params
    assert params["service.api_token"] == "***"
    assert params["seed"] == "42"  # other params are logged as they are
    assert not [k for k, v in params.items() if SECRET in v]
