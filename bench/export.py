"""Export throughput and memory: the fused pipeline vs a per-user loop vs a bare matrix top-k.

    python bench/export.py                      # 100k users, 5k items, top-100 (several minutes)
    python bench/export.py --users 20000        # quicker
    python bench/export.py --workers 1          # one worker (default 2 threads, as conf/recommend.yaml)

One run builds a pipeline on a generated catalogue (5k items with text, ``--users`` users, ~10
events each: ALS, BPR, item-kNN, popularity, a text tower with a 384-wide one-layer random BERT --
the export cost depends on the embedding width, not on the encoder depth -- and a LambdaMART
ranker trained on the users' last events), saves it, and then, in the same process:

* exports every user with the fused pipeline (candidates, features, ranker, rules, explanations,
  parquet), and single-stage ALS and text exports, through ``recsys.export.batch``;
* runs the same fused pipeline user by user on a sample (the naive loop);
* times a bare ``torch.topk`` over ``U @ V.T`` with seen items masked (the floor);

and then, in two fresh processes, exports 10k and all users from the saved pipeline, reading
the peak RSS (and PSS) of each one's process tree -- the export process and its workers. All
figures are ratios taken on one machine in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from recsys.columns import Columns  # noqa: E402
from recsys.errors import run_script


def generate(n_users: int, n_items: int, events: int, seed: int = 0):
    """Users with one favourite topic, items with topic text and log-normal popularity."""
    from recsys.data.synthetic import GENERIC, TOPICS

    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    item_topic = rng.integers(0, len(topics), n_items)
    words = [rng.choice(TOPICS[topics[t]], 3) for t in item_topic]
    texts = [f"{rng.choice(GENERIC)} {w[0]} {w[1]} {w[2]}" for w in words]
    items = pl.DataFrame(
        {
            Columns.Item: [f"I{i:06d}" for i in range(n_items)],
            Columns.ItemIdx: np.arange(n_items, dtype=np.int32),
            Columns.Text: texts,
            "category": [topics[t] for t in item_topic],
        }
    )
    pop = rng.lognormal(0, 1, n_items)
    by_topic = [np.flatnonzero(item_topic == t) for t in range(len(topics))]
    probs = [pop[ix] / pop[ix].sum() for ix in by_topic]
    user_topic = rng.integers(0, len(topics), n_users)
    n_ev = rng.integers(max(3, events // 2), events * 3 // 2 + 1, n_users)
    users = np.repeat(np.arange(n_users), n_ev)
    noise = rng.random(len(users)) < 0.2
    topic = np.where(noise, rng.integers(0, len(topics), len(users)), user_topic[users])
    item = np.empty(len(users), dtype=np.int64)
    for t in range(len(topics)):
        sel = np.flatnonzero(topic == t)
        item[sel] = rng.choice(by_topic[t], len(sel), p=probs[t])
    ts = 1_700_000_000 + np.concatenate([np.sort(rng.integers(0, 10**7, n)) for n in n_ev])
    df = pl.DataFrame(
        {
            Columns.UserIdx: users.astype(np.int32),
            Columns.ItemIdx: item.astype(np.int32),
            Columns.Timestamp: ts,
            Columns.Weight: np.where(rng.random(len(users)) < 0.2, 4.0, 1.0).astype(np.float32),
        }
    ).sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True)
    return items, df


def build(folder: Path, n_users: int, n_items: int, events: int) -> dict:
    import torch

    from recsys.cf.models import ALS, BPR, ItemKNN, Popularity
    from recsys.config import minilm_path
    from recsys.data.dataset import IdMap
    from recsys.pipeline import FusionStage, LabelledStage
    from recsys.pipeline_model import TrainedPipeline
    from recsys.rank.ranker import LambdaMARTRanker
    from recsys.recommender import History
    from recsys.text.encoder import ItemEncoder, TwoTower
    from recsys.text.recommender import TextRecommender

    t0 = time.perf_counter()
    items, df = generate(n_users, n_items, events)
    last = df.group_by(Columns.UserIdx).agg(pl.all().last()).sort(Columns.UserIdx)
    train = df.join(
        last.select(Columns.UserIdx, Columns.Timestamp, Columns.ItemIdx),
        on=list(last.columns[:1]) + [Columns.Timestamp, Columns.ItemIdx],
        how="anti",
    )
    train = train.sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True)
    hist = History(train, n_users, n_items)
    torch.set_num_threads(2)
    enc = ItemEncoder.random(
        minilm_path(), hidden_size=384, num_hidden_layers=1, num_attention_heads=12, intermediate_size=512
    )
    net = TwoTower(enc, max_history=20).eval()
    models = {
        "als": ALS(factors=64, iterations=8).fit(hist),
        "bpr": BPR(factors=64, iterations=20).fit(hist),
        "itemknn": ItemKNN(neighbours=100).fit(hist),
        "popularity": Popularity().fit(hist),
        "text": TextRecommender(net, enc.encode(items[Columns.Text].to_list(), batch_size=256)).fit(hist),
    }
    n_cand = {"als": 50, "text": 50, "itemknn": 30, "popularity": 20}
    fusion = FusionStage(n_cand, LambdaMARTRanker(n_estimators=100, early_stopping_rounds=20))
    val_users = np.arange(min(3000, n_users))
    targets = last.filter(pl.col(Columns.UserIdx).is_in(val_users.tolist()))
    fusion.fit(LabelledStage(val_users, models, hist, targets))
    users = IdMap(np.asarray([f"U{u:07d}" for u in range(n_users)], dtype=object))
    pipe = TrainedPipeline.from_training(
        items, users, hist, models, n_cand, fusion.ranker, {"click": 1.0, "purchase": 4.0}
    )
    pipe.save(folder)
    return {"build_s": time.perf_counter() - t0, "events": train.height, "best_iteration": fusion.ranker.best_iteration}


def make_engine(folder: Path, k: int, scorer: str, explain: bool = True):
    from recsys.export.engine import Engine, ExplainOptions
    from recsys.rank.rules import BusinessRules

    opts = ExplainOptions() if explain else ExplainOptions(enabled=False, top_features=0)
    return Engine.load(folder, BusinessRules(max_per_category=40), k, scorer, opts)  # seen filtering + a cap


def output_bytes(path: Path) -> list[bytes]:
    """An export's bytes: the file, or each file of a ``layout=parts`` folder in name order."""
    return [f.read_bytes() for f in sorted(path.iterdir())] if path.is_dir() else [path.read_bytes()]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_export(
    folder: Path,
    out: Path,
    k: int,
    scorer: str,
    n_users: int | None,
    chunk: int,
    explain=True,
    workers: int = 1,
    layout: str = "file",
    parallel: str = "threads",
):
    from recsys.export.batch import export_recommendations

    engine = make_engine(folder, k, scorer, explain)
    users = list(engine.p.users.ids[: n_users or len(engine.p.users)])
    t0, c0, cc0 = time.perf_counter(), time.process_time(), children_cpu()
    res = export_recommendations(
        engine, users, out, chunk_size=chunk, progress=False, workers=workers, layout=layout, parallel=parallel
    )
    dt = time.perf_counter() - t0
    return {
        "users": len(users),
        "workers": workers,
        "layout": layout,
        "parallel": parallel,
        "seconds": dt,
        # CPU time of this process and of its workers: less noisy under contention
        "cpu_s": time.process_time() - c0 + children_cpu() - cc0,
        "users_per_s": len(users) / dt,
        "rows": res.manifest["rows"],
        "parts_by_process": res.manifest["parts_by_process"],
        # summed over the processes (CPU-like seconds when workers > 1)
        "stages_s": {k: round(v, 2) for k, v in engine.timings.most_common()},
    }


