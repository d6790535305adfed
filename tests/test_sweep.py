"""``python -m recsys.train -m ... hparams_search=ranker``: Hydra's Optuna sweeper over real
training jobs, on a validation objective, each trial an MLflow child run in its own folder."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

# The README's command, verbatim (tests/test_readme.py checks it is the README's); run with the
# smoke experiment in place of bert_ranker, two trials and tiny data.
README_COMMANDS = ["python -m recsys.train -m +experiment=bert_ranker hparams_search=ranker"]
SMALL = [
    "data.n_users=200",
    "data.n_items=120",
    "trainer.max_epochs=1",
    "text.data.steps_per_epoch=3",
    "eval.zeroshot=false",
    "eval.report=false",
    "model.register_name=null",
]


def train(root: Path, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m recsys.train ARGS paths.root_dir=ROOT`` (flags such as ``-m`` stay in front)."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RECSYS_SWEEP_PARENT_RUN", None)
    cmd = [sys.executable, "-m", "recsys.train", *args, f"paths.root_dir={root}"]
    root.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_two_trial_ranker_sweep(tmp_path):
    import mlflow

    from recsys.tracking import tracking_uri

    args = shlex.split(README_COMMANDS[0])[3:]  # after `python -m recsys.train`
    args = [{"+experiment=bert_ranker": "+experiment=smoke"}.get(a, a) for a in args]
    proc = train(tmp_path, [*args, "hydra.sweeper.n_trials=2", *SMALL])
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert "raised" not in proc.stderr, proc.stderr[-3000:]  # Hydra turns callback errors into warnings

    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    for trial in ("0", "1"):  # each trial's outputs and Hydra record in its own folder
        folder = sweep_dir / trial
        assert (folder / ".hydra" / "overrides.yaml").is_file() and (folder / "recommendations.parquet").is_file()
        assert (folder / "metrics.csv").is_file()
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(tmp_path / "mlruns"))
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.info.status == "FINISHED"
    assert parent.data.params["optimized_metric"] == "rank/val_ndcg_heldout"
    # The objective is the validation score each child logged; the best child is the one recorded.
    scores = {r.info.run_id: r.data.metrics["rank/val_ndcg_heldout"] for r in children}
    best = max(scores, key=scores.get)
    assert parent.data.tags["best_run_id"] == best
    assert results["best_value"] == pytest.approx(scores[best])
    assert parent.data.metrics["best/rank/val_ndcg_heldout"] == pytest.approx(scores[best])
    assert {"optimization_results.yaml", "best.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert f"MLflow run {best}" in proc.stdout and "Best of 2 trials" in proc.stdout
    # The trials differ in the searched settings only.
    overrides = [yaml.safe_load((sweep_dir / t / ".hydra" / "overrides.yaml").read_text()) for t in ("0", "1")]
    assert overrides[0] != overrides[1] and all(any(o.startswith("ranker.num_leaves=") for o in x) for x in overrides)


def test_a_test_metric_is_refused_as_objective(tmp_path):
    proc = train(tmp_path, ["+experiment=smoke", "optimized_metric=test/fused/ndcg_at_10"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "not a validation metric" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlruns").exists()  # refused before any run started


def test_a_sweep_without_an_objective_is_refused_before_it_starts(tmp_path):
    """Regression: ``optimized_metric=null`` ran every trial in full, then the sweeper failed with
    a traceback ('No trials are completed yet'), leaving the parent run RUNNING."""
    proc = train(tmp_path, ["-m", "+experiment=smoke", "hparams_search=ranker", "optimized_metric=null"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: a sweep needs optimized_metric: one of ['rank/val_ndcg_heldout'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "multirun").exists()


def test_a_failing_trial_is_a_failed_trial_and_the_parent_run_ends(tmp_path):
    """Regression: a trial's config error exited the whole process (exit 2) whatever
    ``hydra.sweeper.max_failure_rate`` said, and no sweep that stopped early ended its MLflow
    parent run, which stayed RUNNING. Now each trial fails on its own (the one-line error), the
    sweeper goes on within its failure rate, and the parent ends FAILED, counting the failures.
    A sweep stopped by its failures says so in one line, not with the sweeper's traceback."""
    import mlflow

    from recsys.tracking import tracking_uri

    common = ["-m", "+experiment=smoke", "hparams_search=ranker", "hydra.sweeper.n_trials=2", "ranker.bags=0", *SMALL]
    proc = train(tmp_path / "tolerant", [*common, "hydra.sweeper.max_failure_rate=1.0"])
    assert proc.stderr.count("error: ranker.bags must be a whole number >= 1, got 0") == 2, proc.stderr[-3000:]
    # Optuna's "No trials are completed yet" traceback, said in one line.
    assert proc.returncode == 1 and "error: none of the sweep's 2 trials completed" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    proc = train(tmp_path / "strict", common)  # Hydra's default rate, 0: the first failure stops it
    assert proc.returncode == 1 and proc.stderr.count("error: ranker.bags must be") == 1, proc.stderr[-3000:]
    # The sweeper raised the trial's error again, with its traceback; now one line says why it stopped.
    assert "error: the sweep stopped at trial 0, which failed" in proc.stderr and "Traceback" not in proc.stderr
    for root, failed in (("tolerant", "2"), ("strict", "1")):
        client = mlflow.MlflowClient(tracking_uri=tracking_uri(tmp_path / root / "mlruns"))
        runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert parent.info.status == "FAILED" and parent.data.tags["failed_trials"] == failed
