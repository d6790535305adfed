"""Choose an experiment's tuned settings on its validation stage only (the test split is never read).

    python bench/tune.py --experiment scientific              # ~6 min on 2 cores
    python bench/tune.py --experiment bert_ranker --decays 0.15 0.5

Two sweeps that share their expensive parts (one catalogue encoding, one CF fit), which is why
this is a script and not a Hydra multirun of full training jobs (14 min each on Scientific):

1. ``text.recency_decay``: NDCG@10 on the validation targets of the zero-shot text tower (the
   start of fine-tuning) for each decay, history = train, seen items removed.
2. the ranker's tree size: the fusion ranker is fitted on the validation candidates for each
   setting; the score is NDCG@10 on the users LightGBM holds back for early stopping.

Prints one markdown table per sweep; copy the winners into ``conf/experiment/<name>.yaml``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import recsys.config  # noqa: F401  (resolvers)
from recsys.columns import Columns
from recsys.errors import run_script
from recsys.evaluation.metrics import ranking_metrics
from recsys.pipeline import FusionStage, HybridPipeline, relevance_matrix, stage_exclusion
from recsys.rank.features import feature_columns
from recsys.recommender import History, NewItemText
from recsys.text.encoder import TwoTower
from recsys.text.recommender import TextRecommender

CONF = Path(__file__).resolve().parents[1] / "conf"
TREES = [(31, 100), (15, 50), (63, 200)]  # (num_leaves, min_child_samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="scientific")
    ap.add_argument("--decays", nargs="+", type=float, default=[0.15, 0.3, 0.5, 0.8])
    ap.add_argument("--overrides", nargs="*", default=[])
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={args.experiment}", *args.overrides])
    data = instantiate(cfg.data).load()
    split = instantiate(cfg.split).split(data.interactions)
    history = History(split.train, data.n_users, data.n_items)
    users = split.val[Columns.UserIdx].unique().sort().to_numpy()
    relevant = relevance_matrix(split.val, users, data.n_items)
    exclude = stage_exclusion(history, data.items, split.val)

    t0 = time.perf_counter()
    encoder = instantiate(cfg.encoder)
    catalogue = encoder.encode(list(data.texts), progress=True)
    print(
        f"\n### {args.experiment}: validation stage, {len(users)} users (catalogue encoded in "
        f"{time.perf_counter() - t0:.0f} s)\n"
    )
    print("| text.recency_decay | zero-shot val NDCG@10 | val Recall@10 |\n|---|---|---|")
    texts, ndcg = {}, {}
    for decay in args.decays:
        net = TwoTower(encoder, cfg.text.max_history, recency_decay=decay).eval()
        texts[decay] = TextRecommender(net, catalogue).fit(history)
        items, _ = texts[decay].recommend(users, 10, exclude=exclude)
        m = ranking_metrics(items, relevant, (10,))
        ndcg[decay] = float(m["ndcg_at_10"].mean())
        print(f"| {decay} | {ndcg[decay]:.4f} | {m['recall_at_10'].mean():.4f} |")
    best = max(ndcg, key=ndcg.get)

    cf = HybridPipeline({name: instantiate(node) for name, node in cfg.cf.items()}, None).fit_cf(
        history, item_text=texts[best].item_space()
    )
    models = {**cf, "text": texts[best], "text_new": NewItemText(texts[best]).fit(history)}
    # One candidate frame for every tree setting: only the ranker changes.
    frame = FusionStage(dict(cfg.rank.n_candidates), None).labelled_frame(users, models, history, split.val, exclude)
    print(
        f"\nRanker on the validation candidates (text.recency_decay={best}; score = NDCG@10 of the "
        "users held back for early stopping):\n"
    )
    print("| num_leaves | min_child_samples | held-out val NDCG@10 | trees |\n|---|---|---|---|")
    for leaves, min_child in TREES:
        ranker = instantiate(cfg.ranker, num_leaves=leaves, min_child_samples=min_child, refit_full=False)
        ranker.fit(frame, feature_columns(frame))
        score = float(ranker.booster.best_score["valid_0"]["ndcg@10"])
        print(f"| {leaves} | {min_child} | {score:.4f} | {ranker.best_iteration} |")
    print(f"\nwall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    run_script(main)