def naive_loop(folder: Path, k: int, n: int) -> dict:
    """The same fused pipeline called one user at a time (what a per-user service loop does)."""
    engine = make_engine(folder, k, "fused")
    users = list(engine.p.users.ids[:n])
    t0, c0 = time.perf_counter(), time.process_time()
    for u in users:
        engine.recommend(engine.p.histories([u]))
    dt = time.perf_counter() - t0
    return {"users": n, "seconds": dt, "cpu_s": time.process_time() - c0, "users_per_s": n / dt}


def bare_topk(folder: Path, k: int, chunk: int) -> dict:
    """Floor: torch.topk over U @ V.T with seen items masked, no ids, no output; once with the
    threads the export uses (1, ``Engine(threads=1)``) and once with torch's default."""
    import torch
    from threadpoolctl import threadpool_limits

    from recsys.pipeline_model import TrainedPipeline
    from recsys.recommender import History

    p = TrainedPipeline.load(folder)
    seen = History(p.history, len(p.users), p.n_items).matrix
    out = {}
    spaces = {"als": (p.models["als"].user_factors, p.models["als"].item_factors)}
    ph = p.histories(list(p.users.ids))
    spaces["text"] = (p.scorers(ph, ["text"])["text"].user_embeddings, p.models["text"].item_embeddings)
    default_threads = torch.get_num_threads()
    for threads in (1, default_threads):
        torch.set_num_threads(threads)
        with threadpool_limits(threads):
            for name, (u, v) in spaces.items():
                vt = torch.from_numpy(np.ascontiguousarray(v.T))
                t0, c0 = time.perf_counter(), time.process_time()
                for s in range(0, len(u), chunk):
                    sc = torch.from_numpy(u[s : s + chunk]) @ vt
                    rows = seen[s : s + chunk]
                    r = torch.from_numpy(np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr)))
                    sc[r, torch.from_numpy(rows.indices.astype(np.int64))] = -torch.inf
                    torch.topk(sc, k, dim=1)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                out[f"{name}_{threads}thread"] = {"users_per_s": len(u) / dt, "seconds": dt, "cpu_s": cpu}
    torch.set_num_threads(default_threads)
    return out


