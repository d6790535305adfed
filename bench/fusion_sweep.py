"""Fusion variants (ranker settings, candidate sources, text features) on the validation stage only.

    python bench/fusion_sweep.py --run outputs/<date>/  --experiment scientific

Reuses a finished run's text towers (its saved ``pipeline/``: fine-tuned item vectors, the zero-shot
tower when the run had ``rank.text_zeroshot_feature``) so that a variant costs a ranker fit, not a
fine-tuning. The CF models are refitted on the training split, exactly as the job's validation
stage does. The test split is never read: the validation users are cut in two seeded halves, the
ranker is fitted on one and scored (full-ranking NDCG@10 / Recall@10 over the catalogue, seen items
removed, candidate recall included) on the other, then the other way round, and the table reports
the mean over all validation users. Every variant is scored on the same users and the same folds.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import polars as pl
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import recsys.config  # noqa: F401  (resolvers)
from recsys.columns import Columns
from recsys.export.pipeline_model import PipelineHistories, TrainedPipeline
from recsys.pipeline import FusionStage, HybridPipeline, stage_exclusion
from recsys.rank.features import feature_columns
from recsys.recommender import History, Recommender
from recsys.text.recommender import NewItemText

CONF = Path(__file__).resolve().parents[1] / "conf"

LR02 = {"learning_rate": 0.02, "n_estimators": 1000, "early_stopping_rounds": 80}
# name -> (ranker overrides, extra candidate sources, drop the zero-shot feature)
VARIANTS: dict[str, tuple[dict, dict, bool]] = {
    "finetuned_only": ({}, {}, True),
    "both_towers": ({}, {}, False),
    "both_leaves7": ({"num_leaves": 7}, {}, False),
    "both_leaves31": ({"num_leaves": 31, "min_child_samples": 100}, {}, False),
    "both_lr02": (LR02, {}, False),
    "both_zs_source30": ({}, {"text_zeroshot": 30}, False),
    "both_zs_source50": ({}, {"text_zeroshot": 50}, False),
    "both_zs30_lr02": (LR02, {"text_zeroshot": 30}, False),
    "both_zs50_lr02": (LR02, {"text_zeroshot": 50}, False),
    "both_zs30_lr02_leaves7": ({**LR02, "num_leaves": 7}, {"text_zeroshot": 30}, False),
    "finetuned_only_lr02": (LR02, {}, True),
}


def text_models(pipeline: TrainedPipeline, history: History) -> dict[str, Recommender]:
    """The run's text towers (fine-tuned, and the further ones), scoring every user of ``history``."""
    n = history.n_users
    everyone = PipelineHistories([""] * n, np.full(n, -1), history)  # ids unused by text scorers
    return pipeline.scorers(everyone, only=[pipeline.text_name, *pipeline.history_towers])


