"""Time and peak memory of the evaluation bundle and report for many test users.

    python bench/report_memory.py                         # 300,000 users, 150,000 items (100x)
    python bench/report_memory.py --users 50000           # the 100x job's default sample

The job's last stages at 100x (``evaluation_report`` in ``bench/scale.py``) on their own, without
the hour of training before them: eight models' top-100 lists for ``--users`` users (random
items, falling scores; one held-out item each, history of 12 events each), written as the
evaluation bundle (``recsys.evaluation.bundle.write_bundle``) and read back into the report
(``Reporter().write``), as ``recsys.stages.save_evaluation`` does. Prints the seconds and the
peak resident memory (``VmHWM``, reset before each step) of the two steps, and the resident
memory held before them by the lists themselves. The figures do not depend on what the lists
say, only on their number and length.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from recsys.columns import Columns
from recsys.errors import run_script
from recsys.evaluation.bundle import make_protocol, read_bundle, write_bundle
from recsys.evaluation.report import Reporter
from recsys.profiling import peak_rss_mb, reset_peak_rss

MODELS = ["popularity", "recent_popularity", "als", "bpr", "itemknn", "text", "text_zeroshot", "fused"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=300_000)
    parser.add_argument("--items", type=int, default=150_000)
    parser.add_argument("--history", type=int, default=12, help="events per user in the history")
    args = parser.parse_args()
    n, n_items = args.users, args.items
    rng = np.random.default_rng(0)
    users = np.arange(n)
    lists = {m: rng.integers(0, n_items, (n, 100), dtype=np.int32) for m in MODELS}
    scores = {m: -np.sort(rng.random((n, 100), dtype=np.float32), axis=1) for m in MODELS}
    names = np.asarray(["als", "text", "itemknn"], dtype=object)
    sources = names[rng.integers(0, len(names), (n, 100))]
    targets = pl.DataFrame({Columns.UserIdx: users.astype(np.int32), Columns.ItemIdx: lists["als"][:, 3]})
    events = n * args.history
    history = pl.DataFrame(
        {
            Columns.UserIdx: np.repeat(users, args.history).astype(np.int32),
            Columns.ItemIdx: rng.integers(0, n_items, events, dtype=np.int32),
            Columns.Timestamp: np.arange(events),
            Columns.Weight: np.ones(events, dtype=np.float32),
        }
    )
    protocol = make_protocol(
        run_id="bench",
        experiment="bench",
        data_name=f"random lists, {n} users",
        data_hash="-",
        n_users=n,
        n_items=n_items,
        split={"_target_": "bench.Random"},
        split_counts={"test": n},
        seen_filtering=True,
        availability_filtering=False,
        ks=[10, 20],
        max_k=100,
        seed=0,
        targets=targets,
        models=MODELS,
        root=Path(__file__).resolve().parents[1],
    )
    embeddings = rng.standard_normal((n_items, 384), dtype=np.float32)
    held = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "evaluation"
        reset_peak_rss()
        t0 = time.perf_counter()
        write_bundle(
            folder,
            protocol=protocol,
            users=users,
            recommended=lists,
            scores=scores,
            sources=sources,
            targets=targets,
            history=history,
            n_items=n_items,
            item_embeddings=embeddings,
        )
        t1, bundle_peak = time.perf_counter(), peak_rss_mb()
        reset_peak_rss()
        Reporter().write(read_bundle(folder), Path(tmp) / "report")
        t2, report_peak = time.perf_counter(), peak_rss_mb()
    print(f"{n:,} users x {len(MODELS)} models' top-100 lists, {n_items:,} items")
    print(f"held before: {held:,.0f} MiB (peak so far)")
    print(f"bundle: {t1 - t0:.1f} s, peak {bundle_peak:,.0f} MiB")
    print(f"report: {t2 - t1:.1f} s, peak {report_peak:,.0f} MiB")


if __name__ == "__main__":
    run_script(main)
