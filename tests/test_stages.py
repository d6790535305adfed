"""The training job's stages (``recsys.stages``), each run alone on tiny data."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from hydra import compose, initialize_config_dir

import recsys.config  # noqa: F401  (registers the resolvers the configs use)
from recsys.columns import Columns
from recsys.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def smoke_cfg(root: Path, *overrides: str):
    """``+experiment=smoke`` (smaller), every path under ``root``."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                "+experiment=smoke",
                f"paths.mlruns_dir={root / 'mlruns'}",
                f"paths.output_dir={root / 'out'}",
                f"text.resume_root={root / 'checkpoints'}",
                f"paths.data_dir={root / 'data'}",
                "data.n_users=200",
                "data.n_items=120",
                "trainer.max_epochs=1",
                "eval.zeroshot=false",
                "model.register_name=null",
                *overrides,
            ],
        )


def test_prepare_rejects_a_job_too_large_for_memory_before_any_run(tmp_path):
    from recsys.profiling import StageTimings
    from recsys.stages import prepare

    timings = StageTimings()
    with pytest.raises(InputError, match="memory_limit_gb"):
        prepare(smoke_cfg(tmp_path, "memory_limit_gb=0.001"), timings)
    assert "load" not in timings  # the stage did not finish
    assert not (tmp_path / "mlruns").exists()  # no MLflow run was started
    assert not list((tmp_path / "data").rglob("*.parquet"))  # generated data: refused before it is drawn


@pytest.mark.parametrize(
    ("override", "ok"),
    [("+rank.n_candidates.text_pop=10", False), ("+rank.n_candidates.text_popular=10", True)],
)
def test_prepare_checks_the_candidate_sources_by_name_before_any_training(tmp_path, override, ok):
    """A misspelt source stops the job in ``prepare``, not after fine-tuning; every model the job
    will build (the text tower's derived sources too) is a known name."""
    from recsys.errors import ConfigError
    from recsys.profiling import StageTimings
    from recsys.stages import prepare

    if ok:
        assert "text_popular" in prepare(smoke_cfg(tmp_path, override), StageTimings()).fusion.n_candidates
        return
    with pytest.raises(ConfigError, match=r"unknown sources \['text_pop'\]; known: \[.*'text_popular'"):
        prepare(smoke_cfg(tmp_path, override), StageTimings())
    assert not (tmp_path / "mlruns").exists()  # no MLflow run was started


def test_prepare_estimates_files_from_their_real_row_counts(tmp_path):
    from recsys.data.synthetic import generate
    from recsys.profiling import StageTimings
    from recsys.stages import prepare

    events, items = generate(n_users=150, n_items=90, seed=3)
    events.write_csv(tmp_path / "events.csv")
    items.write_csv(tmp_path / "items.csv")
    files = ["data=files", f"data.interactions={tmp_path / 'events.csv'}", f"data.items={tmp_path / 'items.csv'}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        overrides = [
            *files,
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'out'}",
            "memory_limit_gb=0.001",
        ]
        cfg = compose("config", overrides=overrides)
    with pytest.raises(InputError, match=rf"\({events.height:,} events, 90 items"):
        prepare(cfg, StageTimings())


@pytest.mark.slow
def test_validation_stage_alone_fits_the_ranker_without_seeing_validation_events(tmp_path):
    from recsys.profiling import StageTimings
    from recsys.stages import fit_validation, prepare

    timings = StageTimings()
    job = prepare(smoke_cfg(tmp_path, "rank.text_zeroshot_feature=true", "rank.label_stages=2"), timings)
    learned: list[pl.DataFrame] = []
    fit = job.fusion.ranker.fit
    job.fusion.ranker.fit = lambda df, *a, **k: (learned.append(df), fit(df, *a, **k))[1]
    with job.tracker.start() as run_id:
        fitted = fit_validation(job, run_id, timings)
    fitted.resume.finish()

    assert list(timings) == ["load", "text_setup", "text_finetune", "text_encode", "cf_fit_val", "ranker_fit"]
    # Every CF model, both text towers and the untouched one (a ranker feature here), in that order.
    assert list(fitted.models) == [*job.cfg.cf, "text", "text_new", "text_popular", "text_zeroshot"]
    assert fitted.zero_text is fitted.models["text_zeroshot"]
    assert fitted.zero_text is not fitted.text
    key = [Columns.User, Columns.Item, Columns.Timestamp]
    seen = fitted.history.interactions.select(key)
    assert seen.height == job.split.train.height
    assert job.split.val.height and not seen.join(job.split.val.select(key), on=key).height
    assert job.fusion.train_users > 0 and job.fusion.ranker.best_iteration >= 1
    assert 0 < job.fusion.candidate_recall_val <= 1
    assert 0 <= fitted.text_metrics["text/val_ndcg_at_10_finetuned"] <= 1
    assert isinstance(job.fusion.ranker.feature_importance(), pl.DataFrame)

    # rank.label_stages=2: the ranker also learns each user's last training event as a target, from
    # candidates built on the training events before it; the validation events stay the labels of
    # stage 0 only.
    frame = learned[0]
    assert set(frame[Columns.Stage].unique().to_list()) == {0, 1}
    labels = frame.filter(pl.col("label") == 1)
    pair = [Columns.UserIdx, Columns.ItemIdx]
    train = job.split.train.with_columns(pl.col(pair).cast(pl.Int32))
    last = train.group_by(Columns.UserIdx, maintain_order=True).last().select(pair)
    val = job.split.val.select(pl.col(pair).cast(pl.Int32))
    earlier = labels.filter(pl.col(Columns.Stage) == 1).select(pair)
    assert earlier.height and earlier.join(last, on=pair).height == earlier.height
    stage0 = labels.filter(pl.col(Columns.Stage) == 0).select(pair)
    assert stage0.height and stage0.join(val, on=pair).height == stage0.height
    # A candidate of stage 1 is never an event the user had before that target.
    cand1 = frame.filter(pl.col(Columns.Stage) == 1).select(pair)
    before = train.join(last, on=pair, how="anti").select(pair)
    assert not cand1.join(before, on=pair).height


