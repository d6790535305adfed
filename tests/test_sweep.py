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
