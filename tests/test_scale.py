"""Costs that grow no faster than the work: a capped ranker sample, sampled evaluation, stage profiles.

The README's "Larger data" commands are run here (tests/test_readme.py checks they are the
README's). The 10x and 100x training commands run in process up to the job's up-front memory
estimate (from the generator's planned size, before any data is drawn), with
``memory_limit_gb=1`` so they stop there with the one-line error instead of training for hours;
the error names the event count, which checks the scale. ``bench/scale.py --sizes 1 --
encoder=tiny`` runs for real with the tiny data appended (later Hydra overrides win); its
1x/10x and 100x forms run with ``-- memory_limit_gb=1``: the first size's job stops at the
memory estimate of its real size, and the bench stops with its error.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.cf.models import ItemKNN, Popularity
from recsys.columns import Columns
from recsys.data.split import LeaveLastOutSplit, Split
from recsys.errors import ConfigError
from recsys.evaluation.sampling import ci95_half_width, sample_test_users
from recsys.pipeline import FusionStage, LabelledStage
from recsys.profiling import StageTimings, peak_rss_mb, release_free_memory
from recsys.rank.ranker import LambdaMARTRanker
from recsys.recommender import History

REPO = Path(__file__).resolve().parents[1]
README_COMMANDS = [
    "python -m recsys.train +experiment=bert_ranker data.n_users=30000 data.n_items=15000",
    "python -m recsys.train +experiment=bert_ranker data.n_users=300000 data.n_items=150000",
    "python bench/scale.py",
    "python bench/scale.py --sizes 1,10,100",
    "python bench/scale.py --sizes 1 -- encoder=tiny",
]
TRAIN_10X, TRAIN_100X, BENCH, BENCH_100X, BENCH_TINY = README_COMMANDS


@pytest.fixture
def stage(tiny_dataset):
    data = tiny_dataset
    split = LeaveLastOutSplit().split(data.interactions)
    hist = History(split.train, data.n_users, data.n_items)
    models = {"popularity": Popularity().fit(hist), "itemknn": ItemKNN(neighbours=10).fit(hist)}
    users = split.val[Columns.UserIdx].unique().sort().to_numpy()
    return users, hist, models, split


def fitted(stage, max_train_users, seed=0):
    """The fitted stage and the frame its ranker learned from."""
    users, hist, models, split = stage
    ranker = LambdaMARTRanker(n_estimators=10, min_child_samples=5, seed=0)
    fusion = FusionStage({"itemknn": 8, "popularity": 4}, ranker, max_train_users, seed=seed)
    learned: list[pl.DataFrame] = []
    fit = ranker.fit
    ranker.fit = lambda df, *a, **k: (learned.append(df), fit(df, *a, **k))[1]
    return fusion.fit(LabelledStage(users, models, hist, split.val)), learned[0]


@pytest.mark.slow
def test_ranker_learns_from_the_first_max_train_users_taught_users_in_a_seeded_order(stage):
    users, hist, models, split = stage
    everyone, every_row = fitted(stage, None)
    taught = set(every_row[Columns.UserIdx].unique().to_list())  # a target among their candidates
    assert everyone.train_users == len(taught) < len(users) and everyone.examined_users == len(users)

    fusion, rows = fitted(stage, 20)
    order = np.random.default_rng(0).permutation(users)
    first = [u for u in order if u in taught][:20]
    assert fusion.train_users == 20 and sorted(rows[Columns.UserIdx].unique().to_list()) == sorted(first)
    assert 20 <= fusion.examined_users <= list(order).index(first[-1]) + 1 + 1024  # stops once found
    # A user's rows do not depend on which users were built beside them.
    key = [Columns.UserIdx, Columns.ItemIdx]
    expected = every_row.filter(pl.col(Columns.UserIdx).is_in(first)).sort(key)
    assert rows.sort(key).equals(expected.select(rows.columns))
    assert fitted(stage, 20)[1].sort(key).equals(rows.sort(key))  # same seed, same users
    other = set(fitted(stage, 20, seed=1)[1][Columns.UserIdx].unique().to_list())
    assert other != set(first) and other <= taught
    above, _ = fitted(stage, 10 * len(users))  # a cap above the count changes nothing
    assert above.train_users == len(taught) and above.examined_users == len(users)
    assert fusion.timings["candidates_features"] > 0 and fusion.timings["ranker_train"] > 0
    assert 0 < fusion.candidate_recall_val <= 1


@pytest.mark.slow
def test_earlier_labelled_stages_have_their_own_cap_and_queries(stage, tiny_dataset):
    from recsys.pipeline import earlier_stages

    users, hist, models, split = stage
    ((events, targets),) = earlier_stages(split.train, 1)
    earlier_hist = History(events, tiny_dataset.n_users, tiny_dataset.n_items)
    earlier_models = {"popularity": Popularity().fit(earlier_hist), "itemknn": ItemKNN(neighbours=10).fit(earlier_hist)}
    earlier = LabelledStage(targets[Columns.UserIdx].unique().sort().to_numpy(), earlier_models, earlier_hist, targets)
    val_stage = LabelledStage(users, models, hist, split.val)
    # The validation stage alone (every taught user: no cap) sets the candidate recall the job logs.
    alone = FusionStage({"itemknn": 8, "popularity": 4}, LambdaMARTRanker(n_estimators=5), None, seed=0)
    n_val = alone.fit(val_stage).train_users
    ranker = LambdaMARTRanker(n_estimators=10, min_child_samples=5, bags=2, seed=0)
    fusion = FusionStage({"itemknn": 8, "popularity": 4}, ranker, None, seed=0, label_stages=2, max_earlier_users=7)
    learned: list[pl.DataFrame] = []
    fit = ranker.fit
    ranker.fit = lambda df, *a, **k: (learned.append(df), fit(df, *a, **k))[1]
    fusion.fit(val_stage, [earlier])
    frame = learned[0]
    per_stage = frame.group_by(Columns.Stage).agg(pl.col(Columns.UserIdx).n_unique()).sort(Columns.Stage)
    assert per_stage[Columns.UserIdx].to_list() == [n_val, 7]  # the earlier stage's cap of taught users
    assert fusion.train_users == n_val + 7 and fusion.stages_used == 2
    # Stage 1's labels are each user's last training event; its candidates never a seen item.
    pair = [Columns.UserIdx, Columns.ItemIdx]
    labels = frame.filter((pl.col(Columns.Stage) == 1) & (pl.col("label") == 1)).select(pair)
    assert labels.join(targets.select(pl.col(pair).cast(pl.Int32)), on=pair).height == labels.height
    seen = events.select(pl.col(pair).cast(pl.Int32))
    assert not frame.filter(pl.col(Columns.Stage) == 1).join(seen, on=pair).height
    assert fusion.candidate_recall_val == alone.candidate_recall_val
    # One query per user and stage: the booster's groups count both stages of a user.
    queries = frame.select(Columns.UserIdx, Columns.Stage).unique().height
    assert len(ranker._dataset(frame, "label").construct().get_group()) == queries == n_val + 7

    # max_earlier_examined: the earlier stage's taught users come from the first N of its order.
    few = FusionStage(
        {"itemknn": 8, "popularity": 4},
        LambdaMARTRanker(n_estimators=5),
        None,
        label_stages=2,
        max_earlier_users=7,
        max_earlier_examined=9,
    )
    few.fit(val_stage, [earlier])
    first = np.random.default_rng(0).permutation(earlier.users)[:9]
    assert few.examined_users == alone.examined_users + 9 and n_val < few.train_users <= n_val + 7
    taught_first = frame.filter(pl.col(Columns.Stage) == 1)[Columns.UserIdx].unique().to_list()
    assert set(taught_first) - set(first.tolist())  # without the limit, users past the first 9 teach

    # A validation stage that fills max_train_users needs no earlier stage: none is built.
    def never():
        raise AssertionError("an earlier stage was built")
        yield

    filled = FusionStage({"itemknn": 8, "popularity": 4}, LambdaMARTRanker(n_estimators=5), 21, label_stages=2)
    filled.fit(val_stage, never())
    assert n_val > 21 and filled.train_users == 21 and filled.stages_used == 1

    with pytest.raises(ValueError, match="1 labelled stages given, rank.label_stages=2"):
        FusionStage({"popularity": 4}, LambdaMARTRanker(), label_stages=2).fit(
            LabelledStage(users, models, hist, split.val)
        )


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "two"])
def test_bad_label_stages_are_config_errors(bad):
    with pytest.raises(ConfigError, match="rank.label_stages must be a whole number >= 1"):
        FusionStage({"popularity": 4}, LambdaMARTRanker(), label_stages=bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "many"])
def test_bad_sample_sizes_are_config_errors(bad):
    with pytest.raises(ConfigError, match="rank.max_train_users"):
        FusionStage({"popularity": 4}, LambdaMARTRanker(), bad)
    with pytest.raises(ConfigError, match="rank.max_earlier_users must be a whole number >= 1 or null"):
        FusionStage({"popularity": 4}, LambdaMARTRanker(), label_stages=2, max_earlier_users=bad)
    with pytest.raises(ConfigError, match="rank.max_earlier_examined must be a whole number >= 1 or null"):
        FusionStage({"popularity": 4}, LambdaMARTRanker(), label_stages=2, max_earlier_examined=bad)
    empty = pl.DataFrame({Columns.UserIdx: [0]})
    with pytest.raises(ConfigError, match="eval.max_users"):
        sample_test_users(Split(empty, empty, empty), bad, seed=0)


def test_test_sample_keeps_every_event_of_the_sampled_users_and_nothing_else():
    test = pl.DataFrame({Columns.UserIdx: [0, 0, 1, 2, 3, 3, 4], Columns.ItemIdx: [1, 2, 3, 4, 5, 6, 7]})
    split = Split(test.head(0), test.head(0), test)
    assert sample_test_users(split, None, 0)[0] is split and sample_test_users(split, 5, 0)[0] is split
    cut, n, total = sample_test_users(split, 3, seed=0)
    assert (n, total) == (3, 5)
    users = cut.test[Columns.UserIdx].unique()
    assert len(users) == 3
    assert cut.test.equals(test.filter(pl.col(Columns.UserIdx).is_in(users.to_list())))


def test_sampled_mean_lies_within_its_interval_95_times_in_100():
    rng = np.random.default_rng(0)
    population = (rng.random(20_000) < 0.08) / rng.integers(1, 11, 20_000)  # NDCG-like: mostly 0
    inside = 0
    for _ in range(400):
        sample = rng.choice(population, 2000, replace=False)
        inside += abs(sample.mean() - population.mean()) <= ci95_half_width(sample, len(population))
    assert 0.92 <= inside / 400 <= 0.98


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


# Run in a fresh process: in a test worker that earlier tests left with threads and a GB of
# heap, memory freed elsewhere between ``base`` and the block's allocation made the 60 MB
# block look like 47 (three of ten full runs on 2026-12-05).
_STAGE_PEAKS = """
import json
import numpy as np
from recsys.profiling import StageTimings
from test_scale import resident_mb
timings = StageTimings()
timings["small"] = 0.1
base = resident_mb()  # closing "small" may have returned freed memory to the OS
block = np.ones(60 * 2**20 // 8)  # 60 MB, touched, freed before the stage ends
del block
timings["big"] = 0.2
timings["after"] = 0.3
timings["total"] = 0.6
print(json.dumps({"base": base, "peaks": timings.peak_mb, "per_stage": timings.peak_is_per_stage,
                  "metrics": timings.metrics()}))
"""


def test_stage_timings_record_each_stage_peak_memory():
    import json

    if peak_rss_mb() is None:
        pytest.skip("no /proc/self/status (not Linux): peak memory is not recorded")
    tests = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", _STAGE_PEAKS], capture_output=True, text=True, timeout=120, cwd=tests, check=True
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    base, peaks, metrics = got["base"], got["peaks"], got["metrics"]
    assert peaks["big"] >= base + 50
    assert peaks["total"] == max(peaks["small"], peaks["big"], peaks["after"])
    if got["per_stage"]:
        assert peaks["after"] < peaks["big"] - 50  # the mark was reset after "big"
    assert metrics["mem/big_peak_mb"] == peaks["big"] and metrics["time/big_s"] == 0.2


def test_closing_a_stage_returns_the_heap_it_freed_to_the_os():
    if peak_rss_mb() is None or not release_free_memory():
        pytest.skip("no glibc malloc_trim or /proc/self/status: freed heap stays with the process")
    timings = StageTimings()
    # Freeing a 16 MB mapped array makes glibc serve arrays up to that size from its heap; those
    # freed below a live one stay resident until trimmed (a stage's temporaries under the next).
    del_me = np.ones(2 * 2**20)
    del del_me
    blocks = [np.ones(2**20) for _ in range(25)]  # 25 x 8 MB, touched
    pinned = blocks.pop()
    del blocks
    before = resident_mb()
    timings["temporaries"] = 0.1
    assert resident_mb() < before - 100, (before, resident_mb())
    del pinned


@pytest.mark.slow
def test_job_logs_stage_profiles_and_samples_as_configured(tmp_path, caplog, capsys):
    """The real job with a capped ranker sample and a sampled evaluation: what it logs says so."""
    import logging

    from reliability_support import QUICK, train_in_process

    with caplog.at_level(logging.INFO, logger="recsys"):
        m = train_in_process(
            tmp_path,
            "out",
            *QUICK,
            "rank.max_train_users=60",
            "eval.max_users=80",
        )
    assert "evaluated on a sample of 80 of 300 test users" in caplog.text
    assert ", 80 of 300 users (a seeded sample);" in capsys.readouterr().out  # the printed table's heading
    # 60 validation users fill the cap: the earlier labelled stage is skipped.
    assert m["rank/train_users"] == 60 <= m["rank/examined_users"] <= 300 and m["rank/label_stages_used"] == 1
    filled = "the validation stage filled rank.max_train_users=60 (60 taught users): 1 earlier stage(s) skipped"
    assert filled in caplog.text
    assert m["eval/users"] == 80 and m["eval/users_total"] == 300
    assert 0 < m["test/fused/ndcg_at_10_ci95"] < 0.5 and "test/als/ndcg_at_10_ci95" in m
    assert pl.read_parquet(tmp_path / "out" / "recommendations.parquet")[Columns.User].n_unique() == 80
    # The protocol card and the report's subtitle say the figures are a sample's (they said "80 test users").
    from recsys.evaluation.bundle import read_bundle
    from recsys.evaluation.report import sampled

    protocol = read_bundle(tmp_path / "out" / "evaluation").protocol
    assert protocol.n_test_users == 80 and protocol.test_users_sampled_from == 300
    assert "a seeded random sample of the 300" in sampled(protocol)
    stages = ["load", "text_setup", "cf_fit_val", "text_finetune", "text_encode", "ranker_fit", "cf_fit_test"]
    stages += ["test_rank", "evaluate", "evaluation_report", "export", "model_save"]
    for stage in stages:
        assert m[f"time/{stage}_s"] >= 0 and m[f"mem/{stage}_peak_mb"] > 50, stage
    # The total is the largest window, or the short tail after the last stage if that grew a page.
    assert 0 <= m["mem/total_peak_mb"] - max(m[f"mem/{s}_peak_mb"] for s in stages) < 64
    assert sum(m[f"time/{s}_s"] for s in stages) <= m["time/total_s"]
    assert (
        m["time/fusion_candidates_features_s"] + m["time/fusion_ranker_train_s"]
        <= m["time/ranker_fit_s"] + m["time/test_rank_s"]
    )


def test_a_failed_job_still_logs_the_stages_it_ran(tmp_path, monkeypatch):
    """A job that fails part-way (here: right after its first CF fit) logs the seconds and peaks
    of the stages it finished to its MLflow run, marked failed: where a long job's time went."""
    import mlflow
    from reliability_support import QUICK, train_in_process

    from recsys import stages
    from recsys.tracking import tracking_uri

    def fails_after_a_stage(job, run_id, timings):
        with timings.stage("cf_fit_val"):
            pass
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(stages, "fit_validation", fails_after_a_stage)
    with pytest.raises(RuntimeError, match="went away"):
        train_in_process(tmp_path, "out", *QUICK)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(tmp_path / "mlruns"))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    m = run.data.metrics
    assert m["time/load_s"] > 0 and m["mem/load_peak_mb"] > 50 and m["time/cf_fit_val_s"] >= 0
    assert "time/total_s" not in m and "time/model_save_s" not in m


