"""Same config and seed -> the same metrics and a byte-identical export (docs/reliability.md)."""

from __future__ import annotations

import pytest
from reliability_support import SMOKE, Run, checked, reference_run, run_cli, session_root

from recsys.text.datamodule import EpochSampler
from recsys.text.fit import config_key


@pytest.mark.slow
def test_two_runs_give_identical_metrics_and_export_bytes():
    ref = reference_run()
    root = session_root()
    again = Run(root, root / "again", checked(run_cli(root, "again", *SMOKE)))
    assert (again.out / "metrics.csv").read_text() == (ref.out / "metrics.csv").read_text()
    assert (again.out / "feature_importance.csv").read_text() == (ref.out / "feature_importance.csv").read_text()
    rec = "recommendations.parquet"
    assert (again.out / rec).read_bytes() == (ref.out / rec).read_bytes()

    import mlflow

    from recsys.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root / "mlruns"))
    runs = {r.info.run_id: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    ids = [line.split("MLflow run ")[1].split(";")[0] for line in (ref.log, again.log)]
    # Every test and text-tower metric but text/minutes, the fine-tuning's wall time.
    first, second = (
        {k: v for k, v in runs[i].data.metrics.items() if k.startswith(("test/", "text/")) and k != "text/minutes"}
        for i in ids
    )
    assert first and first == second


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
