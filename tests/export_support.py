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

    @property
    def test_exclusion(self) -> Path:
        """The evaluation's test-stage exclusions (seen and not yet listed items) as a CSR ``npz``."""
        return self.root / "test_exclusion.npz"

    @property
    def train_scores(self) -> Path:
        """``name -> [n_users, n_items]`` scores of each test-stage model, taken as training logged them."""
        return self.root / "train_scores.npz"


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
        f"text.resume_root={root / 'checkpoints'}",  # not the repository's outputs/
        f"paths.data_dir={root / 'data'}",
        "data.n_users=200",
        "data.n_items=120",
        "trainer.max_epochs=1",
        "eval.zeroshot=false",
        "eval.report=false",  # the evaluation bundle is written; the report has its own tests
        "rank.text_zeroshot_feature=true",  # a second text tower in the saved pipeline
        "rank.text_nearest_feature=true",  # a feature over each tower, read from the served histories
        "text.recency_decay=0.3",  # not the UserEncoder default: loading must restore it
        # a recency-weighted item-kNN beside the plain one: loading must restore its decay
        "+cf.itemknn_recent={_target_:recsys.cf.ItemKNN,neighbours:50,recency_decay:0.5}",
        "+cf.itemknn_next={_target_:recsys.cf.SequentialKNN,neighbours:50}",
        "+cf.ease={_target_:recsys.cf.EASE,regularization:10,neighbours:50,recency_decay:0.5}",
        # a torch network served from its saved weights, and a candidate source of its own; its
        # items start from the text tower's vectors (the job fits CF after the tower)
        "+cf.sasrec={_target_:recsys.cf.SASRec,dim:16,layers:1,epochs:3,text_init_std:0.2}",
        "+rank.n_candidates.sasrec=10",
        f"model.register_name={MODEL_NAME}",
        "model.alias=champion",
        # One cut for everybody: features as of the stage's end, as served (the export test
        # compares the evaluated fused lists with the export's).
        "split=global_time",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    import numpy as np

    import recsys.export.pyfunc as pyfunc

    logged = pyfunc.log_trained_pipeline

    import scipy.sparse as sp

    from recsys.columns import Columns
    from recsys.pipeline import stage_exclusion

    evaluated = {}

    def keep_scores(cfg, data, history, models, fusion, out_dir, **kw):
        if kw.get("name") == "model_evaluated":
            evaluated["history"] = history
        elif "history" in evaluated:  # the served pipeline: the evaluated history + the test events
            keys = [Columns.UserIdx, Columns.ItemIdx, Columns.Timestamp]
            test = history.interactions.join(evaluated["history"].interactions, on=keys, how="anti")
            sp.save_npz(root / "test_exclusion.npz", stage_exclusion(evaluated["history"], data.items, test).tocsr())
        # What every served model scored, so tests can check that save/load loses nothing.
        if kw.get("name", "model") == "model":
            users = np.arange(history.n_users)
            np.savez(root / "train_scores.npz", **{n: np.asarray(m.score_users(users)) for n, m in models.items()})
        return logged(cfg, data, history, models, fusion, out_dir, **kw)

    pyfunc.log_trained_pipeline = keep_scores
    try:
        run(cfg)
    finally:
        pyfunc.log_trained_pipeline = logged
    uri = tracking_uri(root / "mlruns")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["smoke"], output_format="list")
    return TrainedRun(root, root / "mlruns", root / "out", runs[0].info.run_id, uri)
