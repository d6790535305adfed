"""``python -m recsys.recommend model_uri=models:/recsys@champion``: batch top-K to parquet.

Loads the trained pipeline logged by ``recsys.train`` (an MLflow model URI, or a saved pipeline
folder), applies the business rules in ``conf/rules/``, and writes ``recommendations.parquet``
(``user_id, item_id, score, rank, source, explain_item, explain_similarity, explain_features``,
sorted by user then rank) plus ``recommendations.manifest.json``. Users are processed in chunks
written as parts; a killed run, rerun with the same arguments, resumes from the finished parts.
See docs/export.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from omegaconf import DictConfig, OmegaConf  # noqa: E402

import recsys.config  # noqa: E402  (registers resolvers; CONFIG_DIR)
from recsys.errors import ConfigError, InputError, exit_on_user_error, require_whole  # noqa: E402

if TYPE_CHECKING:
    from recsys.data.tables import ColumnMap

log = logging.getLogger("recsys.recommend")

# What an updated model's meta.json adds to the manifest: the version it was updated from and the
# training it descends from (its own ``run_id`` and ``dataset_hash`` are the update's).
UPDATE_INFO = ("updated_from", "training_run_id", "training_dataset_hash")


def resolve_model(model_uri: str, tracking: str | None) -> tuple[Path, dict]:
    """Local pipeline folder and what the manifest records about where it came from."""
    local = Path(model_uri)
    if (local / "meta.json").is_file():
        return local, {"model_uri": str(local.resolve()), "run_id": None}
    if local.is_dir():
        from recsys.stages import EVALUATED_FOLDER, SERVED_FOLDER

        # A training run's folder holds its saved pipelines one level down.
        inside = [local / name for name in (SERVED_FOLDER, EVALUATED_FOLDER) if (local / name / "meta.json").is_file()]
        hint = f": use model_uri={inside[0]}" if inside else " (no meta.json in it)"
        raise InputError(f"model_uri={model_uri} is a folder but not a saved pipeline{hint}")
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking)
    try:
        info = mlflow.models.get_model_info(model_uri)
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except (MlflowException, OSError) as e:
        raise InputError(f"cannot load model '{model_uri}' from {tracking}: {str(e).splitlines()[0]}") from e
    flavor = info.flavors.get("python_function", {})
    if flavor.get("loader_module") != "recsys.export.pyfunc":
        raise InputError(f"'{model_uri}' is not a recsys pipeline model (loader {flavor.get('loader_module')})")
    return root / flavor["data"], {"model_uri": model_uri, "run_id": info.run_id, "model_id": info.model_id}


def positive_int(cfg: DictConfig, key: str) -> int:
    """``cfg[key]`` as an int >= 1, or a ``ConfigError`` naming the setting (``require_whole``)."""
    require_whole(key, cfg[key])
    return cfg[key]


def check_column_map(value) -> None:
    """``column_map`` is null or a mapping of our column names to the file's, else a ``ConfigError``."""
    if value is None:
        return
    if not isinstance(value, Mapping | DictConfig) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(
            f"column_map must be null (the model's data.column_map) or a mapping such as "
            f"'column_map={{user_id: customer, item_id: sku}}', got {value!r}"
        )


def column_map(value, folder: Path) -> ColumnMap:
    """The file column names ``histories=`` and a ``users=`` table are read with: ``value`` (the
    ``column_map`` setting) or, when it is null, the ``data.column_map`` the model was trained
    with (its ``config.yaml``), as ``python -m recsys.update`` reads its new files."""
    from recsys.data.tables import ColumnMap

    if value is not None:
        return ColumnMap(dict(value), "column_map")
    config = OmegaConf.load(folder / "config.yaml") if (folder / "config.yaml").is_file() else None
    saved = config.data.get("column_map") if config is not None and "data" in config else None
    return ColumnMap(dict(saved or {}), "the model's data.column_map (set column_map=... to override)")


def run(cfg: DictConfig):
    """Export as configured; returns the ``ExportResult``."""
    from hydra.utils import instantiate

    from recsys.columns import Columns
    from recsys.data.tables import read_histories, read_user_list
    from recsys.export.batch import check_output, check_parallel, export_recommendations
    from recsys.export.engine import Engine, ExplainOptions
    from recsys.output import output_lock
    from recsys.pipeline_model import check_histories_mode, normalise_history
    from recsys.tracking import tracking_uri

    engine_name = str(cfg.get("engine", "local"))
    if engine_name == "spark":
        from recsys.export.spark import run_from_config

        return run_from_config(cfg)
    if engine_name != "local":
        raise ConfigError(f"engine must be local or spark, got {engine_name!r}")
    # Settings checked before the model is loaded.
    check_output(cfg.output, str(cfg.layout))
    check_parallel(str(cfg.parallel))
    k, chunk_size, workers, threads = (positive_int(cfg, key) for key in ("k", "chunk_size", "workers", "threads"))
    histories_mode = check_histories_mode(str(cfg.histories_mode))
    check_column_map(cfg.column_map)
    # Held from before the model loads: a second export to this output is refused at once.
    with output_lock(cfg.output):
        tracking = cfg.tracking_uri or tracking_uri(cfg.paths.mlruns_dir)
        folder, source = resolve_model(str(cfg.model_uri), tracking)
        explain = ExplainOptions(**OmegaConf.to_container(cfg.explain, resolve=True))
        # Engine.load, not Engine(TrainedPipeline.load(...)): worker processes rebuild it from the folder.
        engine = Engine.load(folder, instantiate(cfg.rules), k, str(cfg.scorer), explain, threads=threads)
        pipeline = engine.p

        columns = column_map(cfg.column_map, folder)
        histories = None
        if cfg.histories:
            raw = read_histories(str(cfg.histories), pipeline.event_weights, column_map=columns)
            histories = normalise_history(raw, pipeline.event_weights, now=pipeline.now, file=str(cfg.histories))
        if cfg.users:
            users = read_user_list(str(cfg.users), columns)
        else:
            users = list(pipeline.users.ids)
            if histories is not None:
                users += histories[Columns.User].unique().to_list()
        info = {**source, **{k: pipeline.meta.get(k) for k in ("run_id", "dataset", "dataset_hash", "config_hash")}}
        # An updated model's lineage (recsys.update.provenance). Only when present: the manifest,
        # and the fingerprint that resumes a killed export, of a trained model stay as they were.
        info.update({k: pipeline.meta[k] for k in UPDATE_INFO if k in pipeline.meta})
        info["run_id"] = source.get("run_id") or info.get("run_id")
        result = export_recommendations(
            engine,
            users,
            cfg.output,
            histories=histories,
            chunk_size=chunk_size,
            info=info,
            progress=bool(cfg.progress),
            workers=workers,
            layout=str(cfg.layout),
            parallel=str(cfg.parallel),
            histories_mode=histories_mode,
        )
    m = result.manifest
    print(
        f"{m['rows']} recommendations for {m['users']} users -> {result.path} "
        f"(manifest {result.manifest_path.name}; {m['users'] / max(m['seconds'], 1e-9):.0f} users/s)"
    )
    return result


@recsys.config.entry_point(
    "recommend",
    interrupted="the same command again resumes the export from its finished parts (engine=spark: writes it anew)",
)
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: run(cfg))


if __name__ == "__main__":
    main()