def test_memory_estimate_grows_with_the_rows_and_refuses_what_does_not_fit():
    from recsys.errors import InputError
    from recsys.profiling import check_memory, estimate_peak_gb

    small = estimate_peak_gb(42_000, 1_500, 3_000, 3_000, 170)
    assert estimate_peak_gb(420_000, 15_000, 30_000, 30_000, 170) > small + 3  # the candidate rows dominate
    # An evaluated user costs its lists; a ranker's user its candidate rows, held while it trains.
    evaluated = estimate_peak_gb(42_000, 1_500, 3_000, 30_000, 170) - small
    taught = estimate_peak_gb(42_000, 1_500, 30_000, 3_000, 170) - small
    assert 0 < evaluated < taught / 5
    # The 100x job with every test user: the test stage ranks them a block at a time, so it is
    # not refused on a 16 GB machine (11.1 GB measured).
    assert 11.1 < estimate_peak_gb(4_272_622, 150_000, 15_000, 300_000, 190) < 13
    assert check_memory(42_000, 1_500, 3_000, 3_000, 170, limit_gb=64) == small
    with pytest.raises(
        InputError, match=r"needs about 5\.\d GB of memory and the limit is 3\.0 GB.*rank.max_train_users"
    ):
        check_memory(420_000, 15_000, 30_000, 30_000, 170, limit_gb=3)
    with pytest.raises(ConfigError, match="memory_limit_gb"):
        check_memory(1, 1, 1, 1, 1, limit_gb=0)