def ndcg_recall(scored: pl.DataFrame, targets: pl.DataFrame, users: np.ndarray) -> tuple[float, float]:
    """Full-ranking NDCG@10 / Recall@10 of one held-out item per user from ranked candidates."""
    top = (
        scored.sort([Columns.UserIdx, Columns.Score, Columns.ItemIdx], descending=[False, True, False])
        .with_columns(pl.int_range(pl.len()).over(Columns.UserIdx).alias("pos"))
        .filter(pl.col("pos") < 10)
    )
    hit = top.join(
        targets.select(pl.col(Columns.UserIdx).cast(pl.Int32), pl.col(Columns.ItemIdx).cast(pl.Int32)),
        on=[Columns.UserIdx, Columns.ItemIdx],
    )
    gain = (1.0 / np.log2(hit["pos"].to_numpy() + 2.0)).sum()
    return float(gain / len(users)), float(hit[Columns.UserIdx].n_unique() / len(users))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="output folder of a finished training run (has pipeline/)")
    ap.add_argument("--experiment", default="scientific")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--overrides", nargs="*", default=[])
    ap.add_argument(
        "--extra-stage",
        action="store_true",
        help="also train each variant with a second labelled stage: history = train minus each user's "
        "last training event, target = that event (more labels for the ranker)",
    )
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={args.experiment}", *args.overrides])
    t0 = time.perf_counter()
    data = instantiate(cfg.data).load()
    split = instantiate(cfg.split).split(data.interactions)
    history = History(split.train, data.n_users, data.n_items)
    pipeline = TrainedPipeline.load(Path(args.run) / "pipeline")
    if not pipeline.history_towers:
        raise SystemExit("the run has no zero-shot tower: train it with rank.text_zeroshot_feature=true")
    cf = HybridPipeline({n: instantiate(node) for n, node in cfg.cf.items()}, None).fit_cf(history)
    texts = text_models(pipeline, history)
    text = texts[pipeline.text_name]
    models = {**cf, "text": text, "text_new": NewItemText(text).fit(history), **texts}
    exclude = stage_exclusion(history, data.items, split.val)
    users = split.val[Columns.UserIdx].unique().sort().to_numpy()
    rng = np.random.default_rng(cfg.seed)
    fold = rng.permutation(len(users)) % 2
    halves = [users[fold == 0], users[fold == 1]]
    labels = split.val.select(
        pl.col(Columns.UserIdx).cast(pl.Int32), pl.col(Columns.ItemIdx).cast(pl.Int32), pl.lit(1).alias("label")
    ).unique()
    extra: dict[tuple, pl.DataFrame] = {}
    if args.extra_stage:
        train = split.train.with_columns(pl.int_range(pl.len()).reverse().over(Columns.UserIdx).alias("_back"))
        earlier = train.filter(pl.col("_back") > 0).drop("_back")
        last = train.filter((pl.col("_back") == 0) & (pl.len().over(Columns.UserIdx) > 1)).drop("_back")
        h2 = History(earlier, data.n_users, data.n_items)
        cf2 = HybridPipeline({n: instantiate(node) for n, node in cfg.cf.items()}, None).fit_cf(h2)
        texts2 = text_models(pipeline, h2)
        models2 = {**cf2, "text": texts2["text"], "text_new": NewItemText(texts2["text"]).fit(h2), **texts2}
        users2 = last[Columns.UserIdx].unique().sort().to_numpy()
        labels2 = last.select(
            pl.col(Columns.UserIdx).cast(pl.Int32), pl.col(Columns.ItemIdx).cast(pl.Int32), pl.lit(1).alias("label")
        ).unique()
        stage2 = (models2, h2, stage_exclusion(h2, data.items, last), users2, labels2)
    print(f"setup {time.perf_counter() - t0:.0f} s; {len(users)} validation users in two halves\n")
    print("| variant | val NDCG@10 | val Recall@10 | candidate recall | ranker fit s |\n|---|---|---|---|---|")
    frames: dict[tuple, pl.DataFrame] = {}
    for name in args.variants.split(","):
        ranker_over, extra_sources, drop_zs = VARIANTS[name]
        n_cand = {**cfg.rank.n_candidates, **extra_sources}
        key = tuple(sorted(n_cand.items()))
        if key not in frames:
            frames[key] = FusionStage(n_cand, None).frame(users, models, history, exclude)
            frames[key] = (
                frames[key]
                .join(labels, on=[Columns.UserIdx, Columns.ItemIdx], how="left")
                .with_columns(pl.col("label").fill_null(0))
            )
        df = frames[key]
        if args.extra_stage and key not in extra:
            m2, h2, ex2, u2, l2 = stage2
            f2 = FusionStage(n_cand, None).frame(u2, m2, h2, ex2)
            f2 = f2.join(l2, on=[Columns.UserIdx, Columns.ItemIdx], how="left").with_columns(
                pl.col("label").fill_null(0)
            )
            # Its own query ids: the same user is another ranking problem in this stage.
            extra[key] = f2.with_columns((pl.col(Columns.UserIdx) + data.n_users).cast(pl.Int32))
        feats = [c for c in feature_columns(df) if not (drop_zs and c.startswith("score_text_zeroshot"))]
        gains, hits, fit_s = [], [], 0.0
        for a, b in ((0, 1), (1, 0)):
            ranker = copy.deepcopy(instantiate(cfg.ranker, **ranker_over))
            part = df.filter(pl.col(Columns.UserIdx).is_in(halves[a].tolist()))
            if args.extra_stage:
                part = pl.concat([part, extra[key].select(part.columns)])
            t1 = time.perf_counter()
            ranker.fit(part, feats)
            fit_s += time.perf_counter() - t1
            held = df.filter(pl.col(Columns.UserIdx).is_in(halves[b].tolist()))
            scored = held.select(Columns.UserIdx, Columns.ItemIdx, pl.Series(Columns.Score, ranker.predict(held)))
            g, h = ndcg_recall(scored, split.val, halves[b])
            gains.append(g * len(halves[b]))
            hits.append(h * len(halves[b]))
        recall = df.group_by(Columns.UserIdx).agg(pl.col("label").max())["label"].mean()
        print(
            f"| {name} | {sum(gains) / len(users):.4f} | {sum(hits) / len(users):.4f} | {recall:.3f} | {fit_s:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
