"""MLflow: where runs live, what every run logs.

The backend is a sqlite database plus an artifact folder inside ``mlruns/``: MLflow 3.17
refuses the plain folder store. Paths are absolute, built from the configured folder, so the
launch directory does not matter; a store moved or copied elsewhere keeps pointing at its old
folder, so it is refused (``check_artifact_location``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("recsys.tracking")

MASK = "***"
# A key is split into words at separators and camelCase humps, lower-cased. Whole words only for
# the short ones: ``tokenizer`` (a model path) and ``author`` are not secrets, ``hf_token`` and
# ``authToken`` are.
SECRET_WORDS = frozenset({"token", "auth", "pwd", "credential", "credentials", "passphrase", "secret", "secrets"})
# Anywhere in the key with its separators removed: ``dbPassword``, ``API-KEY``, ``private_key``.
SECRET_PARTS = ("password", "passwd", "secret", "apikey", "accesskey", "privatekey", "credential", "passphrase")
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# scheme://user:password@host: the password part (the user and host are kept, they help debugging).
# The password runs to the last ``@`` followed by a host: it may itself hold ``@`` and ``/``.
URL_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)(\S+)(@[^@/\s]+)")
MIN_REDACTED = 4  # shorter secret values are not searched for in free text (they would match anywhere)


def is_secret_key(key: object) -> bool:
    """Whether a config key names a credential, whatever its case and separators."""
    text = str(key)
    words = {w.lower() for w in _WORD.findall(text)}
    joined = re.sub(r"[^a-z0-9]", "", text.lower())
    return bool(words & SECRET_WORDS) or any(part in joined for part in SECRET_PARTS)


def mask_value(value: Any) -> Any:
    """``value`` with the password of any ``scheme://user:password@host`` in it replaced by ``***``."""
    return URL_CREDENTIALS.sub(rf"\g<1>{MASK}\g<3>", value) if isinstance(value, str) else value


def tracking_uri(mlruns_dir: str | Path) -> str:
    return f"sqlite:///{Path(mlruns_dir).resolve() / 'mlflow.db'}"


def artifact_root(mlruns_dir: str | Path) -> str:
    return (Path(mlruns_dir).resolve() / "artifacts").as_uri()


STORE_LOCK = ".store.lock"  # beside mlflow.db: serialises creating the database and experiments


@contextmanager
def store_lock(mlruns_dir: str | Path) -> Iterator[None]:
    """A blocking ``flock`` on ``mlruns/.store.lock`` while the block runs. Two jobs starting at
    once on a fresh folder would otherwise both create ``mlflow.db`` (one fails in MLflow's
    schema migration) or both create the same experiment (one fails: it exists). The file stays;
    the kernel releases the lock when the holder exits, also on ``kill -9``."""
    fd = os.open(Path(mlruns_dir) / STORE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


RUNNING_FOLDER = ".running"  # in mlruns/: ``<run id>.lock``, held by the process of a run in progress


def _run_lock(mlruns_dir: str | Path, run_id: str) -> Path:
    return Path(mlruns_dir) / RUNNING_FOLDER / f"{run_id}.lock"


@contextmanager
def tracked_run(mlruns_dir: str | Path, experiment_id: str, **start: Any) -> Iterator[Any]:
    """``mlflow.start_run(experiment_id=..., **start)``, with the run's lock held while it runs.

    A job killed while its run is open (``kill -9``, SIGTERM, the machine going down) leaves
    the run ``RUNNING`` in the store for ever: MLflow has no heartbeat. Each run therefore holds
    an ``flock`` on ``mlruns/.running/<run id>.lock``, which the kernel releases when its process
    dies, and a job that starts a run first ends the runs of its experiment whose lock is free
    (``end_abandoned_runs``). The lock is taken under a temporary name and renamed to the run's:
    the run's file only ever appears locked, so a job starting beside it cannot take a live run
    for a dead one. The run is ended (FINISHED, or FAILED on an exception) before its lock is
    let go, so a lock found free with its run still ``RUNNING`` means the process died. A run
    stopped by Ctrl-C ends ``KILLED``, as one its process left behind is marked."""
    import mlflow

    end_abandoned_runs(mlruns_dir, experiment_id)
    folder = Path(mlruns_dir) / RUNNING_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=folder)
    lock = pending = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh file: nobody else holds it
        with mlflow.start_run(experiment_id=experiment_id, **start) as run:
            lock = _run_lock(mlruns_dir, run.info.run_id)
            os.rename(pending, lock)
            try:
                yield run
            except KeyboardInterrupt:  # Ctrl-C: stopped on purpose, not FAILED
                mlflow.end_run("KILLED")
                raise
    finally:
        lock.unlink(missing_ok=True)  # after the run ended: its status is written before the lock is free
        os.close(fd)


