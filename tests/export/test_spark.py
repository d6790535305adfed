"""Batch scoring on Spark (``python -m recsys.recommend engine=spark``) on a local[2] session.

The README's "On a cluster" commands are run here (tests/test_readme.py checks they are the
README's): the install as a pip dry run against the installed packages (no network), the
recommend command in process with the test model and a temp output, and the ``spark-submit``
command through bash with the cluster parts (YARN, the packed environment, the tracking server,
HDFS) swapped for local ones.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from export_support import MODEL_NAME, REPO, trained_run
from polars.testing import assert_frame_equal

from recsys.columns import Columns
from recsys.errors import ConfigError

README_COMMANDS = [
    'pip install -e ".[spark]"',
    "python -m recsys.recommend engine=spark \"spark.master='local[2]'\" model_uri=models:/recsys@champion "
    "output=outputs/recommend/spark",
    "spark-submit --master yarn --deploy-mode client "
    "--archives recsys-env.tar.gz#env --conf spark.pyspark.python=./env/bin/python "
    "\"$(python -c 'import recsys.export.spark as s; print(s.__file__)')\" "
    "--model-uri models:/recsys@champion --tracking-uri http://mlflow.internal:5000 "
    "--output hdfs:///recsys/recommendations/$(date +%F) --k 20",
]
INSTALL, RECOMMEND, SUBMIT = README_COMMANDS


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


@pytest.mark.slow
def test_no_java_is_a_clear_error_before_the_model_is_loaded(tmp_path):
    proc = recommend(
        "engine=spark", f"model_uri={tmp_path / 'no-such-model'}", env={"JAVA_HOME": str(tmp_path / "no-java")}
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "engine=spark needs" in proc.stderr and "Traceback" not in proc.stderr
    assert "no-such-model" not in proc.stderr  # the runtime is checked first


def test_ctrl_c_ends_the_spark_submit_script_with_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """pyspark's SIGINT handler cancels the jobs and raises KeyboardInterrupt: one line saying
    that the output was not written, the shell's code, no traceback."""
    from recsys.export import spark

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(spark, "check_spark", ctrl_c)
    out = tmp_path / "recs"
    with pytest.raises(SystemExit) as exited:
        spark.main(["--model-uri", str(tmp_path / "model"), "--output", str(out)])
    assert exited.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted (Ctrl-C); ") and f"{out} was not written" in err
    assert "Traceback" not in err and not out.exists()


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="recommend", overrides=["progress=false", *overrides])


@pytest.mark.slow
def test_spark_rows_equal_the_local_export_and_a_rerun_after_a_kill_gives_the_same(tmp_path, caplog, capsys):
    """One process, as the CLI runs: ``recsys.recommend.run`` with engine=local, then engine=spark
    over what a killed rerun finds: an older finished output and a half-written temporary folder."""
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
    # Yesterday's finished output, and what a job killed today left behind: a half-written folder.
    out.mkdir()
    expected.head(5).with_columns(pl.lit(-1.0).alias(Columns.Score)).write_parquet(out / "part-00000-old.parquet")
    leftover = tmp_path / "spark-recs.inprogress"
    leftover.mkdir()
    (leftover / "part-00000-dead.parquet").write_bytes(b"PAR1 half a file")
    # The README's command, with the test model and this test's output folder.
    readme = shlex.split(RECOMMEND.replace("models:/recsys@", f"models:/{MODEL_NAME}@"))
    assert readme[:3] == ["python", "-m", "recsys.recommend"]
    readme = [a.replace("output=outputs/recommend/spark", f"output={out}") for a in readme[3:]]
    assert f"output={out}" in readme and "spark.master='local[2]'" in readme
    spark = compose(*common, "spark.partitions=3", *readme)
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        info = recommend_run(spark)
    assert info["users"] == len(users) and info["partitions"] == 3
    said = capsys.readouterr().out + caplog.text
    assert said.count("users scored") == 1, said  # one completion line, not a log line as well
    got = read_parts(out)
    assert got[Columns.User].n_unique() == len(users)
    assert_frame_equal(got.select(expected.columns), expected)  # same rows, same column types
    assert not leftover.exists() and not (out / "part-00000-old.parquet").exists()  # replaced whole


@pytest.mark.slow
def test_spark_extra_installs_pyspark_from_what_is_installed(tmp_path):
    """The README's ``pip install -e ".[spark]"``, as a dry run with no index: every requirement,
    pyspark included, is met by the installed packages."""
    pytest.importorskip("pyspark", reason="pyspark is not installed (pip install '.[spark]')")
    args = shlex.split(INSTALL)
    assert args[:2] == ["pip", "install"]
    cmd = [sys.executable, "-m", "pip", *args[1:], "--dry-run", "--no-index", "--no-build-isolation"]
    cmd += ["--report", str(tmp_path / "report.json")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json

    wanted = [item["metadata"] for item in json.loads((tmp_path / "report.json").read_text())["install"]]
    recsys = next(m for m in wanted if m["name"] == "recsys")
    assert any(r.startswith("pyspark") and "spark" in r for r in recsys.get("requires_dist", []))


@pytest.mark.slow
def test_spark_submit_command_scores_every_user(tmp_path):
    """The README's ``spark-submit`` command through bash: ``--master local[2]`` for YARN, this
    venv's Python for the packed one, the test model's local store for the tracking server and a
    temp folder for HDFS; the rest (module file, model alias, k) as the README has it."""
    spark_ready()
    run = trained_run()
    out = tmp_path / "recommendations"
    command = (
        SUBMIT.replace("--master yarn --deploy-mode client", "--master local[2]")
        .replace("--archives recsys-env.tar.gz#env ", "")
        .replace("spark.pyspark.python=./env/bin/python", f"spark.pyspark.python={sys.executable}")
        .replace("models:/recsys@", f"models:/{MODEL_NAME}@")
        .replace("http://mlflow.internal:5000", run.tracking_uri)
        .replace("hdfs:///recsys/recommendations/", f"{out}/")
    )
    assert "--k 20" in command and "yarn" not in command and "hdfs:" not in command
    bin_dir = str(Path(sys.executable).parent)  # `python` and `spark-submit` of this venv
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYSPARK_PYTHON": sys.executable}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (folder,) = out.iterdir()  # $(date +%F)
    got = read_parts(folder)
    known = pl.read_parquet(run.pipeline_dir / "users.parquet")[Columns.User]
    assert set(got[Columns.User]) == set(known) and got[Columns.Rank].max() == 20
