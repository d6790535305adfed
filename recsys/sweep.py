"""Hydra sweeps as MLflow runs: one parent run per multirun, each trial a child run under it.

``python -m recsys.train -m +experiment=bert_ranker hparams_search=ranker`` runs the Optuna
sweeper (``conf/hparams_search/``) over full training jobs. Each job's ``main`` returns the
validation metric named by ``optimized_metric`` (never a test metric: ``recsys.train`` refuses
those). This callback, listed under ``hydra.callbacks`` by the presets, opens the parent run,
hands its id to the trials through the environment (``logger.parent_run_id`` reads it), records
each trial's objective on the parent and, at the end, the best trial's settings.

A sweep without a validation objective is refused before the parent run starts. A trial that
fails is a failed Optuna trial (``recsys.train`` raises rather than exits inside a sweep), and the
sweeper stops the sweep when more than ``hydra.sweeper.max_failure_rate`` of a batch of trials
failed (Hydra's default, 0: at the first; the presets run batches of one, so 1.0 goes on); the
parent run then ends FAILED, with the best trial so far recorded, rather than staying RUNNING.
A sweep its failures stop, or whose trials all failed, ends with one line saying so (exit 1), not
with the sweeper's traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from recsys.tracking import Tracker

log = logging.getLogger(__name__)

PARENT_ENV = "RECSYS_SWEEP_PARENT_RUN"
RESULTS_FILE = "optimization_results.yaml"  # written by the Optuna sweeper into hydra.sweep.dir


class MLflowSweep(Callback):
    """Parent MLflow run of a Hydra multirun (see the module docstring)."""

    def __init__(self) -> None:
        self.client = None
        self.parent: str | None = None
        self.best: tuple[float, int, list[str], str | None] | None = None
        self.trials = 0
        self.failed = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        from recsys.errors import ConfigError, exit_on_user_error
        from recsys.train import VALIDATION_OBJECTIVES, check_objective

        def check() -> None:
            # Every trial would run in full and the sweeper fail at the end ("No trials are
            # completed yet"), or every trial stop on the objective: say so before any of them.
            if config.get("optimized_metric") is None:
                raise ConfigError(f"a sweep needs optimized_metric: one of {list(VALIDATION_OBJECTIVES)}")
            check_objective(config.get("optimized_metric"))

        exit_on_user_error(check)  # SystemExit: Hydra turns a callback's exceptions into warnings
        tracker = Tracker(config.paths.mlruns_dir, config.logger.experiment)
        self.client = mlflow.MlflowClient(tracking_uri=tracker.uri)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.metric = config.get("optimized_metric")
        self.maximize = str(config.hydra.sweeper.get("direction", "maximize")).lower().endswith("maximize")
        run = self.client.create_run(
            tracker.experiment_id(),
            run_name=f"sweep {self.sweep_dir.name}",
            tags={"sweep_dir": str(self.sweep_dir.resolve())},
        )
        self.parent = run.info.run_id
        space = config.hydra.sweeper.get("params") or {}
        params = {f"search.{k}": str(v) for k, v in space.items()}
        params.update(
            optimized_metric=str(self.metric),
            direction="maximize" if self.maximize else "minimize",
            n_trials=str(config.hydra.sweeper.get("n_trials")),
            overrides=" ".join(config.hydra.overrides.task),
        )
        for key, value in params.items():
            self.client.log_param(self.parent, key, value[:6000])
        os.environ[PARENT_ENV] = self.parent
        # Hydra calls on_multirun_end only when the sweep returns: a sweep stopped by failed trials
        # (or Ctrl-C) ends the parent run at exit instead.
        atexit.register(self._abandoned)
        log.info("sweep: MLflow parent run %s (experiment %s)", self.parent, config.logger.experiment)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.parent is None:
            return
        if job_return.status.name != "COMPLETED" or job_return.return_value is None:
            self.failed += 1
            self._stop_without_traceback(config, job_return)
            return
        value = float(job_return.return_value)
        trial = int(config.hydra.job.num)
        # The trial that just ended is the parent's newest child: the basic launcher runs them one by one.
        newest = self.client.search_runs(
            [self.client.get_run(self.parent).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        run_id = newest[0].info.run_id if newest else None
        if run_id:
            self.client.set_tag(run_id, "sweep_trial", str(trial))
            self.client.update_run(run_id, name=f"trial {trial}")
        self.client.log_metric(self.parent, f"trials/{self.metric}", value, step=trial)
        better = self.best is None or (value > self.best[0] if self.maximize else value < self.best[0])
        if not math.isnan(value) and better:
            self.best = (value, trial, list(job_return.overrides), run_id)
            self.client.log_metric(self.parent, f"best/{self.metric}", value, step=trial)
        self.trials += 1

    def _stop_without_traceback(self, config: DictConfig, job_return: Any) -> None:
        """Where the sweeper is about to end the sweep with a traceback, say why in one line and
        exit 1: a trial that failed on a data or config problem when ``max_failure_rate`` stops at
        the first failure (the sweeper raises the trial's exception again), and a last trial with
        none completed (Optuna: "No trials are completed yet"). The trials' errors are printed
        above; the parent run ends FAILED at exit (``_abandoned``). A trial that failed on anything
        else keeps the sweeper's traceback, which is where its cause is."""
        from recsys.errors import TrialFailed

        sweeper, num = config.hydra.sweeper, int(config.hydra.job.num)
        try:
            _ = job_return.return_value  # raises the trial's exception when it failed
            user_error = False  # completed, but without the objective
        except TrialFailed:
            user_error = True
        except Exception:
            user_error = False
        rate = float(sweeper.get("max_failure_rate", 0.0))
        # One trial a batch (the presets' n_jobs: 1): a failure is a failure rate of 1.
        if int(sweeper.get("n_jobs", 1)) == 1 and rate < 1.0:
            if not user_error:
                return  # the sweeper raises the trial's exception: its traceback shows the cause
            print(
                f"error: the sweep stopped at trial {num}, which failed (error above); "
                f"hydra.sweeper.max_failure_rate={rate:g} stops at the first failure, 1.0 runs every trial",
                file=sys.stderr,
            )
            raise SystemExit(1)
        n_trials = sweeper.get("n_trials")
        if self.trials == 0 and n_trials is not None and num == int(n_trials) - 1:
            print(f"error: none of the sweep's {n_trials} trials completed (errors above)", file=sys.stderr)
            raise SystemExit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None:
            return
        atexit.unregister(self._abandoned)
        os.environ.pop(PARENT_ENV, None)
        results = self.sweep_dir / RESULTS_FILE
        if results.is_file():
            self.client.log_artifact(self.parent, str(results))
        self._record_best()
        self.client.set_terminated(self.parent)
        self.parent = None

    def _abandoned(self) -> None:
        """At exit of a sweep that stopped early: the best trial so far, and the parent run FAILED."""
        if self.parent is None:
            return
        with contextlib.suppress(Exception):
            self._record_best()
            self.client.set_terminated(self.parent, status="FAILED")
            print(f"sweep stopped: MLflow parent run {self.parent} marked FAILED", file=sys.stderr)
        self.parent = None

    def _record_best(self) -> None:
        self.client.set_tag(self.parent, "failed_trials", str(self.failed))
        if self.best is not None:
            value, trial, overrides, run_id = self.best
            self.client.set_tag(self.parent, "best_trial", str(trial))
            self.client.set_tag(self.parent, "best_overrides", " ".join(overrides))
            self.client.set_tag(self.parent, "best_run_id", str(run_id))
            best = {"trial": trial, "run_id": run_id, "value": value, "overrides": overrides}
            self.client.log_text(self.parent, OmegaConf.to_yaml(OmegaConf.create(best)), "best.yaml")
            print(
                f"\nBest of {self.trials} trials{f' ({self.failed} failed)' if self.failed else ''} "
                f"({self.metric} = {value:.4f}): trial {trial}, MLflow run "
                f"{run_id}, folder {self.sweep_dir / str(trial)}\n  overrides: {' '.join(overrides)}"
            )
