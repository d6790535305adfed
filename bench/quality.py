"""Quality benchmark: every model on the real data sets, beside the published numbers.

    python bench/quality.py                      # scientific + ml100k (about 20-30 min on 2 cores)
    python bench/quality.py --experiments scientific --overrides trainer.max_epochs=2

Each experiment is one real `recsys.train` run (logged to MLflow like any other); this script
only composes them and prints one markdown table per data set and protocol.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import recsys.config  # noqa: F401  (resolvers)
from recsys.errors import run_script
from recsys.train import run

CONF = Path(__file__).resolve().parents[1] / "conf"
PUBLISHED = {
    "scientific": "VQ-Rec (RUCAIBox/VQ-Rec README), published protocol: Recall@10 0.1211, NDCG@10 0.0643",
    "ml100k": "RecBole BPR (RecBole README), random 8:1:1, full ranking: Recall@10 0.2368, NDCG@10 0.2768",
}
MODELS = ["popularity", "als", "bpr", "itemknn", "text_zeroshot", "text", "fused"]
COLUMNS = ["recall_at_10", "recall_at_20", "ndcg_at_10", "ndcg_at_20", "mrr"]


def table(metrics: dict[str, float], prefix: str) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for m in MODELS:
        if f"{prefix}/{m}/ndcg_at_10" in metrics:
            vals = " | ".join(f"{metrics[f'{prefix}/{m}/{c}']:.4f}" for c in COLUMNS)
            lines.append(f"| {m} | {vals} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", nargs="+", default=["scientific", "ml100k"])
    ap.add_argument("--overrides", nargs="*", default=[])
    args = ap.parse_args()
    for exp in args.experiments:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"+experiment={exp}", *args.overrides], return_hydra_config=False)
        t0 = time.perf_counter()
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(cfg.paths.root_dir) / "outputs" / f"bench-{exp}-{int(time.time())}")
        metrics = run(cfg)
        wall = time.perf_counter() - t0
        print(f"\n### {exp} (wall {wall:.0f} s, overrides {args.overrides})\n")
        print("Practical protocol (full ranking, history items removed):\n")
        print(table(metrics, "test"))
        if any(k.startswith("test_published/") for k in metrics):
            print("\nPublished protocol (full ranking, history items not removed by the evaluator):\n")
            print(table(metrics, "test_published"))
        if exp in PUBLISHED:
            print(f"\nPublished: {PUBLISHED[exp]}")
        times = {k: round(v, 1) for k, v in metrics.items() if k.startswith("time/")}
        print(f"\nTimings (s): {times}")


if __name__ == "__main__":
    run_script(main)