class TreeMemory:
    """Peak memory of this process and its children (the export's workers), sampled every
    0.1 s from /proc: the sum of their RSS (shared pages counted once per process) and of
    their PSS (shared pages split between the processes sharing them)."""

    def __init__(self) -> None:
        import threading

        self.peak_rss = self.peak_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _tree() -> list[int]:
        pids, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in task.read_text().split()]
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0.0
            for pid in self._tree():
                try:
                    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Rss:"):
                            rss += int(line.split()[1]) / 1024
                        elif line.startswith("Pss:"):
                            pss += int(line.split()[1]) / 1024
                except OSError:
                    pass
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(0.1)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_tree_mb": self.peak_rss, "peak_pss_tree_mb": self.peak_pss}


def rss_child(
    folder: str, out: str, k: int, n_users: int, chunk: int, workers: int, layout: str, parallel: str
) -> None:
    mem = TreeMemory()
    r = timed_export(
        Path(folder), Path(out), k, "fused", n_users, chunk, workers=workers, layout=layout, parallel=parallel
    )
    r.update(mem.stop())
    # This process alone, exactly: VmHWM, the high-water mark of its own memory map. Not
    # ru_maxrss, which Linux carries over exec from the forked copy of the parent (the bench
    # process, holding the generated data): it read ~2.1 GB here whatever the export did.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    r["peak_rss_mb"] = int(hwm.split()[1]) / 1024
    print(json.dumps(r))


