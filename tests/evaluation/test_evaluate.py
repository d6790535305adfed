"""The report end to end: a tiny training run writes its evaluation bundle and report; the
``recsys.evaluate`` entry point rebuilds it, compares runs and refuses invalid comparisons."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hydra import compose, initialize_config_dir

from recsys.errors import InputError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("headline", "accuracy", "impressions", "beyond", "ablation", "segments", "ranker", "protocol", "scores")
CHROMIUM = Path("/usr/bin/chromium")


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``python -m recsys.train +experiment=smoke`` (smaller), in process; returns (root, run id)."""
    import mlflow

    from recsys.tracking import tracking_uri
    from recsys.train import run

    root = tmp_path_factory.mktemp("evaluate")
    cfg = compose_cfg(
        "config",
        [
            "+experiment=smoke",
            f"paths.mlruns_dir={root / 'mlruns'}",
            f"paths.output_dir={root / 'out'}",
            f"text.resume_root={root / 'checkpoints'}",  # not the repository's outputs/
            f"paths.data_dir={root / 'data'}",
            "data.n_users=200",
            "data.n_items=120",
            "trainer.max_epochs=1",
            "model.register_name=null",
            "eval.reporter.n_bootstrap=200",
        ],
    )
    run(cfg)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root / "mlruns"))
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    return root, runs[0].info.run_id


def evaluate(root: Path, out: Path, *overrides: str):
    from recsys.evaluate import run

    cfg = compose_cfg(
        "evaluate",
        [f"paths.mlruns_dir={root / 'mlruns'}", f"output_dir={out}", "reporter.n_bootstrap=200", *overrides],
    )
    return run(cfg)


def test_training_writes_bundle_and_report_with_every_section(tiny_run):
    import mlflow

    from recsys.tracking import tracking_uri

    root, run_id = tiny_run
    html = (root / "out" / "report" / "report.html").read_text()
    for key in SECTIONS:
        assert f'<section id="{key}">' in html, key
    # Self-contained: every figure embedded, nothing fetched from elsewhere. Four figures, and the
    # text tower's validation curve when fine-tuning checked validation more than once.
    curve = "Validation NDCG@10 by training step" in html
    assert html.count("data:image/png;base64,") == 4 + curve
    assert not re.search(r'src="(?!data:)', html)
    md = (root / "out" / "report" / "report.md").read_text()
    for title in ("## Headline", "## Accuracy at K", "## Segments", "## Protocol card", "## Ablation"):
        assert title in md
    # The time budget bounds training; the report tells it apart from the catalogue pass before it.
    took = re.search(r"Fine-tuning took ([\d.]+) min .* which took ([\d.]+); the zero-shot validation.* ([\d.]+)\)", md)
    assert took is not None
    total, train, zero_shot = map(float, took.groups())
    assert abs(train + zero_shot - total) <= 0.15
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root / "mlruns"))
    logged = {f.path for f in client.list_artifacts(run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/metrics.json", "report/plots"} <= logged
    bundle = {Path(f.path).name for f in client.list_artifacts(run_id, "evaluation")}
    assert {"recommendations.parquet", "targets.parquet", "protocol.json", "item_embeddings.npy"} <= bundle


def test_report_numbers_match_the_training_metrics(tiny_run):
    """The report recomputes metrics from the bundle; they must equal what training logged."""
    root, _ = tiny_run
    numbers = json.loads((root / "out" / "report" / "metrics.json").read_text())
    table = pl.read_csv(root / "out" / "metrics.csv").filter(pl.col("protocol") == "test")
    for row in table.iter_rows(named=True):
        for metric in ("recall_at_10", "ndcg_at_10", "recall_at_20", "ndcg_at_20", "hitrate_at_10"):
            assert numbers["models"][row["model"]][metric] == pytest.approx(row[metric]), (row["model"], metric)
    card = numbers["protocol"]
    assert card["seen_filtering"] is True and card["max_k"] == 100 and card["experiment"] == "smoke"
    assert card["split"]["type"] == "LeaveLastOutSplit"
    assert re.fullmatch("[0-9a-f]{40}", card["git_sha"])  # the tests run in the git checkout
    head = numbers["headline"]
    assert head["best_component"] in ("als", "bpr", "itemknn", "text", "popularity", "recent_popularity")
    assert any(v.startswith("fused ") for v in head["verdicts"])
    # Segments: user buckets hold every test user once.
    users = sum(s["users"] for s in numbers["segments"] if s["kind"] == "user history length")
    assert users == card["n_test_users"]
    events = sum(s["target_events"] for s in numbers["segments"] if s["kind"] == "target item")
    assert events == card["n_test_events"]


def test_cli_report_is_deterministic_and_logged(tiny_run, tmp_path):
    import mlflow

    from recsys.tracking import tracking_uri

    root, run_id = tiny_run
    evaluate(root, tmp_path / "a", f"run_id={run_id}")
    evaluate(root, tmp_path / "b", "experiment_name=smoke", "log_to_mlflow=false")
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a == b
    trained = json.loads((root / "out" / "report" / "metrics.json").read_text())
    assert trained["headline"] == a["headline"]  # same bundle, same seed (42) -> same intervals
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root / "mlruns"))
    assert "report/plots" in {f.path for f in client.list_artifacts(run_id, "report")}


