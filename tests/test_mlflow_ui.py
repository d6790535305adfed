"""The README's MLflow UI command serves this project's runs: params, metrics, artifacts, model."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from export_support import MODEL_NAME, trained_run
from server_support import free_port, running

# The README's command, verbatim (tests/test_readme.py checks it is the README's).
README_COMMANDS = [
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db "
    "--host 127.0.0.1 --port 5000 --workers 1"
]


def get(base: str, path: str, **query) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_mlflow_ui_shows_the_run_and_the_registered_model():
    run = trained_run()
    port = free_port()
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    # The README command, on a free port and this run's backend.
    env_set, *cmd = shlex.split(README_COMMANDS[0])
    cmd = [
        {"mlflow": mlflow_bin, "sqlite:///mlruns/mlflow.db": run.tracking_uri, "5000": str(port)}.get(t, t) for t in cmd
    ]
    key, value = env_set.split("=")
    env = {**os.environ, key: value, "MLFLOW_DISABLE_TELEMETRY": "true"}
    base = f"http://127.0.0.1:{port}"
    with running(cmd, env, f"{base}/health", "mlflow ui", 60) as proc:
        exp = get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="smoke")["experiment"]
        runs = post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        r = next(x for x in runs if x["info"]["run_id"] == run.run_id)
        params = {p["key"]: p["value"] for p in r["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in r["data"]["metrics"]}
        assert params["model.register_name"] == MODEL_NAME and "seed" in params
        assert "test/fused/ndcg_at_10" in metrics and 0 <= metrics["test/fused/ndcg_at_10"] <= 1
        files = {f["path"] for f in get(base, "/api/2.0/mlflow/artifacts/list", run_id=run.run_id).get("files", [])}
        assert {"config.yaml", "metrics.csv", "recommendations.parquet"} <= files
        model = get(base, "/api/2.0/mlflow/registered-models/get", name=MODEL_NAME)["registered_model"]
        assert any(a["alias"] == "champion" for a in model.get("aliases", []))
        version = get(base, "/api/2.0/mlflow/registered-models/alias", name=MODEL_NAME, alias="champion")
        assert version["model_version"]["run_id"] == run.run_id
    # The whole group is gone (uvicorn/gunicorn workers included).
    time.sleep(0.5)
    try:
        os.killpg(proc.pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "mlflow ui left processes behind"
