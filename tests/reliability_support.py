"""The real CLI in a subprocess, and one uninterrupted reference run shared by the crash-safety,
determinism and secret-masking tests (run once per session: a ``functools.cache``, as in
``export_support.py``)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SECRET = "s3cr3t-value-0451"
# Small and quick, with three epochs so that a kill can land after the first checkpoint.
SMOKE = (
    "+experiment=smoke",
    "trainer.max_epochs=3",
    "data.n_users=200",
    "data.n_items=120",
    "eval.zeroshot=false",
    "model.register_name=null",
    # Secrets in three shapes: none may reach MLflow or any file under the run folder.
    f"+service.api_token={SECRET}",
    f"+db.dbPassword={SECRET}",
    f"+db.url=postgres://bob:{SECRET}@db:5432/shop",
)


def env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def command(root: Path, out: str, *overrides: str) -> list[str]:
    """``python -m recsys.train`` with every path under ``root`` (the run folder, Hydra's, is ``root/out``)."""
    return [
        sys.executable,
        "-m",
        "recsys.train",
        f"paths.root_dir={root}",
        f"paths.mlruns_dir={root / 'mlruns'}",
        f"paths.data_dir={root / 'data'}",
        f"hydra.run.dir={root / out}",  # the run folder: paths.output_dir follows it
        *overrides,
    ]


# A short smoke job: one epoch, no zero-shot evaluation, no report, nothing registered.
QUICK = (
    "+experiment=smoke",
    "trainer.max_epochs=1",
    "eval.zeroshot=false",
    "eval.report=false",
    "model.register_name=null",
)


def run_cli(
    root: Path, out: str, *overrides: str, timeout: int = 300, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cwd = root / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        command(root, out, *overrides),
        cwd=cwd,
        env={**env(), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_in_process(module: str, *overrides: str):
    """``python -m recsys.<module> <overrides>`` as ``run(cfg)`` of the entry point, with the config
    Hydra composes from them: the job without the ~15 s a fresh interpreter spends importing (the
    CLI wrappers have their own tests)."""
    import importlib

    from hydra import compose, initialize_config_dir

    import recsys.config

    entry = importlib.import_module(f"recsys.{module}")
    with initialize_config_dir(config_dir=recsys.config.CONFIG_DIR, version_base="1.3"):
        return entry.run(compose({"train": "config"}.get(module, module), overrides=list(overrides)))


def train_in_process(root: Path, out: str, *overrides: str) -> dict[str, float]:
    """``recsys.train.run`` on the config ``command(root, out, *overrides)`` would compose."""
    args = [a for a in command(root, out, *overrides)[3:] if not a.startswith("hydra.run.dir=")]
    return run_in_process("train", *args, f"paths.output_dir={root / out}")


def run_recommend(root: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m recsys.recommend`` from ``root``, with its MLflow store under ``root``."""
    cmd = [sys.executable, "-m", "recsys.recommend", f"paths.mlruns_dir={root / 'mlruns'}", *overrides]
    return subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=timeout)


def checked(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


@dataclass(frozen=True)
class Run:
    root: Path
    out: Path
    proc: subprocess.CompletedProcess

    @property
    def log(self) -> str:
        return self.proc.stdout + self.proc.stderr


@functools.cache
def session_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="recsys-reliability-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def reference_run() -> Run:
    """The smoke job, uninterrupted, with ``SMOKE`` overrides."""
    root = session_root()
    return Run(root, root / "reference", checked(run_cli(root, "reference", *SMOKE)))