def test_compare_same_run_gives_zero_differences(tiny_run, tmp_path):
    root, run_id = tiny_run
    evaluate(root, tmp_path, f"compare=[{run_id},{run_id}]", "log_to_mlflow=false")
    numbers = json.loads((tmp_path / "metrics.json").read_text())
    ci = numbers["models"]["fused"]["ndcg_at_10"]["b_minus_a"]
    assert ci["mean"] == 0.0 and ci["low"] == 0.0 and ci["high"] == 0.0
    assert "Comparison" in (tmp_path / "report.html").read_text()


def test_a_run_id_prefix_finds_the_run(tiny_run, tmp_path):
    """The docs and logs quote 8 characters of a run id; the entry point takes them."""
    root, run_id = tiny_run
    evaluate(root, tmp_path / "full", f"run_id={run_id}", "log_to_mlflow=false")
    # Quoted: unquoted, Hydra reads a prefix such as 1234e567 as a number (tests/evaluation/test_run_store.py).
    evaluate(root, tmp_path / "short", f"run_id='{run_id[:8].upper()}'", "log_to_mlflow=false")
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert json.loads((tmp_path / "short" / "metrics.json").read_text()) == full
    assert full["protocol"]["run_id"] == run_id


def tampered_run(root: Path, run_id: str, tmp: Path, **changes) -> str:
    """A second run in the same store whose bundle differs from ``run_id``'s only in ``changes``."""
    import mlflow
    from mlflow.artifacts import download_artifacts

    from recsys.tracking import tracking_uri

    uri = tracking_uri(root / "mlruns")
    src = Path(download_artifacts(run_id=run_id, artifact_path="evaluation", dst_path=str(tmp), tracking_uri=uri))
    card = json.loads((src / "protocol.json").read_text())
    card.update(changes)
    client = mlflow.MlflowClient(tracking_uri=uri)
    other = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    card["run_id"] = other
    (src / "protocol.json").write_text(json.dumps(card))
    client.log_artifacts(other, str(src), "evaluation")
    client.set_terminated(other)
    return other


def test_compare_refuses_a_different_split(tiny_run, tmp_path):
    root, run_id = tiny_run
    other = tampered_run(root, run_id, tmp_path / "dl", split={"type": "GlobalTimeSplit", "val_quantile": 0.8})
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys.evaluate",
            f"paths.mlruns_dir={root / 'mlruns'}",
            f"output_dir={tmp_path / 'out'}",
            f"compare=[{run_id},{other}]",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"runs {run_id} and {other} cannot be compared" in proc.stderr
    assert "['split']" in proc.stderr and "GlobalTimeSplit" in proc.stderr
    assert not (tmp_path / "out" / "report.html").exists()


