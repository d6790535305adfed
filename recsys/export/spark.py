"""Batch scoring on Spark: the registered pyfunc model over ``mapInPandas``, parquet parts out.

    python -m recsys.recommend engine=spark "spark.master='local[4]'" model_uri=models:/recsys@champion output=recs
    spark-submit --master yarn $(python -c 'import recsys.export.spark as s; print(s.__file__)') \\
        --model-uri models:/recsys@champion --tracking-uri http://mlflow:5000 --output hdfs:///recs/today

The driver resolves the model URI to its MLflow model folder and ships it to the executors
(``SparkContext.addFile``); each Python worker loads it once (``mlflow.pyfunc.load_model``, kept
for every later task the worker runs) and calls ``predict`` on its batches of user ids. The rows
are the ones ``python -m recsys.recommend`` writes for the same users with the model's serving
settings (``serving.json``: rules, explanations).

The output is committed as a whole: Spark writes ``<output>.inprogress``, and only a finished job
renames it to ``<output>`` (a previous output is replaced then). A killed job leaves no
``<output>``; rerunning the command overwrites its leftovers and gives the same rows.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recsys.columns import Columns
from recsys.errors import ConfigError, InputError, require_whole

log = logging.getLogger(__name__)

MIN_JAVA = 17  # pyspark 4 runs on Java 17 or newer
INPROGRESS = ".inprogress"
# Spark types of the export's columns (recsys.export.engine.OUTPUT_SCHEMA).
SPARK_SCHEMA = (
    f"{Columns.User} string, {Columns.Item} string, {Columns.Score} double, {Columns.Rank} int, "
    f"{Columns.Source} string, explain_item string, explain_similarity float, explain_features string"
)
_MODELS: dict[str, Any] = {}  # per Python worker: the model, loaded by its first task


def java_major_version(java: str = "java") -> int:
    """The major version of the Java runtime Spark would start; a ``ConfigError`` if there is none."""
    home = os.environ.get("JAVA_HOME")
    exe = str(Path(home) / "bin" / "java") if home else shutil.which(java)
    if not exe or not Path(exe).is_file():
        raise ConfigError(
            f"engine=spark needs a Java runtime ({MIN_JAVA} or newer) and none was found "
            "(no java on PATH, JAVA_HOME unset): install one (e.g. apt-get install openjdk-17-jre-headless) "
            "or use engine=local"
        )
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(
            f"engine=spark: '{exe} -version' failed ({e}); fix the Java runtime or use engine=local"
        ) from e
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if out.returncode != 0 or not match:
        raise ConfigError(f"engine=spark: '{exe} -version' gave no version: {(out.stderr or out.stdout)[:200]!r}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def check_spark() -> None:
    """Fail before any work when Spark cannot run here: no pyspark, or no Java runtime new enough."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise ConfigError("engine=spark needs pyspark: pip install 'recsys[spark]' (or use engine=local)") from None
    major = java_major_version()
    if major < MIN_JAVA:
        raise ConfigError(f"engine=spark needs Java {MIN_JAVA} or newer, found Java {major} (set JAVA_HOME)")


def model_root(model_uri: str, tracking_uri: str | None) -> Path:
    """The local folder to ship: the MLflow model (``MLmodel`` and all), or a saved pipeline folder."""
    from recsys.recommend import resolve_model

    pipeline, _ = resolve_model(model_uri, tracking_uri)
    for folder in (pipeline, *pipeline.parents):
        if (folder / "MLmodel").is_file():
            return folder
    return pipeline  # a pipeline folder given by path: loaded by the pyfunc loader directly


def _load(name: str):
    """This worker's model, loaded from the shipped folder on first use."""
    if name not in _MODELS:
        from pyspark import SparkFiles

        root = Path(SparkFiles.get(name))
        if (root / "MLmodel").is_file():
            import mlflow

            _MODELS[name] = mlflow.pyfunc.load_model(str(root))
        else:
            from recsys.export.pyfunc import _load_pyfunc

            _MODELS[name] = _load_pyfunc(str(root))
    return _MODELS[name]


def score_batches(name: str, k: int, scorer: str):
    """The ``mapInPandas`` function: user-id batches in, the export's rows out."""

    def score(batches: Iterator[Any]) -> Iterator[Any]:
        model = _load(name)
        for batch in batches:
            if len(batch) == 0:
                continue
            out = model.predict(batch[[Columns.User]], params={"k": k, "scorer": scorer})
            yield out.astype({Columns.Rank: "int32", "explain_similarity": "float32"})

    return score