def end_abandoned_runs(mlruns_dir: str | Path, experiment_id: str) -> list[str]:
    """Mark ``KILLED`` the runs of the experiment left ``RUNNING`` by a process that is gone:
    those whose ``tracked_run`` lock this process can take. A run without a lock file (started
    before locks were kept, by another machine's store folder, or a sweep's parent run, which
    ends itself) is left alone. Returns the ids it ended."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'")
    except MlflowException as e:  # a tidy-up: the job goes on without it
        log.warning("could not look for abandoned MLflow runs: %s", str(e).splitlines()[0])
        return []
    ended = []
    for run in running:
        run_id = run.info.run_id
        lock = _run_lock(mlruns_dir, run_id)
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:  # none (most runs): nothing says whether its process is alive
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            # Read again with the lock held: a run that has just ended normally let its lock go
            # after it was marked FINISHED or FAILED.
            if client.get_run(run_id).info.status != "RUNNING":
                continue
            client.set_tag(
                run_id,
                "ended_by",
                "its process ended without closing the run (killed?): marked KILLED when the next run of "
                "this experiment started",
            )
            client.set_terminated(run_id, status="KILLED")
            lock.unlink(missing_ok=True)
            ended.append(run_id)
        except MlflowException as e:  # deleted meanwhile, say: left as it is
            log.warning("could not end abandoned MLflow run %s: %s", run_id, str(e).splitlines()[0])
        finally:
            os.close(fd)
    for run_id in ended:
        # Worded so that it never reads as the job's own "MLflow run <id>; ..." line, which scripts parse.
        log.warning("marked KILLED: run %s of this experiment, left RUNNING by a process that is gone", run_id)
    return ended


def check_artifact_location(location: str, mlruns_dir: str | Path, experiment: str) -> None:
    """Refuse an experiment whose (local) artifact folder lies outside ``mlruns_dir``.

    MLflow stores absolute artifact paths: after the project (or ``mlruns/``) is copied or moved,
    the database still names the old folder, and a new run would write its model, report and
    files there (into the original of a copy, or a re-created old path), not beside the database.
    A remote artifact store (``s3://`` ...) is the user's choice and is left alone."""
    from urllib.parse import urlparse

    from mlflow.utils.file_utils import local_file_uri_to_path

    from recsys.errors import ConfigError

    if urlparse(location).scheme not in ("", "file"):
        return
    folder = Path(local_file_uri_to_path(location)).resolve()
    home = Path(mlruns_dir).resolve()
    if not folder.is_relative_to(home):
        raise ConfigError(
            f"MLflow experiment {experiment!r} in {home / 'mlflow.db'} keeps its artifacts in {folder}, outside "
            f"{home}: the folder was moved or copied (MLflow stores absolute artifact paths), and this run's "
            "model and files would be written to the old place. Move the folder back, or log to a new "
            "experiment name (its artifacts then go to this folder's artifacts/)"
        )


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"a.b.c": value}``; values of secret-looking keys are masked."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if is_secret_key(key):
            out[name] = MASK  # a whole subtree under a secret key too, as in mask_secrets
        elif isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = mask_value(value)
    return out


