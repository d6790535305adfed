"""README, "Keeping a model fresh": train -> deploy -> update -> gate -> serve, as commands."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from recsys.columns import Columns

pytestmark = pytest.mark.slow


def cli(module: str, root: Path, *overrides: str) -> subprocess.CompletedProcess:
    cwd = root / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", module, f"paths.mlruns_dir={root / 'mlruns'}", *overrides]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{module}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


# The README's commands, verbatim (tests/test_readme.py checks that they are the README's); the
# test runs them with the smoke experiment added and the README's /data/ files made here.
README_COMMANDS = [
    "python -m recsys.train model.alias=champion",
    "python -m recsys.update model_uri=models:/recsys@champion data.interactions=/data/events_since.csv "
    "data.items=/data/items_changed.csv",
]


def readme_args(command: str, tmp_path: Path) -> list[str]:
    return [a.replace("/data/", f"{tmp_path}/") for a in shlex.split(command)[3:]]


def test_train_update_gate_and_serve_as_the_readme_says(tmp_path):
    from recsys.pipeline_model import TrainedPipeline

    cli(
        "recsys.train",
        tmp_path,
        "+experiment=smoke",
        *readme_args(README_COMMANDS[0], tmp_path),
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "eval.report=false",
        # smaller than the smoke run: this test is about the commands, not the model
        "data.n_users=200",
        "data.n_items=120",
        "trainer.max_epochs=1",
        "eval.zeroshot=false",
    )
    served = TrainedPipeline.load(tmp_path / "out" / "pipeline", models=[])
    # Since training: a new item that half the users buy over two days.
    users = served.users.ids[: len(served.users) // 2].tolist()
    events = pl.DataFrame(
        {
            Columns.User: users,
            Columns.Item: ["NEW-1"] * len(users),
            Columns.Timestamp: [served.now + 60 + 600 * j for j in range(len(users))],
            Columns.Event: ["purchase"] * len(users),
        }
    )
    items = pl.DataFrame(
        {"item_id": ["NEW-1"], "title": ["Merino yarn"], "category": ["knitting"], "description": ["wool"]}
    )
    events.write_csv(tmp_path / "events_since.csv")
    items.write_csv(tmp_path / "items_changed.csv")

    update = cli("recsys.update", tmp_path, *readme_args(README_COMMANDS[1], tmp_path), f"output={tmp_path / 'update'}")
    assert "recsys version 2 @challenger" in update.stdout and "promoted to @champion" in update.stdout, update.stdout

    out = tmp_path / "recommendations.parquet"
    cli("recsys.recommend", tmp_path, "model_uri=models:/recsys@champion", f"output={out}", "layout=file")
    recs = pl.read_parquet(out)
    others = served.users.ids[len(served.users) // 2 :].tolist()
    reached = recs.filter(pl.col(Columns.Item) == "NEW-1")[Columns.User].unique().to_list()
    assert set(reached) & set(others), "the new item reaches users who have not bought it"
