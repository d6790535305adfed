"""The two checks every numeric config value goes through (``recsys.errors.require_whole`` and
``require_number``), and settings that reach them from the places that read config."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys.errors import ConfigError, require_number, require_whole


@pytest.mark.parametrize("value", [1, 7, 10**9])
def test_a_whole_number_at_or_above_the_bound_passes(value):
    require_whole("x.n", value)


@pytest.mark.parametrize(
    ("value", "low", "optional", "message"),
    [
        (0, 1, False, "x.n must be a whole number >= 1, got 0"),
        (-1, 0, False, "x.n must be a whole number >= 0, got -1"),
        (True, 1, False, "x.n must be a whole number >= 1, got True"),
        (2.0, 1, False, "x.n must be a whole number >= 1, got 2.0"),
        ("3", 1, False, "x.n must be a whole number >= 1, got '3'"),
        (None, 1, False, "x.n must be a whole number >= 1, got None"),
        (0, 1, True, "x.n must be a whole number >= 1 or null, got 0"),
    ],
)
def test_anything_else_is_a_config_error_that_names_the_setting(value, low, optional, message):
    with pytest.raises(ConfigError) as e:
        require_whole("x.n", value, low, optional=optional)
    assert str(e.value) == message


def test_none_passes_only_where_the_setting_is_optional():
    require_whole("x.n", None, optional=True)
    require_number("x.f", None, 0, optional=True)
    with pytest.raises(ConfigError, match="x.f must be a number >= 0, got None"):
        require_number("x.f", None, 0)


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [
        (0, {"low": 0}),
        (0.5, {"low": 0, "high": 1, "high_open": True}),
        (1, {"low": 0, "high": 1}),
        (1e-9, {"low": 0, "low_open": True}),
        (-3.5, {}),
    ],
)
def test_a_number_within_its_bounds_passes(value, kwargs):
    require_number("x.f", value, **kwargs)


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (1, {"low": 0, "high": 1, "high_open": True}, "x.f must be a number in [0, 1), got 1"),
        (0, {"low": 0, "low_open": True}, "x.f must be a number > 0, got 0"),
        (-0.1, {"low": 0}, "x.f must be a number >= 0, got -0.1"),
        (2, {"high": 1, "high_open": True}, "x.f must be a number < 1, got 2"),
        (1.5, {"low": 0, "high": 1}, "x.f must be a number in [0, 1], got 1.5"),
        (False, {"low": 0}, "x.f must be a number >= 0, got False"),
        ("0.5", {}, "x.f must be a number, got '0.5'"),
        (0, {"low": 0, "low_open": True, "optional": True}, "x.f must be a number > 0 or null, got 0"),
    ],
)
def test_a_number_outside_its_bounds_is_a_config_error(value, kwargs, message):
    with pytest.raises(ConfigError) as e:
        require_number("x.f", value, **kwargs)
    assert str(e.value) == message


def test_settings_that_took_a_boolean_for_a_count_now_refuse_it(tokenizer_path):
    """``True`` is an int to Python; before these checks ``eval.max_users=true`` sampled one test
    user and ``encoder.adapter_hidden=true`` built a one-unit adapter."""
    from recsys.data.split import Split
    from recsys.evaluation.sampling import sample_test_users
    from recsys.text.encoder import ItemEncoder

    t = pl.DataFrame({"user_idx": [0, 1, 2], "item_idx": [5, 6, 7]})
    with pytest.raises(ConfigError, match="eval.max_users must be a whole number >= 1 or null, got True"):
        sample_test_users(Split(t.head(0), t.head(0), t), True, seed=0)
    with pytest.raises(ConfigError, match="encoder.adapter_hidden must be a whole number >= 1 or null, got True"):
        ItemEncoder.random(tokenizer_path, adapter_hidden=True)
    with pytest.raises(ConfigError, match=r"encoder.dropout must be a number in \[0, 1\) or null, got 'high'"):
        ItemEncoder.random(tokenizer_path, dropout="high")


def test_weights_and_the_update_gate_refuse_what_is_not_a_number_by_name(tmp_path):
    """Before these checks ``data.weight=heavy`` and ``gate.tolerance=lots`` failed in ``float()``
    with a ValueError naming no setting."""
    from omegaconf import OmegaConf

    from recsys import update
    from recsys.data.files import FileDataSource
    from recsys.data.recbole import RecBoleDataSource

    with pytest.raises(ConfigError, match="data.weight must be a number > 0, got 'heavy'"):
        RecBoleDataSource(str(tmp_path), weight="heavy")
    with pytest.raises(ConfigError, match="data.weight must be a number > 0, got 0"):
        RecBoleDataSource(str(tmp_path), weight=0)
    with pytest.raises(ConfigError, match="data.event_weights.click must be a number > 0, got -1"):
        FileDataSource("i.csv", "items.csv", event_weights={"click": -1})
    with pytest.raises(ConfigError, match="data.event_weights.view must be a number > 0, got 'x'"):
        FileDataSource("i.csv", "items.csv", event_weights={"view": "x"})
    for tolerance, shown in (("lots", "'lots'"), (-0.5, "-0.5")):
        cfg = OmegaConf.create({"cf_mode": "refit", "gate": {"tolerance": tolerance}})
        with pytest.raises(ConfigError, match=f"gate.tolerance must be a number >= 0, got {shown}"):
            update.run(cfg)


# --- command-line overrides that name no setting ----------------------------------------------


@pytest.mark.parametrize(
    ("module", "override", "nearest"),
    [
        ("recsys.train", "trainer.max_epoch=5", "'trainer.max_epochs'"),
        ("recsys.train", "text.budget_minute=0.1", "'text.budget_minutes'"),
        ("recsys.evaluate", "reporter.n_bootstraps=100", "'reporter.n_bootstrap'"),
        ("recsys.recommend", "rules.max_per_categry=3", "'rules.max_per_category'"),
        ("recsys.update", "gate.tolerence=0.1", "'gate.tolerance'"),
    ],
)
def test_a_misspelled_override_is_refused_with_the_nearest_setting(tmp_path, module, override, nearest):
    """Before Hydra starts (whose own hint, '+key=value', adds a key nothing reads): exit 2, the
    nearest names, and nothing written."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", module, override], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    key = override.split("=")[0]
    assert f"error: no setting '{key}' in the config (did you mean {nearest}?)" in proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_an_added_key_nothing_reads_is_refused(tmp_path):
    """Regression: ``+text.budget_minute=0.1`` (Hydra's own hint for the misspelling) composed, and
    the job ran its default budget without a word."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "recsys.train", "+experiment=smoke", "+text.budget_minute=0.1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "error: '+text.budget_minute' adds a setting nothing reads (did you mean 'text.budget_minutes'?)" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("config", "override", "refused"),
    [
        ("config", "+trainer.max_epoch=5", "did you mean 'trainer.max_epochs' or '+trainer.min_epochs'"),
        ("config", "++data.n_user=5", "did you mean 'data.n_users'?"),
        ("config", "+encoder.max_lenght=16", "did you mean 'encoder.max_length'?"),
        ("config", "+sede=1", "did you mean 'seed'?"),
        ("recommend", "+rules.max_per_categry=3", "did you mean 'rules.max_per_category'?"),
        ("update", "+gate.tolerence=0.1", "did you mean 'gate.tolerance'?"),
        # read: a Trainer argument, entries of the settings that hold names, the user's own keys
        ("config", "+trainer.limit_val_batches=2", None),
        ("config", "+cf.als2._target_=recsys.cf.ALS", None),
        ("config", "+rank.n_candidates.bpr=30", None),
        ("config", "+data.event_weights.view=0.5", None),
        ("config", "+text.callbacks.mine._target_=x.Y", None),
        ("config", "+db.url=postgres://h/x", None),
        ("config", "++seed=3", None),
        ("config", "+hydra.job.env_set.X=1", None),
        ("recommend", "+spark.conf.spark.executor.memory=8g", None),
    ],
)
def test_which_added_keys_are_read(capsys, config, override, refused):
    from recsys.config import check_cli_overrides

    args = ["+experiment=bert_ranker", override] if config == "config" else [override]
    if refused is None:
        check_cli_overrides(config, args)
        return
    with pytest.raises(SystemExit) as e:
        check_cli_overrides(config, args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: '{override.split('=')[0]}' adds a setting nothing reads ({refused}" in err


def test_a_map_of_names_set_whole_says_how_to_add_or_replace(capsys):
    """Regression: ``data.event_weights={watch: 1.0}`` got Hydra's hint ``+data.event_weights=...``,
    which merges the user's events into the defaults (click, purchase) without saying so."""
    from recsys.config import check_cli_overrides

    with pytest.raises(SystemExit) as e:
        check_cli_overrides("config", ["+experiment=smoke", "data.event_weights={watch: 1.0, love: 3.0}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'data.event_weights' holds names of your choosing" in err
    add, replace = "'+data.event_weights={...}' adds entries to it", "'~data.event_weights' '+data.event_weights={...}'"
    assert f"{add}, {replace} replaces it" in err
    check_cli_overrides("config", ["+experiment=smoke", "~data.event_weights", "+data.event_weights={watch: 1.0}"])


@pytest.mark.parametrize(
    ("module", "says"),
    [
        ("recsys.train", "python -m recsys.train +experiment=NAME"),
        ("recsys.recommend", "python -m recsys.recommend [model_uri=...]"),
        ("recsys.evaluate", "python -m recsys.evaluate run_id=ID"),
        ("recsys.update", "python -m recsys.update data.interactions=EVENTS"),
    ],
)
def test_help_says_what_the_command_does_and_lists_only_its_settings(tmp_path, module, says):
    """Regression: every entry point's --help said '<name> is powered by Hydra' and listed the
    training job's config groups, which ``+experiment=smoke`` then showed the export cannot take."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(says) and "powered by Hydra" not in proc.stdout
    assert ("experiment: bert_ranker" in proc.stdout) == (module == "recsys.train")
    assert "== Settings (key=value) ==" in proc.stdout and list(tmp_path.iterdir()) == []


def test_without_a_near_name_the_message_lists_the_settings_there():
    from omegaconf import OmegaConf

    from recsys.config import unknown_setting_message

    cfg = OmegaConf.create({"rules": {"k": 10, "min_score": None}, "seed": 0})
    assert (
        unknown_setting_message(cfg, "rules.zzz")
        == "no setting 'rules.zzz' in the config (settings under 'rules': k, min_score)"
    )
    assert "did you mean 'rules.min_score'?" in unknown_setting_message(cfg, "rules.min_scor")
    assert "did you mean 'seed'?" in unknown_setting_message(cfg, "sede")


# --- sweeps (-m): the keys they fix and the keys they search --------------------------------------

SWEEP = ["-m", "+experiment=smoke", "hparams_search=ranker"]


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        (
            "trainer.max_epoch=1",
            "error: no setting 'trainer.max_epoch' in the config (did you mean 'trainer.max_epochs'?)",
        ),
        (
            "+text.budget_minute=0.1",
            "error: '+text.budget_minute' adds a setting nothing reads (did you mean 'text.budget_minutes'?)",
        ),
        (
            "ranker.num_leafs=choice(15,31)",
            "error: no setting 'ranker.num_leafs' in the config (did you mean 'ranker.num_leaves'?)",
        ),
        (
            "text.budget_minute=0.1,0.2",
            "error: no setting 'text.budget_minute' in the config (did you mean 'text.budget_minutes'?)",
        ),
        (
            "+text.budget_minute=interval(0.1,0.2)",
            "error: '+text.budget_minute' adds a setting nothing reads (did you mean 'text.budget_minutes'?)",
        ),
    ],
)
def test_a_sweep_naming_no_setting_is_refused_before_it_starts(capsys, override, refused):
    """Regression: ``-m`` skipped the check. ``+text.budget_minute=0.1`` ran every trial at the
    default budget without a word; ``trainer.max_epoch=1`` and a misspelled swept key got Hydra's
    hint to add the key with '+' after the MLflow parent run had started (and stayed RUNNING)."""
    from recsys.config import check_cli_overrides

    with pytest.raises(SystemExit) as e:
        check_cli_overrides("config", [*SWEEP, override])
    assert e.value.code == 2
    assert refused in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["ranker.num_leaves=choice(15,31)", "text.temperature=interval(0.05,0.2)", "seed=1,2", "++seed=3,4"],
        ["encoder=tiny,minilm", "+rank.n_candidates.bpr=10,20", "+trainer.limit_val_batches=2,3"],
        ["hparams_search=text", "trainer=ddp", "trainer.devices=1"],
    ],
)
def test_a_sweep_over_settings_passes(overrides):
    from recsys.config import check_cli_overrides

    check_cli_overrides("config", [*SWEEP, *overrides])
    check_cli_overrides("config", ["--multirun", "+experiment=smoke", *overrides])


def test_a_search_space_naming_no_setting_is_refused(tmp_path, capsys):
    """A user's ``hparams_search`` file whose ``hydra.sweeper.params`` misspells a setting."""
    from recsys.config import CONFIG_DIR, check_cli_overrides

    shipped = (Path(CONFIG_DIR) / "hparams_search" / "ranker.yaml").read_text()
    (tmp_path / "hparams_search").mkdir()
    (tmp_path / "hparams_search" / "mine.yaml").write_text(shipped.replace("ranker.num_leaves:", "ranker.num_leafs:"))
    args = ["+experiment=smoke", f"hydra.searchpath=[file://{tmp_path}]", "hparams_search=mine"]
    with pytest.raises(SystemExit) as e:
        check_cli_overrides("config", args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: hydra.sweeper.params: no setting 'ranker.num_leafs' in the config" in err
    assert "did you mean 'ranker.num_leaves'?" in err


# An override, its error, and whether the data must be read to find it (the catalogue's size);
# in this order, since the last one generates the data.
BAD_BEFORE_LIGHTNING = {
    "ranker.bags=0": ("ranker.bags must be a whole number >= 1, got 0", False),
    "rank.earlier_towers=maybe": ("rank.earlier_towers must be true or false, got 'maybe'", False),
    "+cf.ease={_target_:recsys.cf.EASE,max_items:10}": ("EASE inverts a dense items x items matrix", True),
}


def test_the_job_refuses_a_bad_cf_or_ranker_setting_before_importing_lightning(tmp_path):
    """Lightning's import alone takes 5-10 s on 2 cores: a bad CF, ranker or fusion setting is
    refused before it (``stages.prepare``), and before the data is read unless the check needs
    the catalogue, so that a typo fails in seconds. One fresh interpreter tries each in turn."""
    import subprocess
    import sys

    data = tmp_path / "data"
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={data}"]
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "import recsys.config\n"
        "from recsys import stages\n"
        "from recsys.errors import user_message\n"
        "from recsys.profiling import StageTimings\n"
        f"for override in {list(BAD_BEFORE_LIGHTNING)!r}:\n"
        "    with initialize_config_dir(config_dir=recsys.config.CONFIG_DIR, version_base='1.3'):\n"
        f"        cfg = compose('config', overrides=['+experiment=smoke', override, *{paths!r}])\n"
        "    try:\n"
        "        stages.prepare(cfg, StageTimings())\n"
        "    except Exception as e:  # the entry points' reading of it (Hydra wraps a constructor's error)\n"
        "        if (message := user_message(e)) is None:\n"
        "            raise\n"
        "        print(override, 'refused:', message)\n"
        "    print(override, 'lightning imported:', 'lightning' in sys.modules)\n"
        f"    print(override, 'data read:', __import__('os').path.exists({str(data)!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for override, (message, reads_data) in BAD_BEFORE_LIGHTNING.items():
        assert f"{override} refused: {message}" in proc.stdout, proc.stdout[-2000:]
        assert f"{override} lightning imported: False" in proc.stdout, proc.stdout[-2000:]
        assert f"{override} data read: {reads_data}" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize(
    ("module", "said"),
    [
        ("train", "interrupted (Ctrl-C); its MLflow run is marked KILLED; the same command again resumes"),
        (
            "recommend",
            "interrupted (Ctrl-C); the same command again resumes the export from its finished parts "
            "(engine=spark: writes it anew)",
        ),
    ],
)
def test_ctrl_c_ends_an_entry_point_with_one_line_and_exit_130(module, said, tmp_path, monkeypatch, capsys):
    """Not a KeyboardInterrupt traceback: one line saying what a rerun does, and the shell's code."""
    import importlib
    import sys

    entry = importlib.import_module(f"recsys.{module}")

    def ctrl_c(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "run", ctrl_c)
    monkeypatch.chdir(tmp_path)
    argv = {"train": ["+experiment=smoke", f"hydra.run.dir={tmp_path / 'out'}"], "recommend": []}[module]
    monkeypatch.setattr(sys, "argv", [f"recsys-{module}", *argv, f"paths.root_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 130
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_a_script_main_says_a_user_error_or_ctrl_c_in_one_line(capsys):
    """``run_script``, the ``__main__`` of every bench script: what the CLIs do, for argparse."""
    from recsys.errors import run_script

    def bad_setting() -> None:
        require_whole("ranker.bags", 0)

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    def bug() -> None:
        raise ZeroDivisionError("a bug keeps its traceback")

    assert run_script(lambda: 7) == 7
    for main, code, said in (
        (bad_setting, 2, "error: ranker.bags must be a whole number >= 1, got 0"),
        (ctrl_c, 130, "interrupted (Ctrl-C); nothing was written"),
    ):
        with pytest.raises(SystemExit) as exited:
            run_script(main, "nothing was written")
        assert exited.value.code == code
        assert capsys.readouterr().err == said + "\n"
    with pytest.raises(ZeroDivisionError):
        run_script(bug)


def test_every_bench_script_runs_its_main_through_run_script():
    """A bench script stopped with Ctrl-C or given a bad setting says so in one line, as the CLIs
    do; the check reads each script's ``if __name__ == "__main__":`` block."""
    import ast

    scripts = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py"))
    checked = []
    for script in scripts:
        tree = ast.parse(script.read_text())
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue  # a helper module (bench/generator_oracle.py)
        (block,) = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        calls = [ast.unparse(n) for n in ast.walk(block) if isinstance(n, ast.Call)]
        assert "run_script(main)" in calls, f"{script.name}: its __main__ block calls {calls}"
        checked.append(script.name)
    assert len(checked) >= 10 and "scale.py" in checked
