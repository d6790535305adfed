"""``python -m recsys.train +experiment=bert_ranker``: the whole hybrid recommender, one MLflow run.

data -> split -> CF (implicit) -> fine-tuned BERT text tower -> fused LambdaMART ranker ->
evaluation on test -> exported recommendations, all logged to MLflow under ``mlruns/``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import recsys.config  # noqa: E402  (registers resolvers; CONFIG_DIR)
from recsys.errors import ConfigError, exit_on_user_error  # noqa: E402

log = logging.getLogger("recsys.train")


def run(cfg: DictConfig) -> dict[str, float]:
    """Run the job described by ``cfg``; returns the metrics logged to MLflow (test and validation)."""
    check_objective(cfg.get("optimized_metric"))
    import lightning as L
    import polars as pl
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import MLFlowLogger

    from recsys.columns import Columns
    from recsys.evaluation.sampling import ci95_half_width, sample_test_users
    from recsys.export.writer import recommendations_frame, write_parquet_atomic, write_text_atomic
    from recsys.pipeline import (
        FusionStage,
        HybridPipeline,
        check_split,
        stage_exclusion,
        stage_history,
        stage_users,
    )
    from recsys.profiling import StageTimings, check_memory
    from recsys.recommender import History
    from recsys.text.fit import fine_tune, open_resume_dir, zero_shot_copy
    from recsys.text.options import budget, check_options
    from recsys.text.recommender import NewItemText, TextRecommender
    from recsys.tracking import mask_secrets

    t_start = time.perf_counter()
    timings = StageTimings()  # seconds and peak memory per stage (time/*, mem/*)
    L.seed_everything(cfg.seed, workers=True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # --- everything that can fail on bad input fails here, before any training -------------
    t0 = time.perf_counter()
    text_budget = budget(cfg.text.get("budget_minutes"))
    check_options(cfg.text.get("budget_minutes"), cfg.text.data, cfg.text.module, cfg.text.net)
    source = instantiate(cfg.data)
    data = source.load()
    split = instantiate(cfg.split).split(data.interactions)
    val_users, test_users = check_split(data, split)
    encoder = instantiate(cfg.encoder)
    cf = {name: instantiate(node) for name, node in cfg.cf.items()}
    fusion = FusionStage(
        dict(cfg.rank.n_candidates), instantiate(cfg.ranker), cfg.rank.get("max_train_users"), seed=cfg.seed
    )
    # eval.max_users: past that many test users, every model is evaluated on a seeded sample.
    eval_split, eval_users, all_test_users = sample_test_users(split, cfg.eval.get("max_users"), cfg.seed)
    test_users = stage_users(eval_split.test, "test")
    ranker_users = min(len(val_users), fusion.max_train_users or len(val_users))
    need_gb = check_memory(
        data.interactions.height,
        data.n_items,
        ranker_users,
        len(test_users),
        sum(cfg.rank.n_candidates.values()),
        cfg.get("memory_limit_gb"),
    )
    pipeline = HybridPipeline(cf, fusion, ks=list(cfg.eval.ks), max_k=cfg.eval.max_k)
    tracker = instantiate(cfg.logger)
    timings["load"] = time.perf_counter() - t0
    for name, k in (("export.k", cfg.export.k), ("eval.max_k", cfg.eval.max_k)):
        if k > data.n_items:
            log.warning("%s=%d is larger than the catalogue (%d items): lists will be shorter", name, k, data.n_items)
    log.info(
        "data %s: %d users, %d items, %d events; %s",
        data.name,
        data.n_users,
        data.n_items,
        data.interactions.height,
        split.describe(),
    )

    with tracker.start() as run_id:
        tracker.log_params(OmegaConf.to_container(cfg, resolve=True))
        digest = data.fingerprint()
        tracker.set_tags({"dataset": data.name, "dataset_hash": digest})
        # The data as the run's input: name, hash, where it came from, row counts per split.
        origin = next((str(cfg.data[k]) for k in ("interactions", "root", "directory") if cfg.data.get(k)), ".")
        counts = {"users": data.n_users, "items": data.n_items, "events": data.interactions.height}
        tracker.log_dataset(
            data.interactions.select(Columns.User, Columns.Item, Columns.Timestamp, Columns.Event),
            data.name,
            digest,
            origin,
            {**counts, **split.describe()},
        )
        tracker.log_metrics({f"data/{k}": v for k, v in split.describe().items()})
        # What the loader's repair policies did (items_without_text_kept, duplicates_dropped:<file> ...).
        repairs = {f"data/{re.sub(r'[^a-zA-Z0-9_/. -]', '_', k)}": v for k, v in getattr(source, "report", {}).items()}
        tracker.log_metrics(repairs)
        # Secrets are masked in every copy of the config: params, this file, the saved model.
        config_yaml = OmegaConf.to_yaml(OmegaConf.create(mask_secrets(OmegaConf.to_container(cfg, resolve=True))))
        config_path = write_text_atomic(config_yaml, out_dir / "config.yaml")
        tracker.log_artifact(config_path)

        # --- validation stage: fit on train -------------------------------------------------
        as_of = bool(cfg.eval.get("as_of_cut", True))
        hist_val = History(split.train, data.n_users, data.n_items)
        hist_val = stage_history(hist_val, split.val) if as_of else hist_val
        t0 = time.perf_counter()
        cf_val = pipeline.fit_cf(hist_val)
        timings["cf_fit_val"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        item_ids, item_lengths = encoder.tokenize(data.texts)
        net = instantiate(cfg.text.net)(encoder)
        # rank.text_zeroshot_feature: the untouched tower is a ranker feature too, beside the tuned one.
        zs_feature = bool(cfg.rank.get("text_zeroshot_feature", False))
        zero_net = zero_shot_copy(net) if cfg.eval.zeroshot or zs_feature else None
        listed = (
            data.items[Columns.AvailableFrom].cast(pl.Float64).fill_null(float("nan")).to_numpy()
            if Columns.AvailableFrom in data.items.columns
            else None
        )
        datamodule = instantiate(cfg.text.data)(
            item_ids=item_ids, item_lengths=item_lengths, train=hist_val, val=split.val, available_from=listed
        )
        # Checkpoints live in a folder named by the config and data, so the same command resumes.
        resume = open_resume_dir(
            cfg.text.resume_root if cfg.text.get("resume", False) else None,
            OmegaConf.to_container(cfg, resolve=True),
            [cfg.paths.output_dir, cfg.paths.mlruns_dir],
            data.fingerprint(),
        )
        ckpt_dir = str(resume.path or out_dir / "checkpoints")
        callbacks = [
            instantiate(c, **({"dirpath": ckpt_dir} if "dirpath" in c else {})) for c in cfg.text.callbacks.values()
        ]
        logger = MLFlowLogger(experiment_name=tracker.experiment, tracking_uri=tracker.uri, run_id=run_id)
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, max_time=text_budget)
        net, text_val, text_curve = fine_tune(net, datamodule, instantiate(cfg.text.module), trainer, resume.path)
        tracker.log_metrics(text_val)
        timings["text_finetune"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        text = TextRecommender.from_tokens(net, item_ids, item_lengths)
        models_val = {**cf_val, "text": text.fit(hist_val), "text_new": NewItemText(text).fit(hist_val)}
        zero_text = TextRecommender.from_tokens(zero_net, item_ids, item_lengths) if zero_net is not None else None
        if zs_feature:
            models_val["text_zeroshot"] = zero_text.fit(hist_val)
        timings["text_encode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fusion.fit(val_users, models_val, hist_val, split.val, stage_exclusion(hist_val, data.items, split.val))
        timings["ranker_fit"] = time.perf_counter() - t0

        # --- test stage: refit CF on train + val, score the untouched test events ------------
        t0 = time.perf_counter()
        hist_test = hist_val.extend(split.val)
        hist_test = stage_history(hist_test, split.test) if as_of else hist_test
        cf_test = pipeline.fit_cf(hist_test)
        timings["cf_fit_test"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        text.fit(hist_test)
        models_test = {**cf_test, "text": text, "text_new": NewItemText(text).fit(hist_test)}
        if zero_text is not None:
            zero_text.fit(hist_test)
            if zs_feature:
                models_test["text_zeroshot"] = zero_text
        exclude_test = stage_exclusion(hist_test, data.items, eval_split.test)
        fused = fusion.recommend(test_users, models_test, hist_test, cfg.eval.max_k, exclude_test)
        timings["test_rank"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        singles = {name: m for name, m in models_test.items() if m.is_feature}
        if zero_text is not None:
            singles["text_zeroshot"] = zero_text
        targets = eval_split.test
        result = pipeline.evaluate(test_users, targets, data.n_items, singles, hist_test, fused, True, exclude_test)
        tables = {"test": result.table}
        if cfg.eval.published:
            published = pipeline.evaluate(test_users, targets, data.n_items, singles, hist_test, fused, False)
            tables["test_published"] = published.table
        imp_scores = None
        if data.impressions is not None:
            from recsys.evaluation.impressions import impression_metrics, stage_impressions, summarize
            from recsys.pipeline import impression_scores

            imps, imp_counts = stage_impressions(data.impressions, eval_split.test, hist_test.interactions)
            log.info("test-stage impressions: %s", imp_counts)
            tracker.log_metrics({f"data/impressions_{k}": v for k, v in imp_counts.items()})
            if imps.height:
                imp_scores = impression_scores(imps, singles, fusion, models_test, hist_test, exclude_test)
                for name, part in imp_scores.partition_by("model", as_dict=True).items():
                    summary = summarize(impression_metrics(part, ks=(5, 10)))
                    tracker.log_metrics({f"test_impressions/{name[0]}/{k}": v for k, v in summary.items()})
        timings["evaluate"] = time.perf_counter() - t0

        table = result.table
        metrics = {
            f"{prefix}/{row['model']}/{c}": row[c]
            for prefix, tab in tables.items()
            for row in tab.iter_rows(named=True)
            for c in tab.columns[1:]
        }
        metrics["rank/candidate_recall_val"] = fusion.candidate_recall_val
        metrics["rank/train_users"] = fusion.train_users
        metrics["mem/estimated_peak_mb"] = need_gb * 1000
        metrics["eval/users"], metrics["eval/users_total"] = eval_users, all_test_users
        if eval_users < all_test_users:
            first = f"ndcg_at_{cfg.eval.ks[0]}"
            for name, per_user in result.metrics.items():
                metrics[f"test/{name}/{first}_ci95"] = ci95_half_width(per_user[first], all_test_users)
            log.warning(
                "evaluated on a sample of %d of %d test users (eval.max_users); test/*/%s_ci95 is the "
                "sampling error's 95%% half-width; recommendations.parquet holds the sampled users "
                "(python -m recsys.recommend exports everyone)",
                eval_users,
                all_test_users,
                first,
            )
        metrics["rank/best_iteration"] = fusion.ranker.best_iteration
        if fusion.ranker.stop_score is not None:
            metrics["rank/val_ndcg_heldout"] = fusion.ranker.stop_score
        tracker.log_metrics(metrics)
        table_path = out_dir / "metrics.csv"
        table_all = pl.concat([tab.with_columns(pl.lit(p).alias("protocol")) for p, tab in tables.items()])
        write_text_atomic(table_all.write_csv(), table_path)
        tracker.log_artifact(table_path)
        imp_path = out_dir / "feature_importance.csv"
        write_text_atomic(fusion.ranker.feature_importance().write_csv(), imp_path)
        tracker.log_artifact(imp_path)
        t0 = time.perf_counter()
        finetuning = {**text_val, "curve": text_curve, "budget_minutes": cfg.text.get("budget_minutes")}
        save_evaluation(
            cfg, data, eval_split, run_id, tracker, result, hist_test, text, fusion, out_dir, imp_scores, finetuning
        )
        timings["evaluation_report"] = time.perf_counter() - t0

        # --- export: fused top-K for every test user, seen items removed ---------------------
        t0 = time.perf_counter()
        k = cfg.export.k
        recs = recommendations_frame(
            data, test_users, result.recommended["fused"][:, :k], result.scores["fused"][:, :k], result.sources[:, :k]
        )
        rec_path = write_parquet_atomic(recs, out_dir / "recommendations.parquet")
        tracker.log_artifact(rec_path)
        timings["export"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model_uri = deploy_stage(cfg, data, pipeline, fusion, hist_test, split.test, models_test, out_dir)
        timings["model_save"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        # Parts of the ranker stages, summed over both (no memory window of their own).
        parts = {f"time/fusion_{k}_s": v for k, v in fusion.timings.items()}
        metrics.update({**timings.metrics(), **parts})
        metrics.update(text_val)  # logged after fine-tuning; returned for optimized_metric
        tracker.log_metrics({**timings.metrics(), **parts})

        with pl.Config(tbl_rows=20, tbl_cols=20, float_precision=4, tbl_hide_dataframe_shape=True):
            print(f"\nTest metrics ({data.name}, {len(test_users)} users, full ranking, seen items removed):")
            print(table)
            if "test_published" in tables:
                print("Published protocol (full ranking, history items NOT removed by the evaluator):")
                print(tables["test_published"])
        print(f"MLflow run {run_id}; model {model_uri}; recommendations: {rec_path}; total {timings['total']:.0f}s")
        resume.finish(keep_best_in=out_dir / "checkpoints")  # done: a rerun of this command starts afresh
    return metrics


def deploy_stage(cfg, data, pipeline, fusion, hist_test, test_events, models_test, out_dir: Path) -> str:
    """Register what is served; returns its model URI.

    With ``model.refit_all`` (default) the served pipeline learns from every event, the test
    events included: CF refitted, histories and item statistics extended, the text towers'
    weights and the ranker as evaluated. The evaluated test-stage pipeline is logged beside it as
    ``model_evaluated`` (not registered), for the record. Without it, the evaluated pipeline is
    the served one.
    """
    from recsys.export.pyfunc import log_trained_pipeline

    node = cfg.get("model") or {}
    if not node.get("refit_all", True):
        return log_trained_pipeline(cfg, data, hist_test, models_test, fusion, out_dir)
    log_trained_pipeline(
        cfg, data, hist_test, models_test, fusion, out_dir, name="model_evaluated", folder="pipeline_evaluated"
    )
    hist_all = hist_test.extend(test_events)
    models_all = refit_models(pipeline, hist_all, models_test)
    log.info("deploy: refitted on all %d events", hist_all.interactions.height)
    return log_trained_pipeline(cfg, data, hist_all, models_all, fusion, out_dir)


def refit_models(pipeline, history, models: dict) -> dict:
    """``models`` for ``history``: CF refitted, the text towers (weights kept) reading it, in the
    same order (the ranker's features follow it)."""
    from recsys.text.recommender import NewItemText, TextRecommender

    cf = pipeline.fit_cf(history)
    out = {}
    for name, m in models.items():
        if name in cf:
            out[name] = cf[name]
        elif isinstance(m, TextRecommender):
            out[name] = TextRecommender(m.net, m.item_embeddings).fit(history)
    for name, m in models.items():
        if isinstance(m, NewItemText):
            tower = next(k for k, v in models.items() if v is m.text)
            out[name] = NewItemText(out[tower], m.max_events).fit(history)
    return {name: out[name] for name in models}


def feature_time(history, as_of_cut: bool) -> str:
    """The protocol card's line on when time-dependent features were taken."""
    if history.user_now is not None:
        return "as of each user's cut: just before their first held-out event (per-user split)"
    if as_of_cut:
        return "as of the stage's end: one cut for everybody, every held-out event after it"
    return (
        "as of the stage's end (eval.as_of_cut=false): under a per-user split, time-dependent "
        "features count other users' events from after a user's held-out one"
    )


def save_evaluation(
    cfg,
    data,
    split,
    run_id,
    tracker,
    result,
    hist_test,
    text,
    fusion,
    out_dir: Path,
    impression_scores=None,
    finetuning=None,
) -> None:
    """The evaluation bundle (``evaluation/``) and, with ``eval.report``, the report (``report/``),
    both logged to the run; ``python -m recsys.evaluate`` rebuilds the report from the bundle alone."""
    from hydra.utils import instantiate

    from recsys.columns import Columns
    from recsys.evaluation.bundle import BUNDLE_DIR, make_protocol, read_bundle, write_bundle

    protocol = make_protocol(
        run_id=run_id,
        experiment=tracker.experiment,
        data_name=data.name,
        data_hash=data.fingerprint(),
        n_users=data.n_users,
        n_items=data.n_items,
        split=OmegaConf.to_container(cfg.split, resolve=True),
        split_counts=split.describe(),
        seen_filtering=True,
        availability_filtering=Columns.AvailableFrom in data.items.columns
        and data.items[Columns.AvailableFrom].null_count() < data.items.height,
        ks=list(cfg.eval.ks),
        max_k=cfg.eval.max_k,
        seed=cfg.seed,
        targets=split.test,
        models=list(result.recommended),
        root=cfg.paths.root_dir,
        feature_time=feature_time(hist_test, bool(cfg.eval.get("as_of_cut", True))),
    )
    folder = out_dir / BUNDLE_DIR
    files = write_bundle(
        folder,
        protocol=protocol,
        users=result.users,
        recommended=result.recommended,
        scores=result.scores,
        sources=result.sources,
        targets=split.test,
        history=hist_test.interactions,
        n_items=data.n_items,
        item_embeddings=text.item_embeddings.numpy(),
        feature_importance=fusion.ranker.feature_importance(),
        impression_scores=impression_scores,
        finetuning=finetuning,
    )
    for f in files:
        tracker.log_artifact(f, BUNDLE_DIR)
    if cfg.eval.report:
        # Read back from disk: the report at the end of training is exactly the one the CLI makes.
        report_dir = out_dir / "report"
        for f in instantiate(cfg.eval.reporter).write(read_bundle(folder, run_id), report_dir):
            tracker.log_artifact(f, str(Path("report") / f.parent.relative_to(report_dir)))
            if f.suffix == ".png":  # the report's plots, also as images beside the run's charts
                tracker.log_image(f, key=f"report/{f.stem}")
        log.info("evaluation report: %s", out_dir / "report" / "report.html")


# What ``optimized_metric`` may name: validation scores only, so a sweep never chooses on test.
VALIDATION_OBJECTIVES = (
    "rank/val_ndcg_heldout",  # the ranker's NDCG@eval_at on the validation users held back for early stopping
    "rank/candidate_recall_val",  # share of validation targets among the candidates
    "text/val_ndcg_at_10_finetuned",  # the fine-tuned text tower, full-catalogue NDCG@10 on validation
    "text/val_ndcg_at_10_zeroshot",
)


def check_objective(name: str | None) -> None:
    if name is not None and name not in VALIDATION_OBJECTIVES:
        raise ConfigError(
            f"optimized_metric={name!r} is not a validation metric; choose one of {list(VALIDATION_OBJECTIVES)}"
        )


@hydra.main(config_path=recsys.config.CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Train; returns the validation metric named by ``optimized_metric`` (what a sweeper maximises)."""
    from recsys.tracking import save_hydra_files

    save_hydra_files(cfg)
    metrics = exit_on_user_error(lambda: run(cfg))
    name = cfg.get("optimized_metric")
    return float(metrics[name]) if name is not None else None


if __name__ == "__main__":
    main()
