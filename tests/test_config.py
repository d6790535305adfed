"""Every experiment and every config group option composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import recsys.config  # noqa: F401  (registers the resolvers the configs use)
from recsys.rank.ranker import LambdaMARTRanker
from recsys.recommender import Recommender
from recsys.tracking import Tracker

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = ["data", "split", "cf", "encoder", "ranker", "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def compose_config(overrides: list[str], tmp_path: Path) -> DictConfig:
    paths = [
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.mlruns_dir={tmp_path / 'mlruns'}",
        f"paths.output_dir={tmp_path / 'out'}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, *paths])


def instantiate_parts(cfg: DictConfig, tmp_path: Path) -> None:
    data = instantiate(cfg.data)
    assert hasattr(data, "load")
    split = instantiate(cfg.split)
    assert callable(getattr(split, "split", None))
    cf = {name: instantiate(node) for name, node in cfg.cf.items()}
    assert cf and all(isinstance(m, Recommender) for m in cf.values())
    assert isinstance(instantiate(cfg.ranker), LambdaMARTRanker)
    tracker = instantiate(cfg.logger)
    assert isinstance(tracker, Tracker)
    assert Path(tracker.mlruns_dir).resolve().is_relative_to(tmp_path.resolve())
    assert cfg.rank.n_candidates and all(int(n) > 0 for n in cfg.rank.n_candidates.values())
    assert callable(instantiate(cfg.text.data)) and callable(instantiate(cfg.text.module))
    for node in cfg.text.callbacks.values():
        assert instantiate(node) is not None
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    if cfg.encoder._target_.endswith("ItemEncoder.random"):
        enc = instantiate(cfg.encoder)
        assert enc.encode(["a telescope"]).shape == (1, cfg.encoder.hidden_size)
    else:
        # A pretrained model: loading it is slow, so only check that its folder is there.
        path = Path(cfg.encoder.name_or_path)
        assert (path / "config.json").is_file(), path


def test_experiments_exist():
    assert {"smoke", "bert_ranker"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name, tmp_path):
    cfg = compose_config([f"+experiment={name}"], tmp_path)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation resolves
    instantiate_parts(cfg, tmp_path)


def test_smoke_is_small_and_tiny(tmp_path):
    cfg = compose_config(["+experiment=smoke"], tmp_path)
    assert cfg.encoder._target_.endswith("ItemEncoder.random")
    assert cfg.data.n_users <= 1000 and cfg.trainer.max_epochs <= 3


def test_default_config_composes(tmp_path):
    cfg = compose_config([], tmp_path)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    # Experiments are opt-in deltas: with `experiment` in config.yaml's defaults, Hydra rejects
    # `+experiment=NAME` ("Multiple values for experiment").
    assert "experiment" not in cfg


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", "encoder=tiny"] if group != "encoder" else [f"encoder={option}"]
    if group == "data" and option == "files":
        (tmp_path / "e.csv").write_text("user_id,item_id,timestamp,event\nu,A,1,click\n")
        (tmp_path / "i.csv").write_text("item_id,title,description\nA,a,x\n")
        overrides += [f"data.interactions={tmp_path / 'e.csv'}", f"data.items={tmp_path / 'i.csv'}"]
    cfg = compose_config(overrides, tmp_path)
    instantiate_parts(cfg, tmp_path)
    if group == "data" and option == "files":
        assert instantiate(cfg.data).load().n_users == 1


def test_params_are_the_flattened_config_with_secrets_masked(tmp_path):
    from recsys.tracking import flatten, tracking_uri

    cfg = compose_config(["+experiment=smoke"], tmp_path)
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    assert flat["seed"] == cfg.seed
    assert flat["trainer.max_epochs"] == cfg.trainer.max_epochs
    assert not any(isinstance(v, dict) for v in flat.values())
    masked = flatten({"db": {"password": "hunter2", "host": "h"}, "api_key": "k", "hf_token": "x"})
    assert masked == {"db.password": "***", "db.host": "h", "api_key": "***", "hf_token": "***"}
    assert tracking_uri(tmp_path / "mlruns") == f"sqlite:///{(tmp_path / 'mlruns').resolve()}/mlflow.db"


def test_tokenizer_path_is_not_masked():
    from recsys.tracking import flatten

    assert flatten({"encoder": {"tokenizer": "/models/minilm", "max_length": 32}}) == {
        "encoder.tokenizer": "/models/minilm",
        "encoder.max_length": 32,
    }


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_hparams_search_preset_searches_existing_settings_on_a_validation_metric(preset, tmp_path):
    """Each searched key exists in the composed config (a typo would add a new, unused key) and
    the objective is one ``main`` returns from validation."""
    from recsys.train import VALIDATION_OBJECTIVES

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["+experiment=bert_ranker", f"hparams_search={preset}", f"paths.output_dir={tmp_path}"],
            return_hydra_config=True,
        )
    assert cfg.optimized_metric in VALIDATION_OBJECTIVES
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.model.alias is None  # trials leave @champion alone
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key
