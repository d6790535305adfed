"""SASRec's fit: length-bucketed batches against random ones, time and validation NDCG@10.

    python bench/sasrec.py                                    # Amazon-Scientific, ~3 min on 2 cores
    python bench/sasrec.py --run outputs/<date>/ --seeds 0 1 2   # started from that run's text tower

Fits ``recsys.cf.SASRec`` (the ``+experiment=scientific`` settings) on the validation stage's
history, once with ``length_buckets`` and once without, alternating which goes first for each
seed so that neither always meets a warmer machine, and scores both on the validation targets
(full ranking, seen items removed, as the job's validation stage). The test split is never read.
With ``--run``, the embeddings start from that run's fine-tuned text tower, as the preset's do.
Prints one row per fit and the time ratio measured within each seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import recsys.config  # noqa: F401  (resolvers)
from recsys.columns import Columns
from recsys.errors import run_script
from recsys.evaluation.metrics import ranking_metrics
from recsys.pipeline import relevance_matrix, stage_exclusion
from recsys.recommender import History

CONF = Path(__file__).resolve().parents[1] / "conf"


def load_stage(experiment: str, model: str, overrides: list[str]):
    """The experiment's config (which must hold ``cf.<model>``), data and split, as the job reads
    them; ``bench/sasrec_new_items.py`` starts here too."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}", *overrides])
    if model not in cfg.cf:
        raise SystemExit(f"--model: the experiment has no cf.{model}; it has {', '.join(cfg.cf)}")
    data = instantiate(cfg.data).load()
    return cfg, data, instantiate(cfg.split).split(data.interactions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="scientific")
    ap.add_argument("--model", default="sasrec", help="the SASRec entry of the experiment's cf config")
    ap.add_argument("--run", default=None, help="a finished run's output folder: start from its text tower")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--overrides", nargs="*", default=[])
    args = ap.parse_args()
    cfg, data, split = load_stage(args.experiment, args.model, args.overrides)
    history = History(split.train, data.n_users, data.n_items)
    users = split.val[Columns.UserIdx].unique().sort().to_numpy()
    exclude = stage_exclusion(history, data.items, split.val)
    relevant = relevance_matrix(split.val, users, data.n_items)
    text = None
    if args.run is not None:
        from recsys.pipeline_model import TrainedPipeline

        pipeline = TrainedPipeline.load(Path(args.run) / "pipeline")
        text = pipeline.models[pipeline.text_name].item_space()
    node = cfg.cf[args.model]
    if node.get("text_init_std") is not None and text is None:
        node.text_init_std = None
        print("(no --run: the embeddings start at random)")
    print(f"\n### {args.experiment}: cf.{args.model}, {len(history.interactions):,} training events\n")
    print("| seed | batches | fit s | val NDCG@10 | val Recall@10 |\n|---|---|---|---|---|")
    ratios = []
    for seed in args.seeds:
        order = (True, False) if seed % 2 == 0 else (False, True)
        took = {}
        for buckets in order:
            model = instantiate(node, seed=seed, length_buckets=buckets, progress=False)
            t0 = time.perf_counter()
            model.fit(history, item_text=text)
            took[buckets] = time.perf_counter() - t0
            m = ranking_metrics(model.recommend(users, 10, exclude=exclude)[0], relevant, (10,))
            name = "length buckets" if buckets else "random"
            ndcg, recall = m["ndcg_at_10"].mean(), m["recall_at_10"].mean()
            print(f"| {seed} | {name} | {took[buckets]:.0f} | {ndcg:.4f} | {recall:.4f} |", flush=True)
        ratios.append(took[False] / took[True])
    print(f"\nrandom / bucketed fit time: {', '.join(f'{r:.2f}x' for r in ratios)} (mean {np.mean(ratios):.2f}x)")


if __name__ == "__main__":
    run_script(main)