def export_spark(
    spark,
    model_uri: str,
    output: str,
    users: list[str] | None = None,
    k: int = 20,
    scorer: str = "fused",
    partitions: int | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Score ``users`` (default: every user the model knows) on ``spark``; write parquet parts to ``output``.

    Returns ``{"output", "users", "partitions"}``. Rows per user equal the local export's.
    """
    import pandas as pd
    import polars as pl

    root = model_root(model_uri, tracking_uri)
    if users is None:
        pipeline = root if (root / "users.parquet").is_file() else next(root.rglob("users.parquet")).parent
        users = pl.read_parquet(pipeline / "users.parquet")[Columns.User].to_list()
    users = sorted(set(users))
    if not users:
        raise InputError("no users to score")
    require_whole("spark.partitions", partitions, optional=True)
    # Parts of ~20k users: each task's model call is long enough to amortise its overhead, and
    # there are enough tasks to keep every executor busy.
    n_parts = partitions or max(spark.sparkContext.defaultParallelism, math.ceil(len(users) / 20_000))
    spark.sparkContext.addFile(str(root), recursive=True)
    frame = spark.createDataFrame(pd.DataFrame({Columns.User: users}), f"{Columns.User} string")
    scored = (
        frame.repartitionByRange(n_parts, Columns.User)
        .mapInPandas(score_batches(root.name, int(k), str(scorer)), SPARK_SCHEMA)
        .sortWithinPartitions(Columns.User, Columns.Rank)
    )
    tmp = output.rstrip("/") + INPROGRESS
    scored.write.mode("overwrite").parquet(tmp)
    _commit(spark, tmp, output)
    # The entry points print the one completion line; a library caller gets the dict.
    log.debug("%d users scored on Spark -> %s (%d partitions)", len(users), output, n_parts)
    return {"output": output, "users": len(users), "partitions": n_parts}


def _commit(spark, tmp: str, output: str) -> None:
    """Rename the finished ``tmp`` folder to ``output`` (replacing an older one) on any Hadoop file system."""
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    src, dst = jvm.org.apache.hadoop.fs.Path(tmp), jvm.org.apache.hadoop.fs.Path(output)
    fs = dst.getFileSystem(conf)
    if fs.exists(dst):
        old = jvm.org.apache.hadoop.fs.Path(output.rstrip("/") + ".replaced")
        fs.delete(old, True)
        if not fs.rename(dst, old):
            raise OSError(f"could not move the previous output {output} aside")
        fs.delete(old, True)
    if not fs.rename(src, dst):
        raise OSError(f"could not rename {tmp} to {output}")


def session(master: str | None = None, app_name: str = "recsys-export", conf: dict[str, str] | None = None):
    """A Spark session (``master`` None: whatever ``spark-submit`` set), with Arrow for pandas."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name).config("spark.sql.execution.arrow.pyspark.enabled", "true")
    if master:
        builder = builder.master(master)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def main(argv: list[str] | None = None) -> None:
    """``spark-submit .../recsys/export/spark.py --model-uri URI --output PATH [...]``."""
    from recsys.errors import run_script

    parser = argparse.ArgumentParser(description="Score users with the recsys pyfunc model on Spark.")
    parser.add_argument("--model-uri", required=True, help="models:/NAME@ALIAS, runs:/ID/model, or a pipeline folder")
    parser.add_argument("--output", required=True, help="output folder of parquet parts (any Hadoop path)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--users", default=None, help="file of user ids (default: every user the model knows)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--scorer", default="fused")
    parser.add_argument("--partitions", type=int, default=None)
    parser.add_argument("--master", default=None, help="e.g. local[4] (default: as spark-submit sets it)")
    args = parser.parse_args(argv)

    def job() -> None:
        from recsys.data.tables import read_user_list

        check_spark()
        users = read_user_list(args.users) if args.users else None
        tracking = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        spark = session(args.master)
        try:
            info = export_spark(
                spark, args.model_uri, args.output, users, args.k, args.scorer, args.partitions, tracking
            )
        finally:
            spark.stop()
        print(f"{info['users']} users scored -> {info['output']} ({info['partitions']} parquet parts)")

    # pyspark's SIGINT handler cancels the running Spark jobs and raises KeyboardInterrupt.
    run_script(
        job,
        f"{args.output} was not written (an earlier one stays as it was); the same command again writes it",
    )


def run_from_config(cfg) -> dict[str, Any]:
    """``python -m recsys.recommend engine=spark``: the same settings as the local export, on Spark."""
    from omegaconf import OmegaConf

    from recsys.data.tables import ColumnMap, read_user_list
    from recsys.recommend import check_column_map, positive_int
    from recsys.tracking import tracking_uri

    check_spark()  # before the model is resolved: a missing runtime is a one-line error
    k = positive_int(cfg, "k")
    if cfg.histories:
        raise ConfigError("engine=spark scores the histories stored with the model; histories= needs engine=local")
    spark_cfg = OmegaConf.to_container(cfg.spark, resolve=True) if "spark" in cfg else {}
    partitions = spark_cfg.get("partitions")
    require_whole("spark.partitions", partitions, optional=True)
    check_column_map(cfg.get("column_map"))
    # The column_map setting only: the model's saved one is in its folder, which only the Spark
    # job downloads (docs/export.md says so).
    columns = ColumnMap(dict(cfg.column_map), "column_map") if cfg.get("column_map") else None
    users = read_user_list(str(cfg.users), columns) if cfg.users else None
    tracking = cfg.tracking_uri or tracking_uri(cfg.paths.mlruns_dir)
    conf = {str(key): str(v) for key, v in (spark_cfg.get("conf") or {}).items()}
    spark = session(spark_cfg.get("master"), conf=conf)
    try:
        info = export_spark(spark, str(cfg.model_uri), str(cfg.output), users, k, str(cfg.scorer), partitions, tracking)
    finally:
        spark.stop()
    print(f"{info['users']} users scored on Spark -> {info['output']} ({info['partitions']} parquet parts)")
    return info


if __name__ == "__main__":
    # Run through the importable module, not this file as __main__: Spark then pickles the
    # executor function by reference, and each worker keeps the model it loaded between tasks.
    import importlib

    importlib.import_module("recsys.export.spark").main()
