"""README, "Keeping a model fresh": train -> deploy -> update -> gate -> serve, as commands.

The commands run in process (``run(cfg)`` of each entry point, with the config Hydra composes
from the command's arguments): the CLI wrappers around them are tested in tests/test_reliability.py and
tests/test_install.py.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import polars as pl
import pytest
from reliability_support import run_in_process

from recsys.columns import Columns

pytestmark = pytest.mark.slow


def cli(module: str, root: Path, *overrides: str):
    """``python -m recsys.<module> paths.mlruns_dir=... <overrides>``, in process."""
    return run_in_process(module, f"paths.mlruns_dir={root / 'mlruns'}", f"paths.root_dir={root / 'cwd'}", *overrides)


# The README's commands, verbatim (tests/test_readme.py checks that they are the README's); the
# test runs them with the smoke experiment added and the README's /data/ files made here.
README_COMMANDS = [
    "python -m recsys.train model.alias=champion",
    "python -m recsys.update model_uri=models:/recsys@champion data.interactions=/data/events_since.csv "
    "data.items=/data/items_changed.csv",
]


def readme_args(command: str, tmp_path: Path) -> list[str]:
    return [a.replace("/data/", f"{tmp_path}/") for a in shlex.split(command)[3:]]


def test_train_update_gate_and_serve_as_the_readme_says(tmp_path, capsys):
    from recsys.pipeline_model import TrainedPipeline

    cli(
        "train",
        tmp_path,
        "+experiment=smoke",
        *readme_args(README_COMMANDS[0], tmp_path),
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "eval.report=false",
        # smaller than the smoke run: this test is about the commands, not the model
        "data.n_users=200",
        "data.n_items=120",
        "trainer.max_epochs=1",
        "eval.zeroshot=false",
    )
    served = TrainedPipeline.load(tmp_path / "out" / "pipeline", models=[])
    # Since training: a new item that half the users buy over two days.
    users = served.users.ids[: len(served.users) // 2].tolist()
    events = pl.DataFrame(
        {
            Columns.User: users,
            Columns.Item: ["NEW-1"] * len(users),
            Columns.Timestamp: [served.now + 60 + 600 * j for j in range(len(users))],
            Columns.Event: ["purchase"] * len(users),
        }
    )
    items = pl.DataFrame(
        {"item_id": ["NEW-1"], "title": ["Merino yarn"], "category": ["knitting"], "description": ["wool"]}
    )
    events.write_csv(tmp_path / "events_since.csv")
    items.write_csv(tmp_path / "items_changed.csv")

    capsys.readouterr()
    update = cli("update", tmp_path, *readme_args(README_COMMANDS[1], tmp_path), f"output={tmp_path / 'update'}")
    printed = capsys.readouterr().out
    assert "recsys version 2 @challenger" in printed and "promoted to @champion" in printed, printed
    assert update["version"] == "2" and update["promoted"]

    out = tmp_path / "recommendations.parquet"
    cli("recommend", tmp_path, "model_uri=models:/recsys@champion", f"output={out}", "layout=file", "progress=false")
    recs = pl.read_parquet(out)
    others = served.users.ids[len(served.users) // 2 :].tolist()
    reached = recs.filter(pl.col(Columns.Item) == "NEW-1")[Columns.User].unique().to_list()
    assert set(reached) & set(others), "the new item reaches users who have not bought it"
