"""MLflow: where runs live, what every run logs.

The backend is a sqlite database plus an artifact folder inside ``mlruns/``: MLflow 3.17
refuses the plain folder store. Paths are absolute, built from the configured folder, so the
launch directory does not matter.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Whole key segments only: ``tokenizer`` (a model path) is not a secret, ``hf_token`` is.
SECRET = re.compile(r"(^|[_.-])(password|passwd|token|secret|api_?key|access_?key)($|[_.-])", re.IGNORECASE)


def tracking_uri(mlruns_dir: str | Path) -> str:
    return f"sqlite:///{Path(mlruns_dir).resolve() / 'mlflow.db'}"


def artifact_root(mlruns_dir: str | Path) -> str:
    return (Path(mlruns_dir).resolve() / "artifacts").as_uri()


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"a.b.c": value}``; values of secret-looking keys are masked."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif SECRET.search(str(key)):
            out[name] = "***"
        else:
            out[name] = value
    return out


def mask_secrets(cfg: Any) -> Any:
    """A copy of a nested config with the values of secret-looking keys replaced by ``***``:
    what is written to run folders, artifacts and saved models."""
    if isinstance(cfg, Mapping):
        return {k: "***" if SECRET.search(str(k)) else mask_secrets(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [mask_secrets(v) for v in cfg]
    return cfg


class Tracker:
    """One MLflow run per training job.

    Args:
        mlruns_dir: folder holding ``mlflow.db`` and ``artifacts/``.
        experiment: MLflow experiment name.
        run_name: shown in the UI; defaults to MLflow's generated name.
    """

    def __init__(
        self,
        mlruns_dir: str,
        experiment: str = "recsys",
        run_name: str | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.mlruns_dir = Path(mlruns_dir)
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.uri = tracking_uri(self.mlruns_dir)

    def experiment_id(self) -> str:
        """The experiment's id, created (with its artifacts under ``mlruns/artifacts``) if new."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self.mlruns_dir.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        return mlflow.create_experiment(self.experiment, artifact_location=artifact_root(self.mlruns_dir))

    @contextmanager
    def start(self) -> Iterator[str]:
        """Start (and end) the run, a child of ``parent_run_id`` if given; yields its id."""
        import mlflow

        exp_id = self.experiment_id()
        with mlflow.start_run(experiment_id=exp_id, run_name=self.run_name, parent_run_id=self.parent_run_id) as run:
            self.run_id = run.info.run_id
            yield run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[start : start + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=folder)

    def log_dataset(self, frame, name: str, digest: str, source: str, counts: Mapping[str, int]) -> None:
        """The data set as the run's input (the UI's Datasets column): ``name``, the content hash
        ``digest``, the folder or file it came from (``source``), the schema of ``frame`` (a polars frame) and its row
        counts (users, items, events, per split) as tags of the input."""
        import warnings

        import mlflow

        with warnings.catch_warnings():
            # MLflow registers its local-file source class twice, then warns that a path matches both.
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
            path = str(Path(source).resolve())
            dataset = mlflow.data.from_polars(frame, source=path, name=name, digest=digest)
        mlflow.log_input(dataset, context="training", tags={k: str(v) for k, v in counts.items()})

    def log_image(self, path: str | Path, key: str) -> None:
        """A PNG as an MLflow image (the UI shows it with the run's charts); its file stays an artifact too."""
        import mlflow
        from PIL import Image

        with Image.open(path) as image:
            mlflow.log_image(image.convert("RGB"), key=key, step=0)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        mlflow.set_tags(dict(tags))
