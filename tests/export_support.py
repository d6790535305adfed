"""One tiny training run shared by the export, pyfunc and MLflow UI tests (trained once per session).

Not a conftest fixture on purpose: ``tests/conftest.py`` belongs to the data/model tests; a
``functools.cache`` gives every test module the same run.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "recsys_test"


@dataclass(frozen=True)
class TrainedRun:
    root: Path
    mlruns: Path
    output: Path
    run_id: str
    tracking_uri: str

    @property
    def pipeline_dir(self) -> Path:
        return self.output / "pipeline"


@functools.cache
def trained_run() -> TrainedRun:
    """``python -m recsys.train +experiment=smoke`` (smaller), in process, into a temp folder."""
    import mlflow
    from hydra import compose, initialize_config_dir

    from recsys.tracking import tracking_uri
    from recsys.train import run

    root = Path(tempfile.mkdtemp(prefix="recsys-export-test-"))
    atexit.register(shutil.rmtree, root, True)
    overrides = [
        "+experiment=smoke",
        f"paths.mlruns_dir={root / 'mlruns'}",
        f"paths.output_dir={root / 'out'}",
        f"paths.data_dir={root / 'data'}",
        "data.n_users=200",
        "data.n_items=120",
        "trainer.max_epochs=1",
        "eval.zeroshot=false",
        f"model.register_name={MODEL_NAME}",
        "model.alias=champion",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run(cfg)
    uri = tracking_uri(root / "mlruns")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["smoke"], output_format="list")
    return TrainedRun(root, root / "mlruns", root / "out", runs[0].info.run_id, uri)