def test_memory_estimate_counts_the_hungriest_cf_fit_where_it_outgrows_the_ranker():
    from omegaconf import OmegaConf

    from recsys.cf import ALS, EASE, SASRec
    from recsys.errors import InputError
    from recsys.profiling import estimate_peak_gb
    from recsys.stages import job_memory

    # SASRec's full softmax grows with the catalogue, its sampled one does not; EASE squares it.
    assert SASRec().fit_memory_gb(50_000) > 5 * SASRec().fit_memory_gb(1_000) > 0
    assert SASRec(negatives=2048).fit_memory_gb(500_000) == SASRec(negatives=2048).fit_memory_gb(5_000)
    assert EASE().fit_memory_gb(20_000) == pytest.approx(4 * EASE().fit_memory_gb(10_000))
    assert ALS().fit_memory_gb(10**6) == 0.0  # the per-event and per-item costs hold it
    # The fit comes before any candidate row: the peak is the larger moment, not their sum.
    rows = estimate_peak_gb(42_000, 1_500, 3_000, 3_000, 170)
    assert estimate_peak_gb(42_000, 1_500, 3_000, 3_000, 170, cf_fit_gb=0.1) == rows
    assert estimate_peak_gb(42_000, 1_500, 3_000, 3_000, 170, cf_fit_gb=5.0) > rows + 4
    cfg = OmegaConf.create({"rank": {"label_stages": 1, "n_candidates": {"als": 100}}, "memory_limit_gb": 3})
    cf = {"als": ALS(), "sasrec": SASRec(), "ease": EASE(max_items=10**6)}
    assert job_memory(cfg, 42_000, 1_500, 3_000, 3_000, {"als": ALS(), "sasrec": SASRec()}) < 3
    with pytest.raises(InputError, match=r"limit is 3\.0 GB .* Fitting cf\.sasrec alone holds about 2\.\d GB"):
        job_memory(cfg, 42_000, 60_000, 3_000, 3_000, {"als": ALS(), "sasrec": SASRec()})
    with pytest.raises(InputError, match=r"Fitting cf\.ease alone holds about 43\.\d GB"):
        job_memory(cfg, 42_000, 60_000, 3_000, 3_000, cf)


