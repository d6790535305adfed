"""``python -m recsys.evaluate run_id=<id>``: the offline evaluation report of a training run.

The report is rebuilt from the run's evaluation bundle (``evaluation/`` artifacts), so it needs
neither the models nor a GPU, and the same bundle and seed always give the same numbers.

    python -m recsys.evaluate run_id=3f2a...                       # one run (a unique id prefix will do)
    python -m recsys.evaluate experiment_name=bert_ranker          # the latest run of an experiment
    python -m recsys.evaluate 'compare=[<run_a>,<run_b>]'          # run B against run A
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig

import recsys.config  # (registers resolvers; CONFIG_DIR)
from recsys.errors import ConfigError, InputError, exit_on_user_error

log = logging.getLogger("recsys.evaluate")

MIN_PREFIX = 4  # shortest run-id prefix looked up


class RunStore:
    """The MLflow runs of a tracking URI: find a run, fetch its bundle, log a report to it."""

    def __init__(self, uri: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import mlflow

        self.uri = uri
        self.client = mlflow.MlflowClient(tracking_uri=uri)

    def resolve(self, run_id: str) -> str:
        """The full id of ``run_id``, or of the one run whose id starts with it (the docs and
        logs quote the first 8 characters, as git does with commits)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.run_id
        except MlflowException:
            pass  # not a full id: perhaps a prefix of one
        prefix = run_id.lower()
        is_prefix = len(prefix) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in prefix)
        matches = sorted(r for r in self._run_ids() if r.startswith(prefix)) if is_prefix else []
        if not matches:
            raise InputError(f"run {run_id} not found in {self.uri}")
        if len(matches) > 1:
            raise InputError(
                f"run id {run_id} is the start of {len(matches)} runs in {self.uri} "
                f"({', '.join(matches[:5])}{', ...' if len(matches) > 5 else ''}): give more of the id"
            )
        return matches[0]

    def _run_ids(self) -> list[str]:
        """Every active run's id, all experiments."""
        exps = [e.experiment_id for e in self.client.search_experiments()]
        ids, token = [], None
        while exps:
            page = self.client.search_runs(exps, max_results=1000, page_token=token)
            ids += [r.info.run_id for r in page]
            token = page.token
            if not token:
                break
        return ids

    def has_bundle(self, run_id: str) -> bool:
        from recsys.evaluation.bundle import BUNDLE_DIR

        return any(Path(f.path).name == "protocol.json" for f in self.client.list_artifacts(run_id, BUNDLE_DIR))

    def latest(self, experiment: str) -> str:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            raise InputError(f"no MLflow experiment named '{experiment}' in {self.uri}")
        runs = self.client.search_runs(
            [exp.experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
        for run in runs:
            if self.has_bundle(run.info.run_id):
                return run.info.run_id
        raise InputError(
            f"experiment '{experiment}' has no finished run with an evaluation bundle (looked at {len(runs)} runs)"
        )

    def bundle(self, run_id: str, into: Path):
        from mlflow.artifacts import download_artifacts

        from recsys.evaluation.bundle import BUNDLE_DIR, read_bundle

        if not self.has_bundle(run_id):
            raise InputError(
                f"run {run_id} has no evaluation bundle ({BUNDLE_DIR}/protocol.json): it was trained before "
                "the bundle existed or did not finish; retrain it"
            )
        path = download_artifacts(run_id=run_id, artifact_path=BUNDLE_DIR, dst_path=str(into), tracking_uri=self.uri)
        return read_bundle(path, run_id)

    def log_report(self, run_id: str, files: list[Path], root: Path, folder: str) -> None:
        for f in files:
            sub = f.parent.relative_to(root)
            self.client.log_artifact(run_id, str(f), str(Path(folder) / sub))


def run_id_text(value: object) -> str:
    """A run id from the command line as text. Hydra reads an unquoted ``1234e567`` (a possible id
    prefix) as a float, which cannot be turned back into the id: that is an error with the fix."""
    if isinstance(value, float | bool):
        raise ConfigError(
            f"a run id was read as the number {value!r}: quote it, e.g. run_id=\"'1234e567'\" or "
            '\'compare=["<run A>","<run B>"]\''
        )
    return str(value)


def run(cfg: DictConfig) -> list[Path]:
    """Write the report (or comparison) described by ``cfg``; returns the files written."""
    from hydra.utils import instantiate

    from recsys.evaluation.compare import compare_document
    from recsys.evaluation.report import write_document
    from recsys.tracking import tracking_uri

    chosen = [k for k in ("run_id", "experiment_name", "compare") if cfg.get(k) is not None]
    if len(chosen) != 1:
        raise ConfigError(
            "give exactly one of run_id=<id>, experiment_name=<name> or compare=[<run_a>,<run_b>]"
            + (f" (got {chosen})" if chosen else "")
        )
    reporter = instantiate(cfg.reporter)
    store = RunStore(cfg.tracking_uri or tracking_uri(cfg.paths.mlruns_dir))
    out = Path(cfg.output_dir)
    with tempfile.TemporaryDirectory(prefix="recsys-evaluate-") as tmp:
        if cfg.compare is not None:
            ids = [run_id_text(x) for x in cfg.compare]
            if len(ids) != 2:
                raise ConfigError(f"compare needs two run ids, compare=[<run_a>,<run_b>]; got {ids}")
            ids = [store.resolve(r) for r in ids]
            a, b = (store.bundle(r, Path(tmp) / f"run{i}") for i, r in enumerate(ids))
            doc, numbers = compare_document(reporter, a, b)
            files = write_document(doc, numbers, out)
            target, folder = ids[1], f"report/compare_{ids[0]}"
        else:
            if cfg.run_id is not None:
                run_id = store.resolve(run_id_text(cfg.run_id))
            else:
                run_id = store.latest(str(cfg.experiment_name))
            files = reporter.write(store.bundle(run_id, Path(tmp)), out)
            target, folder = run_id, "report"
    if cfg.log_to_mlflow:
        store.log_report(target, files, out, folder)
        log.info("logged to run %s under %s/", target, folder)
    print(f"report: {out / 'report.html'} (markdown: report.md, numbers: metrics.json)")
    return files


@recsys.config.entry_point("evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: run(cfg))


if __name__ == "__main__":
    main()