def test_compare_refuses_other_test_events_and_allows_another_seed(tiny_run, tmp_path):
    from recsys.evaluation.bundle import read_bundle
    from recsys.evaluation.compare import check_comparable

    root, run_id = tiny_run
    a = read_bundle(root / "out" / "evaluation", run_id)
    for field, value in (("targets_hash", "0000"), ("data_hash", "ffff"), ("seen_filtering", False)):
        b = read_bundle(root / "out" / "evaluation", run_id)
        b.protocol = type(b.protocol)(**{**a.protocol.__dict__, field: value})
        with pytest.raises(InputError, match=field):
            check_comparable(a, b)
    b = read_bundle(root / "out" / "evaluation", run_id)
    b.protocol = type(b.protocol)(**{**a.protocol.__dict__, "seed": 7, "git_sha": "abc"})
    check_comparable(a, b)


def test_clear_errors_for_unknown_run_and_missing_bundle(tiny_run, tmp_path):
    import mlflow

    from recsys.tracking import tracking_uri

    root, run_id = tiny_run
    with pytest.raises(InputError, match="run 0123456789abcdef not found"):
        evaluate(root, tmp_path, "run_id=0123456789abcdef")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root / "mlruns"))
    bare = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    with pytest.raises(InputError, match=f"run {bare} has no evaluation bundle"):
        evaluate(root, tmp_path, f"run_id={bare}")
    with pytest.raises(InputError, match="exactly one of"):
        evaluate(root, tmp_path)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    """Open the HTML as a user would: the page must render, with the figures drawn (not blank)."""
    import matplotlib.image as mpimg

    root, _ = tiny_run
    html = root / "out" / "report" / "report.html"
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,9000",
            f"--screenshot={shot}",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), proc.stderr[-2000:]
    img = mpimg.imread(str(shot))
    assert img.shape[1] == 1280
    ink = (img[..., :3].mean(axis=2) < 0.9).mean(axis=1)  # share of non-white pixels per row
    # Text, tables and four figures: a large share of the page's rows carry ink.
    assert (ink > 0.01).mean() > 0.3
    # Coloured pixels exist (the plots' model colours, not just black text on white).
    rgb = img[..., :3]
    assert ((rgb.max(axis=2) - rgb.min(axis=2)) > 0.3).mean() > 0.002
    if os.environ.get("RECSYS_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["RECSYS_KEEP_SCREENSHOT"])


def test_reporter_refuses_k_beyond_the_lists(tiny_run):
    from recsys.errors import ConfigError
    from recsys.evaluation.bundle import read_bundle
    from recsys.evaluation.report import Reporter

    root, run_id = tiny_run
    with pytest.raises(ConfigError, match=f"run {run_id}: its lists hold 100 items"):
        Reporter(ks=(10, 200)).evaluate(read_bundle(root / "out" / "evaluation", run_id))
    with pytest.raises(ConfigError, match="headline_metric"):
        Reporter(headline_metric="ndcg_at_7")
    longest = Reporter(ks=(1, 100), headline_metric="ndcg_at_100").evaluate(read_bundle(root / "out" / "evaluation"))
    assert np.isfinite(longest.mean("fused", "mrr_at_100"))


def test_ablation_over_reports_lists_every_model_of_every_report(tiny_run, tmp_path):
    from recsys.evaluation.ablation import ablation_document
    from recsys.evaluation.render import Table

    root, run_id = tiny_run
    numbers_path = root / "out" / "report" / "metrics.json"
    numbers = json.loads(numbers_path.read_text())
    doc = ablation_document([numbers_path, numbers_path])
    table = next(b for b in doc.sections[0].blocks if isinstance(b, Table))
    assert len(table.rows) == 2 * len(numbers["ablation"])
    fused = next(r for r in table.rows if r[2] == "fused")
    assert fused[1] == run_id[:8] and fused[4] == pytest.approx(numbers["models"]["fused"]["ndcg_at_10"])
    with pytest.raises(InputError, match="no report numbers"):
        ablation_document([tmp_path / "missing.json"])


def test_item_segments_agree_with_per_user_metrics_under_leave_one_out(tiny_run):
    """With one target per user, a target-item segment's metric is the plain per-user metric
    averaged over the users whose target lies in it: an independent check of the masking."""
    from recsys.evaluation.bundle import read_bundle
    from recsys.evaluation.report import Reporter
    from recsys.evaluation.segments import popularity_deciles

    root, run_id = tiny_run
    bundle = read_bundle(root / "out" / "evaluation", run_id)
    ev = Reporter().evaluate(bundle)
    assert (ev.n_relevant == 1).all()
    target = np.array([r[0] for r in ev.relevant])
    decile_of_target = popularity_deciles(bundle.items["train_count"].to_numpy())[target]
    numbers = json.loads((root / "out" / "report" / "metrics.json").read_text())
    checked = 0
    for seg in numbers["segments"]:
        if seg["kind"] != "target item popularity":
            continue
        users = decile_of_target == seg["segment"]
        assert users.sum() == seg["users"]
        for model in ("als", "fused"):
            expected = ev.per_user[model]["ndcg_at_10"][users].mean()
            assert seg["ndcg_at_10"][model] == pytest.approx(expected), (seg["segment"], model)
            checked += 1
    assert checked >= 4


def test_impression_section_reports_each_models_impression_metrics(tiny_run):
    """A bundle with impression scores gets the MIND-protocol table; one without says it is omitted."""
    import dataclasses

    import polars as pl

    from recsys.evaluation.bundle import read_bundle
    from recsys.evaluation.impressions import impression_metrics, summarize
    from recsys.evaluation.report import Reporter

    root, run_id = tiny_run
    bundle = read_bundle(root / "out" / "evaluation", run_id)
    doc, numbers = Reporter(n_bootstrap=50).document(bundle)
    section = next(s for s in doc.sections if s.key == "impressions")
    assert "Omitted" in section.blocks[0].text and "impressions" not in numbers
    rng = np.random.default_rng(0)
    base = pl.DataFrame(
        {"impression_id": np.repeat(np.arange(30), 4), "clicked": np.tile([True, False, False, False], 30)}
    )
    scores = pl.concat(
        base.with_columns(
            pl.lit(m).alias("model"), pl.Series("score", rng.normal(size=120) + (i * base["clicked"].cast(float)))
        )
        for i, m in enumerate(["als", "fused"])
    )
    doc, numbers = Reporter(n_bootstrap=50).document(dataclasses.replace(bundle, impression_scores=scores))
    table = next(s for s in doc.sections if s.key == "impressions").blocks[-1]
    assert [row[0] for row in table.rows] == ["ALS", "fused"]
    want = summarize(impression_metrics(scores.filter(pl.col("model") == "fused"), ks=(5, 10)))
    assert numbers["impressions"]["fused"] == want
    assert numbers["impressions"]["fused"]["auc"] > numbers["impressions"]["als"]["auc"]  # the planted click signal
    # MRR and nDCG are averaged over the impressions with a click: the table says how many.
    unclicked = pl.when(pl.col("impression_id") < 10).then(False).otherwise(pl.col("clicked")).alias("clicked")
    doc, _ = Reporter(n_bootstrap=50).document(
        dataclasses.replace(bundle, impression_scores=scores.with_columns(unclicked))
    )
    table = next(s for s in doc.sections if s.key == "impressions").blocks[-1]
    counts = dict(zip(table.columns, table.rows[-1], strict=True))
    assert (counts["impressions"], counts["with a click"], counts["with AUC"]) == (30, 20, 20)
