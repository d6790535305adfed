"""Every command the README shows is run by a test.

The commands are read from the README's fenced ``bash`` blocks (continuation lines joined,
trailing ``# comments`` dropped). Each must be listed below: either run here, in process, with
the tiny data, the tiny random BERT and short training added where the real run takes minutes
(the README's own settings always win: they come last), or run by another test that holds the
README command verbatim. A README command that no test runs fails ``test_every_readme_command_is_covered``.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import recsys.config  # noqa: F401  (resolvers)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI = REPO / ".ci" / "run"

MAIN = "python -m recsys.train +experiment=bert_ranker"
SETUP = 'python3 -m venv --upgrade-deps .venv && . .venv/bin/activate && pip install -e ".[dev]"'
TESTS = (
    'python3 -m venv --upgrade-deps .venv && . .venv/bin/activate && pip install -q --no-compile -e ".[dev,spark]" '
    "&& ruff check . && ruff format --check . && pytest -q"
)

# The README commands run in this file, in this order (later ones use the runs of earlier ones).
TRAIN = [
    MAIN,
    "python -m recsys.train +experiment=bert_ranker trainer.max_epochs=5 text.data.batch_size=32",
    "python -m recsys.train +experiment=bert_ranker split=global_time",
    "python -m recsys.train +experiment=bert_ranker encoder.name_or_path=/models/my-bert",
    "python -m recsys.train +experiment=bert_ranker data=files data.interactions=/data/events.csv "
    "data.items=/data/products.csv 'data.text_fields=[name,category,description]' "
    "'data.column_map={user_id: customer, item_id: sku}'",
]
EVALUATE = [
    "python -m recsys.evaluate run_id=<run id>",
    "python -m recsys.evaluate 'compare=[<run A>,<run B>]'",
]
RECOMMEND = [
    "python -m recsys.recommend model_uri=models:/recsys@champion",
    "python -m recsys.recommend model_uri=models:/recsys@champion users=ids.txt k=50 rules.max_per_category=3",
    "python -m recsys.recommend model_uri=models:/recsys@champion histories=new_users.csv",
    "python -m recsys.recommend model_uri=models:/recsys@champion layout=file "
    "output=outputs/recommend/one_file.parquet",
]
# README commands another test module runs: its README_COMMANDS lists them verbatim.
ELSEWHERE = {
    SETUP + " && " + MAIN: ".ci/run",  # the setup part; the job itself is MAIN, run here
    TESTS: ".ci/run",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db "
    "--host 127.0.0.1 --port 5000 --workers 1": "test_mlflow_ui",
    "pip install .": "test_install",
    "recsys-train +experiment=smoke": "test_install",
    "recsys-recommend model_uri=models:/recsys@champion": "test_install",
    "recsys-evaluate experiment_name=smoke": "test_install",
    "python -m recsys.train -m +experiment=bert_ranker hparams_search=ranker": "test_sweep",
    "MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db mlflow models serve -m models:/recsys@champion "
    "--env-manager local -h 127.0.0.1 -p 5001": "export.test_serve",
    "curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
    """-d '{"dataframe_records": [{"user_id": "U00001"}], "params": {"k": 5}}'""": "export.test_serve",
    **{command: "test_scale" for command in importlib.import_module("test_scale").README_COMMANDS},
    **{command: "export.test_spark" for command in importlib.import_module("export.test_spark").README_COMMANDS},
    **{command: "text.test_ddp" for command in importlib.import_module("text.test_ddp").README_COMMANDS},
    **{command: "test_fresh" for command in importlib.import_module("test_fresh").README_COMMANDS},
}

# Seconds, not minutes: the smoke experiment's data and BERT, one short epoch, no report.
TINY = [
    "encoder=tiny",
    "data=generated_tiny",
    "data.n_users=150",
    "data.n_items=100",
    "trainer.max_epochs=1",
    "text.data.steps_per_epoch=2",
    "text.frozen_history=false",
    "cf.bpr.iterations=5",
    "eval.zeroshot=false",
    "eval.report=false",
]


def readme_commands() -> list[str]:
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert MAIN in " ".join(commands)
    known = {*TRAIN, *EVALUATE, *RECOMMEND, *ELSEWHERE}
    assert not [c for c in commands if c not in known], "README commands no test runs"
    assert not [c for c in known - {MAIN} if c not in commands], "listed here but no longer in the README"


def test_commands_run_elsewhere_are_there_verbatim():
    ci = CI.read_text()
    assert TESTS in ci  # .ci/run runs the README's test command as it stands
    # The main command's setup is the test command's, less -q, --no-compile and Spark.
    for part in SETUP.split(" && "):
        ci_part = part.replace("pip install", "pip install -q --no-compile").replace('".[dev]"', '".[dev,spark]"')
        assert ci_part in ci or part in ci
    for command, module in ELSEWHERE.items():
        if module != ".ci/run":
            assert command in importlib.import_module(module).README_COMMANDS, f"{module} does not run: {command}"


def args_of(command: str, program: str) -> list[str]:
    tokens = shlex.split(command)
    assert tokens[: len(program.split())] == program.split(), command
    return tokens[len(program.split()) :]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with the files the README commands name: own data, a local BERT, user lists."""
    import polars as pl
    from transformers import AutoTokenizer, BertConfig, BertModel

    from recsys.config import minilm_path
    from recsys.data.synthetic import generate

    root = tmp_path_factory.mktemp("readme")
    inter, items = generate(n_users=120, n_items=80, seed=3)
    inter.rename({"user_id": "customer", "item_id": "sku"}).write_csv(root / "events.csv")
    items.rename({"item_id": "sku", "title": "name"}).write_csv(root / "products.csv")
    bert = root / "my-bert"  # a local BERT folder, as encoder.name_or_path expects; tiny and random
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(bert)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(bert)
    (root / "ids.txt").write_text("U00001\nU00002\nU00003\n")
    pl.DataFrame(
        {"user_id": ["new", "new"], "item_id": ["I00010", "I00042"], "timestamp": [1, 2], "event": ["click", "click"]}
    ).write_csv(root / "new_users.csv")
    return root


