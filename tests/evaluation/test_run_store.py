"""``RunStore.resolve``: a full run id, or a unique prefix of one; clear errors otherwise."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from recsys.errors import ConfigError, InputError
from recsys.evaluate import RunStore, run_id_text

IDS = ["3606c738aa11", "3606c7ffbb22", "4b4cb49c0000"]


class _Run:
    def __init__(self, run_id: str) -> None:
        self.info = type("Info", (), {"run_id": run_id})()


class _Client:
    def get_run(self, run_id: str) -> _Run:
        if run_id not in IDS:
            raise MlflowException(f"Run '{run_id}' not found")
        return _Run(run_id)


@pytest.fixture
def store(monkeypatch) -> RunStore:
    s = RunStore.__new__(RunStore)  # no tracking server: the client is a stand-in
    s.uri, s.client = "sqlite:///mlruns/mlflow.db", _Client()
    monkeypatch.setattr(s, "_run_ids", lambda: list(IDS))
    return s


def test_full_id_and_unique_prefix(store):
    assert store.resolve("4b4cb49c0000") == "4b4cb49c0000"
    assert store.resolve("4b4cb49c") == "4b4cb49c0000"
    assert store.resolve("3606C738") == "3606c738aa11"  # case does not matter


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("3606c7", "run id 3606c7 is the start of 2 runs in sqlite:///mlruns/mlflow.db (3606c738aa11, 3606c7ffbb22)"),
        ("deadbeef", "run deadbeef not found in sqlite:///mlruns/mlflow.db"),
        ("4b4", "run 4b4 not found"),  # too short to be taken as a prefix
        ("4b4c-zz", "run 4b4c-zz not found"),  # not hexadecimal
    ],
)
def test_ambiguous_or_unknown_ids_are_named(store, given, message):
    with pytest.raises(InputError, match="give more of the id" if "start of" in message else "not found") as e:
        store.resolve(given)
    assert message in str(e.value)


def test_a_run_id_read_as_a_number_says_how_to_quote_it():
    """Hydra reads run_id=1234e567 as a float (here inf): the error says to quote it."""
    from hydra import compose, initialize_config_dir

    from recsys.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        unquoted = compose("evaluate", ["run_id=1234e567"]).run_id
        quoted = compose("evaluate", ["run_id='1234e567'"]).run_id
    assert isinstance(unquoted, float)
    with pytest.raises(ConfigError, match="quote it"):
        run_id_text(unquoted)
    assert run_id_text(quoted) == "1234e567" and run_id_text(12345678) == "12345678"


def test_a_changed_report_does_not_mark_the_code_as_changed(tmp_path):
    """docs/reports/make.sh writes each report into the tree before the next job starts: only changes
    outside the generated reports make a run's code "uncommitted changes"."""
    import subprocess

    from recsys.evaluation.bundle import git_version

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "docs" / "reports" / "default").mkdir(parents=True)
    report, code = tmp_path / "docs" / "reports" / "default" / "report.md", tmp_path / "code.py"
    report.write_text("old report\n")
    code.write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    sha, dirty = git_version(tmp_path)
    assert len(sha) == 40 and not dirty
    report.write_text("new report\n")
    assert not git_version(tmp_path)[1]
    assert not git_version(tmp_path / "docs")[1]  # asked from a subfolder, the same answer
    code.write_text("x = 2\n")
    assert git_version(tmp_path)[1]
    assert git_version(tmp_path / "docs")[1]


def test_the_protocol_names_the_code_as_the_run_started(tmp_path):
    """A job asks git as it starts and hands that to the protocol card: a file edited while it
    trains does not make the run's code "uncommitted changes" (nor a clean one of a dirty start)."""
    import polars as pl

    from recsys.columns import Columns
    from recsys.evaluation.bundle import make_protocol

    targets = pl.DataFrame({Columns.UserIdx: [0], Columns.ItemIdx: [1]})
    common = dict(
        run_id="r", experiment="e", data_name="d", data_hash="h", n_users=1, n_items=2, split={},
        split_counts={}, seen_filtering=True, availability_filtering=False, ks=[1], max_k=1, seed=0,
        targets=targets, models=["als"], root=tmp_path,
    )  # fmt: skip
    assert make_protocol(**common, code=("a" * 40, False)).git_dirty is False
    assert make_protocol(**common, code=("b" * 40, True)).git_sha == "b" * 40
    assert make_protocol(**common, code=("b" * 40, True)).git_dirty is True
    assert make_protocol(**common).git_sha == "unknown"  # not given: asked of root now (no git here)