def mask_secrets(cfg: Any) -> Any:
    """A copy of a nested config with the values of secret-looking keys replaced by ``***`` and
    URL passwords masked: what is written to run folders, artifacts and saved models."""
    if isinstance(cfg, Mapping):
        return {k: MASK if is_secret_key(k) else mask_secrets(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [mask_secrets(v) for v in cfg]
    return mask_value(cfg)


def secret_values(cfg: Any) -> set[str]:
    """The text of every value ``mask_secrets`` hides (whole values of secret keys, URL
    passwords), to search for in free text such as Hydra's ``override_dirname``."""
    out: set[str] = set()
    if isinstance(cfg, Mapping):
        for k, v in cfg.items():
            out |= _leaves(v) if is_secret_key(k) else secret_values(v)
    elif isinstance(cfg, list | tuple):
        for v in cfg:
            out |= secret_values(v)
    elif isinstance(cfg, str):
        out |= {m.group(2) for m in URL_CREDENTIALS.finditer(cfg)}
    return {v for v in out if len(v) >= MIN_REDACTED and v != MASK}


def _leaves(value: Any) -> set[str]:
    """Every scalar under ``value`` as text (what a secret key's subtree hides)."""
    if isinstance(value, Mapping):
        return set().union(*(_leaves(v) for v in value.values()))
    if isinstance(value, list | tuple):
        return set().union(*(_leaves(v) for v in value))
    return {str(value)}


def override_is_secret(override: str) -> bool:
    """Whether a command-line override (``+db.password=x``, ``credentials.key=x``) sets a value
    under a secret key."""
    key, sep, _ = override.partition("=")
    return bool(sep) and any(is_secret_key(part) for part in key.lstrip("+~").split("."))


def mask_override(override: str) -> str:
    """A command-line override with its value masked as in the config."""
    if override_is_secret(override):
        return f"{override.partition('=')[0]}={MASK}"
    return mask_value(override)


def redact(text: str, secrets: set[str]) -> str:
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def save_hydra_files(task_cfg: Any) -> Path | None:
    """Hydra's own record of the run (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml`` in
    the run folder), masked. Hydra would write them unmasked, so the configs set
    ``hydra.output_subdir: null`` and the entry point calls this instead."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    task = OmegaConf.to_container(task_cfg, resolve=False)
    hidden = secret_values(OmegaConf.to_container(task_cfg, resolve=True)) | secret_values(task)
    overrides = [mask_override(str(o)) for o in hydra_cfg.overrides.task]
    hidden |= {str(o).partition("=")[2] for o in hydra_cfg.overrides.task if override_is_secret(str(o))}
    hidden = {v for v in hidden if len(v) >= MIN_REDACTED}
    files = {
        "config.yaml": mask_secrets(task),
        "hydra.yaml": {"hydra": mask_secrets(OmegaConf.to_container(hydra_cfg, resolve=False))},
        "overrides.yaml": overrides,
    }
    from recsys.atomic import write_text_atomic

    for name, content in files.items():
        write_text_atomic(redact(OmegaConf.to_yaml(OmegaConf.create(content)), hidden), folder / name)
    return folder


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
        with store_lock(self.mlruns_dir):  # MLflow creates mlflow.db on the first call below
            exp = mlflow.get_experiment_by_name(self.experiment)
            if exp is None:
                return mlflow.create_experiment(self.experiment, artifact_location=artifact_root(self.mlruns_dir))
        check_artifact_location(exp.artifact_location, self.mlruns_dir, self.experiment)
        return exp.experiment_id

    @contextmanager
    def start(self) -> Iterator[str]:
        """Start (and end) the run, a child of ``parent_run_id`` if given; yields its id. Runs of
        the experiment left RUNNING by a killed job are marked KILLED first (``tracked_run``)."""
        exp_id = self.experiment_id()
        with tracked_run(self.mlruns_dir, exp_id, run_name=self.run_name, parent_run_id=self.parent_run_id) as run:
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