def test_earlier_towers_fine_tune_the_earlier_stage_on_its_history_and_choose_on_its_targets(tmp_path, monkeypatch):
    import recsys.text.fit as text_fit
    from recsys.profiling import StageTimings
    from recsys.stages import fit_validation, prepare

    calls = []
    fine_tune = text_fit.fine_tune

    def spy(net, datamodule, *args, **kwargs):
        calls.append((datamodule.train.interactions, datamodule.val, net))
        return fine_tune(net, datamodule, *args, **kwargs)

    monkeypatch.setattr(text_fit, "fine_tune", spy)
    timings = StageTimings()
    job = prepare(smoke_cfg(tmp_path, "rank.label_stages=2", "rank.earlier_towers=true"), timings)
    with job.tracker.start() as run_id:
        fitted = fit_validation(job, run_id, timings)
    fitted.resume.finish()

    # The job's tower on train, chosen on validation; then the earlier stage's own, on the training
    # events before each user's last moment, chosen on those last moments, from the zero-shot start.
    assert len(calls) == 2
    (train0, val0, net0), (train1, val1, net1) = calls
    key = [Columns.UserIdx, Columns.ItemIdx, Columns.Timestamp]
    assert train0.height == job.split.train.height and val0.height == job.split.val.height
    assert val1.height and train1.height + val1.height <= job.split.train.height  # both inside train
    assert not train1.select(key).join(val1.select(key), on=key).height  # never trained on its targets
    assert net1 is not net0 and net1.item_encoder is not net0.item_encoder  # not the job's tower
    assert job.fusion.stages_used == 2
    # Its checkpoints went to the job's resume folder, which a finished run removes.
    assert not fitted.resume.path.exists() and not list((tmp_path / "out").glob("earlier_tower_*"))


def test_a_killed_job_reuses_the_earlier_stage_tower_it_had_fine_tuned(tmp_path, caplog, monkeypatch):
    import logging

    import numpy as np

    from recsys.profiling import StageTimings
    from recsys.stages import StageTower, fit_validation, prepare

    towers = []
    call = StageTower.__call__

    def spy(self, history, targets):
        tower = call(self, history, targets)
        towers.append(np.asarray(tower.item_embeddings).copy())
        return tower

    monkeypatch.setattr(StageTower, "__call__", spy)
    cfg = smoke_cfg(tmp_path, "rank.label_stages=2", "rank.earlier_towers=true")
    runs = []
    for _ in range(2):  # the second run is the rerun of a job killed after its ranker's fit
        job = prepare(cfg, StageTimings())
        with job.tracker.start() as run_id, caplog.at_level(logging.INFO, logger="recsys.text.fit"):
            caplog.clear()
            fitted = fit_validation(job, run_id, StageTimings())
        folder = fitted.resume.path / "earlier_stage1"
        runs.append((caplog.text, (folder / "done.json").is_file()))
        fitted.resume._lock.close()  # the process died: the kernel drops its lock, the folder stays
    (first_log, first_done), (second_log, _) = runs
    assert first_done and "reusing" not in first_log
    assert f"already finished in an earlier run; reusing {folder}" in second_log
    assert len(towers) == 2 and np.array_equal(towers[0], towers[1])


def test_earlier_towers_must_be_true_or_false(tmp_path):
    from recsys.errors import ConfigError
    from recsys.profiling import StageTimings
    from recsys.stages import prepare

    with pytest.raises(ConfigError, match="rank.earlier_towers must be true or false, got 'yes'"):
        prepare(smoke_cfg(tmp_path, "rank.earlier_towers=yes"), StageTimings())
