"""``python -m recsys.train +experiment=bert_ranker``: the whole hybrid recommender, one MLflow run.

data -> split -> CF (implicit) -> fine-tuned BERT text tower -> fused LambdaMART ranker ->
evaluation on test -> exported recommendations, all logged to MLflow under ``mlruns/``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from omegaconf import DictConfig  # noqa: E402

import recsys.config  # noqa: E402  (registers resolvers; CONFIG_DIR)
from recsys.errors import ConfigError, TrialFailed, exit_on_user_error  # noqa: E402

T = TypeVar("T")


def run(cfg: DictConfig) -> dict[str, float]:
    """Run the job described by ``cfg``; returns the metrics logged to MLflow (test and validation).

    One MLflow run of the stages in ``recsys.stages``, timed one by one (``time/*``, ``mem/*``).
    """
    check_objective(cfg.get("optimized_metric"))
    from recsys import stages
    from recsys.profiling import StageTimings

    t_start = time.perf_counter()
    timings = StageTimings()  # seconds and peak memory per stage (time/*, mem/*)
    job = stages.prepare(cfg, timings)  # everything that can fail on bad input fails here
    with job.tracker.start() as run_id:
        try:
            stages.log_inputs(job)
            fitted = stages.fit_validation(job, run_id, timings)  # fit on train
            evaluated = stages.evaluate_test(job, fitted, timings)  # refit on train + val, score test
            fitted.drop_cf()  # before the report: only the towers and fine-tuning figures are read on
            metrics = stages.record(job, fitted, evaluated, run_id, timings)
            metrics.update(fitted.text_metrics)  # logged after fine-tuning; returned for optimized_metric
            resume = fitted.resume
            # The validation stage's models and history are done with: let them go before the model
            # save refits CF on every event and loads each saved pipeline back.
            del fitted
            rec_path = stages.export(job, evaluated, timings)
            with timings.stage("model_save"):
                model_uri = stages.deploy(job, evaluated)
        except Exception:
            # A failed run still records where its time and memory went, stage by stage so far.
            with contextlib.suppress(Exception):
                stages.log_timings(job, timings)
            raise
        timings["total"] = time.perf_counter() - t_start
        metrics.update(stages.log_timings(job, timings))
        stages.print_summary(job, evaluated, run_id, model_uri, rec_path, timings["total"])
        resume.finish(keep_best_in=job.out_dir / "checkpoints")  # done: a rerun starts afresh
    return metrics


# What ``optimized_metric`` may name: validation scores only, so a sweep never chooses on test.
VALIDATION_OBJECTIVES = (
    "rank/val_ndcg_heldout",  # the ranker's NDCG@eval_at on the validation stage's users held back from it
    "rank/candidate_recall_val",  # share of validation targets among the candidates
    "text/val_ndcg_at_10_finetuned",  # the fine-tuned text tower, full-catalogue NDCG@10 on validation
    "text/val_ndcg_at_10_zeroshot",
)


def check_objective(name: str | None) -> None:
    if name is not None and name not in VALIDATION_OBJECTIVES:
        raise ConfigError(
            f"optimized_metric={name!r} is not a validation metric; choose one of {list(VALIDATION_OBJECTIVES)}"
        )


def in_sweep() -> bool:
    """Whether this job is a trial of a Hydra multirun (``-m``, ``hparams_search=...``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def fail_trial_on_user_error(job: Callable[[], T]) -> T:
    """``exit_on_user_error`` for a sweep's trial: the one-line error, then an exception rather
    than exit 2, so that Hydra records a failed trial and the sweeper applies
    ``hydra.sweeper.max_failure_rate`` (an exit would end the whole sweep whatever it says)."""
    return exit_on_user_error(job, raise_as=TrialFailed)


@recsys.config.entry_point(
    "config",
    interrupted="its MLflow run is marked KILLED; the same command again resumes from the text "
    "tower's last checkpoint, if it saved one",
)
def main(cfg: DictConfig) -> float | None:
    """Train; returns the validation metric named by ``optimized_metric`` (what a sweeper maximises)."""
    from recsys.text.distributed import check_trainer, serve_worker
    from recsys.tracking import save_hydra_files

    if exit_on_user_error(lambda: check_trainer(cfg.trainer)).is_worker:  # torchrun's ranks above 0
        return exit_on_user_error(lambda: serve_worker(cfg.trainer))
    with run_folder_lock():
        save_hydra_files(cfg)
        metrics = (fail_trial_on_user_error if in_sweep() else exit_on_user_error)(lambda: run(cfg))
    name = cfg.get("optimized_metric")
    return float(metrics[name]) if name is not None else None


# Hydra names a run folder by the second it started (``outputs/<date>_<time>``): two jobs started
# in the same second got one folder and wrote over each other's config, report and model files
# (the second then failed late on "pipeline_evaluated exists").
RUN_FOLDER_BUSY = (
    "another job started in the same second is using the run folder {out} (lock {lock} held by process "
    "{holder}); start this one again, or give it its own folder with hydra.run.dir=..."
)


@contextlib.contextmanager
def run_folder_lock() -> Iterator[None]:
    """Hold the run folder's lock for the whole job (refused at once, exit 2, if another job
    holds it); nothing outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    from recsys.output import output_lock

    if not HydraConfig.initialized():
        yield
        return
    folder = HydraConfig.get().runtime.output_dir
    with contextlib.ExitStack() as held:
        exit_on_user_error(lambda: held.enter_context(output_lock(folder, RUN_FOLDER_BUSY)))
        yield


if __name__ == "__main__":
    main()