def substitute(command: str, root: Path, runs: list[str]) -> str:
    values = {
        "/data/events.csv": str(root / "events.csv"),
        "/data/products.csv": str(root / "products.csv"),
        "/models/my-bert": str(root / "my-bert"),
    }
    if runs:  # the main job's run, and the one after it for a comparison
        values["<run id>"] = values["<run A>"] = runs[0]
    if len(runs) > 1:
        values["<run B>"] = runs[1]
    for placeholder, value in values.items():
        command = command.replace(placeholder, value)
    return command


@pytest.mark.slow
def test_readme_commands_run(workspace, monkeypatch):
    import mlflow
    import polars as pl

    from recsys import evaluate, recommend, train
    from recsys.tracking import tracking_uri

    root = workspace
    monkeypatch.chdir(root)  # relative paths in the commands (ids.txt ...) are the user's folder
    paths = [f"paths.root_dir={root}"]
    runs: list[str] = []
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root / "mlruns"))
    for i, command in enumerate(TRAIN):
        args = args_of(substitute(command, root, runs), "python -m recsys.train")
        tiny = [t for t in TINY if not (t == "encoder=tiny" and any("encoder." in a for a in args))]
        if any(a.startswith("data=") for a in args):
            tiny = [t for t in tiny if not t.startswith("data")]
        with initialize_config_dir(config_dir=recsys.config.CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[*tiny, *paths, f"paths.output_dir={root / f'train{i}'}", *args])
        metrics = train.run(cfg)
        assert 0 <= metrics["test/fused/ndcg_at_10"] <= 1
        # Every run (the README's main command first) points models:/recsys@champion at its model.
        runs.append(client.get_model_version_by_alias("recsys", "champion").run_id)
    assert len(set(runs)) == len(TRAIN)
    exp = client.get_experiment_by_name("bert_ranker")
    assert len(client.search_runs([exp.experiment_id])) == len(TRAIN)

    # Point @champion back at the main job's model for the recommend commands.
    first = [v for v in client.search_model_versions("name='recsys'") if v.run_id == runs[0]][0]
    client.set_registered_model_alias("recsys", "champion", first.version)
    # In sequence, each to the output it names or the default one: as a user runs them, so that a
    # command refused because of what an earlier one left there fails here.
    for command in RECOMMEND:
        args = args_of(command, "python -m recsys.recommend")
        with initialize_config_dir(config_dir=recsys.config.CONFIG_DIR, version_base="1.3"):
            cfg = compose("recommend", overrides=[*paths, "progress=false", *args])
        result = recommend.run(cfg)
        recs = pl.read_parquet(result.path)
        assert recs.height > 0 and recs["rank"].min() == 1
        if "users=ids.txt" in args:
            assert set(recs["user_id"]) == {"U00001", "U00002", "U00003"} and recs["rank"].max() <= 50
        if "histories=new_users.csv" in args:
            assert "new" in set(recs["user_id"])

    for i, command in enumerate(EVALUATE):
        args = args_of(substitute(command, root, runs), "python -m recsys.evaluate")
        overrides = [*paths, f"output_dir={root / f'evaluate{i}'}", "reporter.n_bootstrap=50", *args]
        with initialize_config_dir(config_dir=recsys.config.CONFIG_DIR, version_base="1.3"):
            files = evaluate.run(compose("evaluate", overrides=overrides))
        assert any(f.name == "report.html" for f in files)
