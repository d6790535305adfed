"""Validation-only fine-tuning of the text tower at a fixed number of steps (no test data read).

    python bench/text_val.py bert_ranker --steps 600 text.user_tower=sequence
    python bench/text_val.py scientific --steps 600 text.user_tower=sequence text.sequence.layers=2
    python bench/text_val.py bert_ranker --steps 600 split=global_time
    python bench/text_val.py scientific --steps 2000 text.callbacks.early_stopping.patience=100 \
        'text.module.interpolation=[0.5]'     # one point of the line from the zero-shot start

Runs the job's data loading, split and ``fine_tune`` (step-0 competition, best checkpoint by
validation NDCG@10, the job's early stopping) with a step cap instead of the time budget, so that
settings are compared at equal steps on a shared machine; steps per second are printed apart.
Prints one ``RESULT`` line: zero-shot and best validation NDCG@10, the long-tail NDCG@10 at the
best validation, steps, steps/s and the validation curve (step, NDCG@10, long-tail NDCG@10).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from recsys.errors import run_script

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="embedding-cache folder (default: the config's)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    torch.set_num_threads(a.threads)
    import recsys.config  # noqa: F401  (registers the config resolvers)
    from recsys.data import listing_times
    from recsys.recommender import History
    from recsys.text.fit import fine_tune
    from recsys.text.options import check_options

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={a.experiment}", f"paths.root_dir={ROOT}", *a.overrides])
    check_options(None, cfg.text.data, cfg.text.module, cfg.text.net, served=False)
    L.seed_everything(cfg.seed, verbose=False)
    data = instantiate(cfg.data).load()
    split = instantiate(cfg.split).split(data.interactions)
    enc = instantiate(cfg.encoder)
    if a.cache:
        enc.embedding_cache.directory = Path(a.cache)
    ids, lens = enc.tokenize(data.texts)
    net = instantiate(cfg.text.net)(enc)
    listed = listing_times(data.items)  # as the job reads them
    dm = instantiate(cfg.text.data)(
        item_ids=ids,
        item_lengths=lens,
        train=History(split.train, data.n_users, data.n_items),
        val=split.val,
        available_from=listed,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ck = ModelCheckpoint(dirpath=tmp, filename="best", monitor="val/ndcg_at_10", mode="max", save_weights_only=True)
        es = EarlyStopping(monitor="val/ndcg_at_10", mode="max", patience=cfg.text.callbacks.early_stopping.patience)
        tr = L.Trainer(
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            max_epochs=-1,
            max_steps=a.steps,
            deterministic=True,
            num_sanity_val_steps=0,
            callbacks=[ck, es],
            gradient_clip_val=cfg.trainer.gradient_clip_val,
        )
        t = time.perf_counter()
        _, m, curve = fine_tune(net, dm, instantiate(cfg.text.module), tr)
        secs = time.perf_counter() - t
    best = max(curve, key=lambda c: c[1])
    out = {
        "zero": round(m["text/val_ndcg_at_10_zeroshot"], 4),
        "best": round(best[1], 4),
        "ratio": round(best[1] / max(m["text/val_ndcg_at_10_zeroshot"], 1e-12), 3),
        "tail_zero": round(curve[0][2], 4),
        "tail_at_best": round(best[2], 4),
        "best_step": best[0],
        "steps": int(m["text/steps"]),
        "steps_per_s": round(m["text/steps"] / secs, 2),
        "kept_zeroshot": int(m["text/kept_zeroshot"]),
        "interpolation": m["text/interpolation"],  # the kept point between the start and the trained weights
    }
    curve_s = [(s, round(v, 4), round(tl, 4)) for s, v, tl in curve if not np.isnan(v)]
    print("RESULT", a.experiment, " ".join(a.overrides), json.dumps(out), "curve", curve_s, flush=True)


if __name__ == "__main__":
    sys.exit(run_script(main))