@pytest.mark.slow
def test_cli_refuses_a_job_that_will_not_fit_before_training(tmp_path):
    from reliability_support import run_cli

    proc = run_cli(tmp_path, "out", "+experiment=smoke", "memory_limit_gb=0.5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "needs about" in proc.stderr and "the limit is 0.5 GB" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlruns").exists() or not list((tmp_path / "mlruns").rglob("*.ckpt"))


@pytest.mark.slow
def test_cli_refuses_a_catalogue_a_cf_model_cannot_fit_before_training(tmp_path):
    """EASE past its max_items is named as the job starts, not after the text tower's fine-tuning."""
    from reliability_support import run_cli

    proc = run_cli(tmp_path, "out", "+experiment=smoke", "+cf.ease={_target_:recsys.cf.EASE,max_items:10}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"error: EASE inverts a dense items x items matrix: [\d,]+ items .* max_items \(10\)", proc.stderr)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "min_events"), [(TRAIN_10X, 300_000), (TRAIN_100X, 3_000_000)], ids=["10x", "100x"]
)
def test_readme_larger_data_commands_stop_at_the_memory_estimate(command, min_events, tmp_path):
    """The README's 10x and 100x jobs, in process up to the memory estimate (``memory_limit_gb=1``):
    the generator's planned size is checked before a row is drawn."""
    from hydra import compose, initialize_config_dir

    import recsys.config
    from recsys import train
    from recsys.errors import InputError

    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "recsys.train"]
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}", "memory_limit_gb=1"]
    with initialize_config_dir(config_dir=recsys.config.CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*args[3:], *paths])
    with pytest.raises(InputError, match=r"needs about [\d.]+ GB of memory and the limit is 1\.0 GB") as err:
        train.run(cfg)
    events = int(re.search(r"\(([\d,]+) events", str(err.value)).group(1).replace(",", ""))
    assert min_events <= events <= 2 * min_events
    assert not (tmp_path / "mlruns").exists()  # stopped before any run was logged
    assert not list(tmp_path.rglob("*.parquet"))  # and before the data was generated


