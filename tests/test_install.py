"""The package as a user installs it: a wheel (not the source tree) in a fresh venv, its console
scripts run from an empty folder, the configs read from inside the package.

The venv borrows the project venv's dependencies through a ``.pth`` line (installing torch and
friends again would take minutes and needs the network); ``recsys`` itself comes only from the
wheel: the project venv's editable-install hook is a ``.pth`` file in a folder that is merely
put on ``sys.path``, so Python never processes it, and ``PYTHONPATH`` is removed.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import polars as pl
import pytest

from recsys.columns import Columns

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# The README's install commands, verbatim (tests/test_readme.py checks they are the README's).
README_COMMANDS = [
    "pip install .",
    "recsys-train +experiment=smoke",
    "recsys-recommend model_uri=models:/recsys@champion",
    "recsys-evaluate experiment_name=smoke",
]
INSTALL, TRAIN, RECOMMEND, EVALUATE = (shlex.split(c) for c in README_COMMANDS)
SMALL = ["data.n_users=200", "data.n_items=120", "trainer.max_epochs=1", "eval.zeroshot=false", "eval.report=false"]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**e, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding only ``recsys`` built from this checkout by ``pip install .``; returns its ``bin/``."""
    root = tmp_path_factory.mktemp("install")
    run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], root)
    bin_dir = root / "venv" / "bin"
    purelib = subprocess.check_output(
        [str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "project_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    # The README's `pip install .`: pip and hatchling come from the project venv (the dev extras),
    # hence --no-build-isolation (no index needed); --no-deps: they are there already.
    pip = [str(bin_dir / "python"), "-m", *INSTALL[:2], "-q", "--no-deps", "--no-build-isolation", *INSTALL[2:]]
    run(pip, REPO)
    return bin_dir


def test_the_wheel_ships_the_configs_and_nothing_comes_from_the_checkout(venv, tmp_path):
    code = (
        "import recsys.config as c, recsys.train as t; print(c.CONFIG_DIR); print(t.__file__); print(c.project_root())"
    )
    lines = run([str(venv / "python"), "-c", code], tmp_path).stdout.splitlines()
    site = venv.parent / "lib"
    assert Path(lines[0]).is_relative_to(site) and Path(lines[0], "config.yaml").is_file()
    assert Path(lines[1]).is_relative_to(site)
    assert Path(lines[2]) == tmp_path  # outputs and mlruns/ go to the launch folder


def test_user_config_dir_adds_an_experiment(venv, tmp_path):
    """``--config-dir`` puts the user's folder beside the shipped configs."""
    mine = tmp_path / "myconf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - smoke\nexport:\n  k: 7\n")
    cmd = [str(venv / "recsys-train"), "--config-dir", str(tmp_path / "myconf"), "+experiment=mine", "--cfg", "job"]
    out = run(cmd, tmp_path).stdout
    assert "k: 7" in out and "experiment: smoke" in out  # the user's delta on top of the shipped smoke experiment


def test_console_scripts_train_recommend_evaluate_from_an_empty_folder(venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    train = run([str(venv / TRAIN[0]), *TRAIN[1:], *SMALL], work)
    assert "MLflow run" in train.stdout
    (run_dir,) = (work / "outputs").glob("20*")
    assert (run_dir / "recommendations.parquet").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert (work / "mlruns" / "mlflow.db").is_file()

    (work / "ids.txt").write_text("U00001\nU00002\n")
    rec = [str(venv / RECOMMEND[0]), *RECOMMEND[1:], "users=ids.txt", "workers=1"]
    run(rec, work)
    recs = pl.read_parquet(work / "outputs" / "recommend" / "recommendations.parquet")
    assert set(recs[Columns.User]) == {"U00001", "U00002"} and recs.height == 2 * 20

    report = run([str(venv / EVALUATE[0]), *EVALUATE[1:], "reporter.n_bootstrap=100"], work)
    assert "report:" in report.stdout
    assert list((work / "outputs" / "evaluate").glob("*/report.html"))


def test_the_update_entry_reads_the_shipped_configs(venv, tmp_path):
    """``python -m recsys.update`` from the wheel: its configs are the package's, as for the
    console scripts (it looked for a ``conf/`` beside the package, which a wheel does not have).
    ``recsys-update``, its console script, was missing: the same config."""
    out = run([str(venv / "python"), "-m", "recsys.update", "--cfg", "job"], tmp_path).stdout
    assert "gate:" in out and "cf_mode:" in out
    assert run([str(venv / "recsys-update"), "--cfg", "job"], tmp_path).stdout == out
