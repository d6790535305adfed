"""SASRec over items its network never saw: placed by their text, or at the mean item vector.

    python bench/sasrec_new_items.py --run outputs/<date>/     # Amazon-Scientific, ~2 min on 2 cores

An update that keeps SASRec's network (``cf_mode=fold_in``, or a warm refit's start) grows its
catalogue with ``SASRec.with_items``. This holds out a seeded share of the catalogue as the new
items: the model (the experiment's settings, started from the run's fine-tuned tower as the
preset's is) is fitted on the training split without their events, then grown by them, once at the
mean item vector and once per ridge penalty of the text projection. Each is scored on the
validation targets (full ranking, seen items removed), the users read from their whole training
history, new items included, as an update serves them. The test split is never read. Prints
NDCG@10 / Recall@10 over all users and over the users whose target is a new item, and each
projection's paired difference from the mean vector.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl
from hydra.utils import instantiate
from sasrec import load_stage  # bench/sasrec.py: this script runs from bench/

from recsys.columns import Columns
from recsys.errors import run_script
from recsys.evaluation.bootstrap import PairedBootstrap
from recsys.evaluation.metrics import ranking_metrics
from recsys.pipeline import relevance_matrix, stage_exclusion
from recsys.pipeline_model import TrainedPipeline
from recsys.recommender import History


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished run's output folder: its fine-tuned text tower")
    ap.add_argument("--experiment", default="scientific")
    ap.add_argument("--model", default="sasrec", help="the SASRec entry of the experiment's cf config")
    ap.add_argument("--share", type=float, default=0.05, help="share of the catalogue held out as new items")
    ap.add_argument("--ridges", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0])
    ap.add_argument("--seed", type=int, default=0, help="of the held-out items and of the fit")
    ap.add_argument("--overrides", nargs="*", default=[])
    args = ap.parse_args()
    if not 0 < args.share < 1:
        raise SystemExit(f"--share must lie between 0 and 1, got {args.share}")
    cfg, data, split = load_stage(args.experiment, args.model, args.overrides)
    pipeline = TrainedPipeline.load(Path(args.run) / "pipeline")
    text = pipeline.models[pipeline.text_name].item_space()

    # The held-out items take the last indices, as an update appends new items to the catalogue.
    n = data.n_items
    rng = np.random.default_rng(args.seed)
    new = np.zeros(n, dtype=bool)
    new[rng.choice(n, int(args.share * n), replace=False)] = True
    order = np.concatenate([np.flatnonzero(~new), np.flatnonzero(new)])  # new index -> data's index
    index = np.empty(n, dtype=np.int64)
    index[order] = np.arange(n)
    known = int((~new).sum())

    def renumbered(df: pl.DataFrame) -> pl.DataFrame:
        col = df[Columns.ItemIdx]
        return df.with_columns(pl.Series(Columns.ItemIdx, index[col.to_numpy()]).cast(col.dtype))

    train, val, items = renumbered(split.train), renumbered(split.val), renumbered(data.items)
    text = text[order]
    before = History(train.filter(pl.col(Columns.ItemIdx) < known), data.n_users, known)
    served = History(train, data.n_users, n)
    users = val[Columns.UserIdx].unique().sort().to_numpy()
    exclude = stage_exclusion(served, items.sort(Columns.ItemIdx), val)
    relevant = relevance_matrix(val, users, n)
    targets_new = (
        val.group_by(Columns.UserIdx)
        .agg((pl.col(Columns.ItemIdx) >= known).any().alias("new"))
        .sort(Columns.UserIdx)["new"]
        .to_numpy()
    )
    print(
        f"\n### {args.experiment}: cf.{args.model}, {n - known:,} of {n:,} items held out as new "
        f"({before.interactions.height:,} of {train.height:,} training events kept); "
        f"{targets_new.sum():,} of {len(users):,} validation users' targets are new items\n"
    )
    node = cfg.cf[args.model]
    model = instantiate(node, seed=args.seed, progress=False)
    t0 = time.perf_counter()
    model.fit(before, item_text=text[:known] if model.reads_item_text else None)
    print(f"fit {time.perf_counter() - t0:.0f} s\n")
    print(
        "| new items at | val NDCG@10 | val Recall@10 | NDCG@10, new-item targets | Recall@10, new-item targets "
        "| NDCG@10 minus the mean vector (paired 95 % CI) |"
    )
    print("|---|---|---|---|---|---|")
    boot = PairedBootstrap(len(users), seed=0)
    reference = None
    for ridge in [None, *args.ridges]:
        grown = model.with_items(n) if ridge is None else model.with_items(n, text, ridge=ridge)
        top = grown.for_users(served, np.arange(data.n_users)).recommend(users, 10, exclude=exclude)[0]
        m = ranking_metrics(top, relevant, (10,))
        ndcg, recall = m["ndcg_at_10"], m["recall_at_10"]
        if reference is None:
            reference, versus = ndcg, ""
        else:
            ci = boot.interval(ndcg, reference)
            versus = f"{ci.mean:+.4f} ({ci.low:+.4f}..{ci.high:+.4f})"
        name = "the mean item vector" if ridge is None else f"text projection, ridge {ridge:g}"
        print(
            f"| {name} | {ndcg.mean():.4f} | {recall.mean():.4f} | {ndcg[targets_new].mean():.4f} "
            f"| {recall[targets_new].mean():.4f} | {versus} |",
            flush=True,
        )


if __name__ == "__main__":
    run_script(main)