def rss_run(folder: Path, tmp: str, a, n: int) -> dict:
    """Export ``n`` users from the saved pipeline in a fresh process; its peak RSS."""
    cmd = [sys.executable, __file__, "--k", str(a.k), "--chunk", str(a.chunk), "--workers", str(a.workers)]
    cmd += ["--layout", a.layout, "--parallel", a.parallel]
    cmd += ["--rss-child", str(folder), f"{tmp}/rss{n}.parquet", str(n)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    child = json.loads(out.splitlines()[-1])
    print(
        f"fresh process, {n} users, {a.workers} workers ({a.parallel}): peak RSS of the process tree "
        f"{child['peak_rss_tree_mb']:.0f} MB (PSS {child['peak_pss_tree_mb']:.0f} MB; the export process alone, "
        f"exact: {child['peak_rss_mb']:.0f} MB), {child['users_per_s']:.0f} users/s"
    )
    return child


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=5_000)
    ap.add_argument("--events", type=int, default=10)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument(
        "--workers", type=int, default=2, help="export workers, threads or processes (--parallel; recommend.yaml)"
    )
    ap.add_argument(
        "--layout", default="parts", choices=["file", "parts"], help="output layout of every export (recommend.yaml)"
    )
    ap.add_argument(
        "--parallel", default="threads", choices=["threads", "processes"], help="what the workers are (recommend.yaml)"
    )
    ap.add_argument("--naive-users", type=int, default=300)
    ap.add_argument("--small", type=int, default=10_000, help="users of the smaller RSS run")
    ap.add_argument("--only-rss", action="store_true", help="build, then only the two peak-RSS runs")
    ap.add_argument("--rss-child", nargs=3, metavar=("FOLDER", "OUT", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rss_child:
        rss_child(a.rss_child[0], a.rss_child[1], a.k, int(a.rss_child[2]), a.chunk, a.workers, a.layout, a.parallel)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pipeline"
        print("load average at the start", os.getloadavg(), flush=True)
        res = {"config": vars(a), "loadavg_start": os.getloadavg(), "build": build(folder, a.users, a.items, a.events)}
        print("built", res["build"], flush=True)
        if a.only_rss:
            for n in (a.small, a.users):
                res[f"rss_{n}"] = rss_run(folder, tmp, a, n)
            return
        w = a.workers

        def export(name: str, scorer: str, explain: bool = True, workers: int = w, parallel: str = a.parallel) -> dict:
            """Every user, with this run's K, chunk and layout, into ``tmp/name``."""
            out = Path(tmp) / name
            return timed_export(folder, out, a.k, scorer, None, a.chunk, explain, workers, a.layout, parallel)

        # The export's compiled loops are compiled on first use and cached on disk (numba): a
        # fresh checkout spends ~5-10 s per process on its first chunk once, which is not the
        # throughput of an export. Compile them first, on a few users of each kind of export.
        t0 = time.perf_counter()
        for scorer in ("fused", "als", "text"):
            engine = make_engine(folder, a.k, scorer)
            engine.recommend(engine.p.histories(list(engine.p.users.ids[:64])))
        res["compile_s"] = round(time.perf_counter() - t0, 2)
        print("compiled (or loaded) the kernels in", res["compile_s"], "s", flush=True)
        res["fused"] = export("fused.parquet", "fused")
        print("fused", res["fused"], flush=True)
        if w != 1:
            one = export("fused1.parquet", "fused", workers=1)
            res["fused_1_worker"] = one
            print("fused, 1 worker", one, flush=True)
            same = output_bytes(Path(tmp) / "fused1.parquet") == output_bytes(Path(tmp) / "fused.parquet")
            res["fused_same_bytes_1_vs_n_workers"] = same
            print("same bytes with 1 and", w, "workers:", same, flush=True)
        res["fused_no_explain"] = export("fne.parquet", "fused", explain=False)
        print("fused, no explanations", res["fused_no_explain"], flush=True)
        for s in ("als", "text"):
            res[s] = export(f"{s}.parquet", s)
            print(s, res[s], flush=True)
            res[f"{s}_no_explain"] = export(f"{s}n.parquet", s, explain=False)
            print(s, "no explanations", res[f"{s}_no_explain"], flush=True)
        if w != 1:  # the other kind of workers, in the same run: the ratio is what carries over
            other = "processes" if a.parallel == "threads" else "threads"
            for s in ("fused", "als"):
                res[f"{s}_{other}"] = r = export(f"{s}_{other}.parquet", s, parallel=other)
                same = output_bytes(Path(tmp) / f"{s}_{other}.parquet") == output_bytes(Path(tmp) / f"{s}.parquet")
                print(f"{s} with {other}", r, "same bytes:", same, flush=True)
                print(f"  {a.parallel} / {other}: {res[s]['users_per_s'] / r['users_per_s']:.2f}x", flush=True)
        res["naive_loop"] = naive_loop(folder, a.k, a.naive_users)
        print("naive loop", res["naive_loop"], flush=True)
        res["bare_topk"] = bare_topk(folder, a.k, a.chunk)
        res["loadavg_end"] = os.getloadavg()
        print("bare top-k", res["bare_topk"], flush=True)
        for n in (a.small, a.users):
            res[f"rss_{n}"] = rss_run(folder, tmp, a, n)
        f = res["fused"]["users_per_s"]
        bare = res["bare_topk"]
        print(
            f"\nfused {f:.0f} users/s = {f / res['naive_loop']['users_per_s']:.0f}x the per-user loop; "
            f"ALS export {res['als']['users_per_s']:.0f} users/s "
            f"({res['als_no_explain']['users_per_s']:.0f} without explanations) "
            f"vs bare top-k {bare['als_1thread']['users_per_s']:.0f} (1 thread); "
            f"text export {res['text']['users_per_s']:.0f} ({res['text_no_explain']['users_per_s']:.0f}) "
            f"vs bare {bare['text_1thread']['users_per_s']:.0f} (1 thread)"
        )
        print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    run_script(main)