def bench(command: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    args = shlex.split(command)
    assert args[:2] == ["python", "bench/scale.py"]
    if extra and "--" not in args:
        args.append("--")
    cmd = [sys.executable, *args[1:2], "--workdir", str(tmp_path), *args[2:], *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_readme_bench_command_prints_the_stage_table(tmp_path):
    """``python bench/scale.py --sizes 1 -- encoder=tiny`` with the tiny data and text budget appended."""
    tiny = ["data.n_users=150", "data.n_items=100", "text.data.steps_per_epoch=2", "text.frozen_history=false"]
    tiny += ["cf.bpr.iterations=5", "eval.zeroshot=false", "eval.report=false", "model.register_name=null"]
    proc = bench(BENCH_TINY, tmp_path, *tiny)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    assert "| stage | 1x s | 1x peak MB |" in table
    labels = ("data (generate, load, split)", "text (import Lightning, load the encoder)", "text (fine-tune)")
    for label in (*labels, "evaluation (all models", "total"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
        seconds = float(row.split("|")[2].replace(",", ""))
        assert seconds >= 0, row
    assert re.search(r"\| load average \(1 min\), start / end \| [\d.]+ / [\d.]+ \|", table)
    assert "data.n_users=3000" in proc.stderr and "encoder=tiny" in proc.stderr  # the command it ran
    assert "eval.max_users=null" in proc.stderr  # every test user: the table's comparisons need them
    assert (tmp_path / "x1" / "out" / "recommendations.parquet").exists()  # hydra.run.dir: nothing in the repo


def test_bench_table_divides_each_stage_by_the_first_size_and_states_the_load():
    """The growth column is each size's seconds over the first size's; memory is the largest window's."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from scale import table
    finally:
        sys.path.remove(str(REPO / "bench"))

    def result(scale, seconds, load):
        metrics = {"time/load_s": seconds, "mem/load_peak_mb": 100.0 * scale, "time/total_s": 2 * seconds}
        metrics |= {"time/cf_fit_val_s": seconds, "time/cf_fit_test_s": seconds, "mem/cf_fit_val_peak_mb": 5.0}
        metrics["mem/cf_fit_test_peak_mb"] = 7.0
        return {"scale": scale, "wall_s": 3 * seconds, "load": load, "events": 1000 * scale, "metrics": metrics}

    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in table([result(1, 2.0, [0.5, 1.0]), result(10, 30.0, [1.0, 4.5])]).splitlines()[2:]
    }
    assert rows["data (generate, load, split)"] == ["2.0", "100", "30.0", "1,000", "15.0x"]
    assert rows["CF (fit on train, refit on train+val)"] == ["4.0", "7", "60.0", "7", "15.0x"]
    assert rows["text (fine-tune)"] == ["–", "–", "–", "–", "–"]
    assert rows["events (train + val + test)"] == ["1,000", "", "10,000", "", "10.0x"]
    assert rows["load average (1 min), start / end"][:3] == ["0.5 / 1.0", "", "1.0 / 4.5"]


@pytest.mark.slow
@pytest.mark.parametrize("command", [BENCH, BENCH_100X], ids=["1x-10x", "1x-10x-100x"])
def test_readme_bench_commands_start_each_job_at_its_size(command, tmp_path):
    """The README's default and 100x bench forms with ``-- memory_limit_gb=1``: the 1x job starts at
    the default size and stops at the memory estimate; the bench reports it and stops."""
    proc = bench(command, tmp_path, "memory_limit_gb=1")
    assert proc.returncode != 0
    assert "[1x] recsys.train failed (exit 2)" in proc.stderr and "needs about" in proc.stderr
    assert "data.n_users=3000 data.n_items=1500" in proc.stderr
