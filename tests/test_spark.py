"""Batch scoring on Spark (``python -m recsys.recommend engine=spark``) on a local[2] session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from export_support import MODEL_NAME, REPO, trained_run
from polars.testing import assert_frame_equal

from recsys.columns import Columns
from recsys.errors import ConfigError


def recommend(*overrides: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "recsys.recommend", "progress=false", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def spark_ready() -> None:
    pytest.importorskip("pyspark", reason="pyspark is not installed (pip install '.[spark]')")
    from recsys.export.spark import java_major_version

    try:
        java_major_version()
    except ConfigError as e:
        pytest.skip(f"no Java runtime for Spark: {e}")


def read_parts(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(folder.glob("*.parquet"))).sort(Columns.User, Columns.Rank)


def test_no_java_is_a_clear_error_before_the_model_is_loaded(tmp_path):
    proc = recommend(
        "engine=spark", f"model_uri={tmp_path / 'no-such-model'}", env={"JAVA_HOME": str(tmp_path / "no-java")}
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "engine=spark needs" in proc.stderr and "Traceback" not in proc.stderr
    assert "no-such-model" not in proc.stderr  # the runtime is checked first


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="recommend", overrides=["progress=false", *overrides])


@pytest.mark.slow
def test_spark_rows_equal_the_local_export_and_a_rerun_after_a_kill_gives_the_same(tmp_path):
    """One process, as the CLI runs: ``recsys.recommend.run`` with engine=local, then engine=spark twice."""
    spark_ready()
    from recsys.recommend import run as recommend_run

    run = trained_run()
    known = pl.read_parquet(run.pipeline_dir / "users.parquet")[Columns.User].sort().to_list()
    users = known[::3]
    (tmp_path / "users.txt").write_text("\n".join(users))
    common = [
        f"model_uri=models:/{MODEL_NAME}@champion",
        f"paths.mlruns_dir={run.mlruns}",
        f"users={tmp_path / 'users.txt'}",
        "k=12",
    ]
    recommend_run(compose(*common, f"output={tmp_path / 'local.parquet'}", "layout=file"))
    expected = pl.read_parquet(tmp_path / "local.parquet").sort(Columns.User, Columns.Rank)

    out = tmp_path / "spark-recs"
    # What a killed job leaves behind: a half-written temporary folder, no output.
    leftover = tmp_path / "spark-recs.inprogress"
    leftover.mkdir()
    (leftover / "part-00000-dead.parquet").write_bytes(b"PAR1 half a file")
    spark = compose(*common, "engine=spark", "spark.master='local[2]'", "spark.partitions=3", f"output={out}")
    info = recommend_run(spark)
    assert info["users"] == len(users) and info["partitions"] == 3
    got = read_parts(out)
    assert got[Columns.User].n_unique() == len(users)
    assert_frame_equal(got.select(expected.columns), expected)  # same rows, same column types
    assert not leftover.exists()

    recommend_run(spark)  # over a finished output: replaced, same rows
    assert_frame_equal(read_parts(out), got)
