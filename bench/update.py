"""Update vs full training: ``python -m recsys.update`` against the training run it updates.

    flock /work/helpers/heavy.lock python bench/update.py            # Scientific, 1 % new events
    python bench/update.py --workdir /tmp/upd --reuse                # the updates only, same model

One run, on Amazon-Scientific (read through ``recsys.data.RecBoleDataSource``):

1. the newest ``--share`` of the events (by timestamp: the RecBole files' order positions, so the
   tail of the longest sequences) is held out as "the events since training"; items whose every
   event is held out leave the catalogue (they come back as new items), and ``--changed`` items of
   the held-out events get a changed text;
2. the rest is written as RecBole files and ``python -m recsys.train +experiment=scientific`` runs on
   them in a fresh process (evaluation, report, deploy and registration included), timed;
3. ``python -m recsys.update`` runs on the held-out events and items, once with ``cf_mode=refit``
   and once with ``cf_mode=fold_in``, each in a fresh process from the same registered version;
4. every process's wall time and peak RSS (``/usr/bin/time``), the training run's test metrics and
   each update's gate metrics (champion vs challenger on the newest held-out events, logged to
   MLflow) are printed, with the ratio update / full training.

Both commands are timed as a user runs them, interpreter start and imports included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from recsys.errors import run_script

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "amazon-scientific"
MAX_HISTORY = 50  # the RecBole files' history length


def load(root: Path):
    from recsys.data import RecBoleDataSource

    return RecBoleDataSource(root=str(root), dataset="Scientific").load()


def split_newest(ds, share: float, changed: int):
    """(kept events, kept items, new events, new-or-changed item rows)."""
    from recsys.columns import Columns as C

    ev = ds.interactions.select(C.User, C.Item, C.Timestamp)
    cut = ev[C.Timestamp].quantile(1.0 - share, "higher")
    new = ev.filter(pl.col(C.Timestamp) >= cut)
    kept = ev.filter(pl.col(C.Timestamp) < cut)
    items = ds.items.select(C.Item, C.Text)
    fresh = items.filter(~pl.col(C.Item).is_in(kept[C.Item].implode()) & pl.col(C.Item).is_in(new[C.Item].implode()))
    top = (
        new.filter(~pl.col(C.Item).is_in(fresh[C.Item].implode()))
        .group_by(C.Item)
        .len()
        .sort("len", C.Item, descending=[True, False])
        .head(changed)[C.Item]
    )
    edited = items.filter(pl.col(C.Item).is_in(top.implode())).with_columns(
        (pl.col(C.Text) + " New edition.").alias(C.Text)
    )
    rows = pl.concat([fresh, edited]).sort(C.Item)
    return kept, items.filter(~pl.col(C.Item).is_in(fresh[C.Item].implode())), new, rows, int(cut), fresh.height


def write_recbole(folder: Path, events: pl.DataFrame, items: pl.DataFrame) -> None:
    """``events`` and ``items`` as RecBole atomic files: per user the last item is test, the one
    before it validation, every earlier one a train row (RecBole's layout: longest prefix first)."""
    from recsys.columns import Columns as C

    folder.mkdir(parents=True, exist_ok=True)
    item_ix = {i: j for j, i in enumerate(items[C.Item].to_list())}
    users = sorted(set(events[C.User].to_list()))
    user_ix = {u: j for j, u in enumerate(users)}
    (folder / "Scientific.item2index").write_text("".join(f"{i}\t{j}\n" for i, j in item_ix.items()))
    (folder / "Scientific.user2index").write_text("".join(f"{u}\t{j}\n" for u, j in user_ix.items()))
    text = "item_id:token\ttext:token_seq\n" + "".join(f"{i}\t{t}\n" for i, t in items.iter_rows())
    (folder / "Scientific.text").write_text(text)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    parts = {"train": [header], "valid": [header], "test": [header]}
    seqs = events.sort(C.User, C.Timestamp).group_by(C.User, maintain_order=True).agg(C.Item)
    for user, seq in seqs.iter_rows():
        s = [item_ix[i] for i in seq]
        if len(s) < 3:
            raise SystemExit(f"user {user} has {len(s)} events left: the cut is too early for a leave-one-out split")
        u = user_ix[user]
        parts["test"].append(inter_row(u, s, len(s) - 1))
        parts["valid"].append(inter_row(u, s, len(s) - 2))
        parts["train"].extend(inter_row(u, s, j) for j in range(len(s) - 3, 0, -1))
    for name, lines in parts.items():
        (folder / f"Scientific.{name}.inter").write_text("".join(lines))


def inter_row(user: int, seq: list[int], j: int) -> str:
    """The RecBole row whose target is ``seq[j]``: its history truncated to the files' length."""
    return f"{user}\t{' '.join(map(str, seq[max(0, j - MAX_HISTORY) : j]))}\t{seq[j]}\n"


def timed(cmd: list[str], log: Path, env: dict, cwd: Path = REPO) -> dict:
    """Wall time and peak RSS of one fresh process (``/usr/bin/time -v``), run in ``cwd`` (whose
    ``recsys`` package ``python -m`` imports)."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{text[-4000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    return {"wall_s": wall, "peak_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_update")
    ap.add_argument("--share", type=float, default=0.01, help="newest share of the events held out as new")
    ap.add_argument("--changed", type=int, default=10, help="held-out events' items given a changed text")
    ap.add_argument("--reuse", action="store_true", help="keep the trained model in --workdir, rerun the updates")
    ap.add_argument("--modes", default="refit,fold_in")
    ap.add_argument("--update-code", type=Path, default=REPO, help="the checkout whose recsys.update is timed")
    ap.add_argument("overrides", nargs="*", help="extra overrides for the training command")
    a = ap.parse_args()

    import mlflow

    from recsys.tracking import tracking_uri

    work = a.workdir.resolve()
    mlruns = work / "mlruns"
    if mlruns.exists() != a.reuse:
        raise SystemExit(f"{mlruns} {'exists: remove it, or pass --reuse' if mlruns.exists() else 'is missing'}")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result: dict = {"share": a.share}
    ds = load(a.data)
    kept, items, new, rows, cut, n_fresh = split_newest(ds, a.share, a.changed)
    result["data"] = {
        "events": ds.interactions.height,
        "kept_events": kept.height,
        "new_events": new.height,
        "new_event_users": new["user_id"].n_unique(),
        "cut_position": cut,
        "new_items": n_fresh,
        "changed_items": rows.height - n_fresh,
    }
    print(json.dumps(result["data"]), flush=True)
    write_recbole(work / "data", kept, items)
    new.with_columns(pl.lit("purchase").alias("event")).write_csv(work / "events_since.csv")
    rows.select("item_id", pl.col("text").alias("title"), pl.lit("").alias("description")).write_csv(
        work / "items_changed.csv"
    )

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(mlruns))
    if not a.reuse:
        train = [
            sys.executable,
            "-m",
            "recsys.train",
            "+experiment=scientific",
            f"data.root={work / 'data'}",
            f"paths.mlruns_dir={mlruns}",
            f"hydra.run.dir={work / 'train'}",
            *a.overrides,
        ]
        print("$", " ".join(train[1:]), flush=True)
        result["train"] = timed(train, work / "train.log", env)
        (work / "train.json").write_text(json.dumps(result["train"]))
    else:
        result["train"] = json.loads((work / "train.json").read_text())
    # The training's version: the first registered in this fresh store (an update the gate promoted
    # holds the @champion alias since, and holds the new events already).
    champion = min(client.search_model_versions("name='recsys'"), key=lambda v: int(v.version))
    run = client.get_run(champion.run_id)
    for key in ("ndcg_at_10", "recall_at_10"):
        result["train"][f"test_fused_{key}"] = run.data.metrics.get(f"test/fused/{key}")
    print("full training:", json.dumps(result["train"]), flush=True)

    version = champion.version
    for mode in a.modes.split(","):
        shutil.rmtree(work / f"update_{mode}", ignore_errors=True)  # a rerun's (--reuse) output folder
        update = [
            sys.executable,
            "-m",
            "recsys.update",
            f"model_uri=models:/recsys/{version}",
            f"data.interactions={work / 'events_since.csv'}",
            f"data.items={work / 'items_changed.csv'}",
            f"paths.mlruns_dir={mlruns}",
            f"output={work / ('update_' + mode)}",
            f"cf_mode={mode}",
        ]
        print("$", " ".join(update[1:]), flush=True)
        code = a.update_code.resolve()
        r = timed(update, work / f"update_{mode}.log", {**env, "PYTHONPATH": str(code)}, cwd=code)
        exp = client.get_experiment_by_name("update")
        last = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
        r.update({k: v for k, v in last.data.metrics.items() if k.startswith(("gate/", "time/", "update/"))})
        r["ratio_to_full"] = r["wall_s"] / result["train"]["wall_s"]
        result[f"update_{mode}"] = r
        # Each update starts from the trained version: point @champion back at it.
        client.set_registered_model_alias("recsys", "champion", version)
        print(f"update ({mode}):", json.dumps(r), flush=True)

    print()
    print("| | wall time | peak RSS | fused NDCG@10 | fused Recall@10 |")
    print("|---|---|---|---|---|")
    t = result["train"]
    print(
        f"| full training (test split) | {t['wall_s']:.0f} s | {t['peak_rss_mb'] / 1024:.2f} GB "
        f"| {t['test_fused_ndcg_at_10']:.4f} | {t['test_fused_recall_at_10']:.4f} |"
    )
    for mode in a.modes.split(","):
        r = result[f"update_{mode}"]
        for who in ("champion", "challenger"):
            label = f"update `cf_mode={mode}`" if who == "challenger" else "trained model (gate holdout)"
            wall = f"{r['wall_s']:.1f} s ({100 * r['ratio_to_full']:.1f} %)" if who == "challenger" else ""
            rss = f"{r['peak_rss_mb'] / 1024:.2f} GB" if who == "challenger" else ""
            if who == "champion" and mode != a.modes.split(",")[0]:
                continue
            print(
                f"| {label} | {wall} | {rss} | {r.get(f'gate/{who}_ndcg_at_10', float('nan')):.4f} "
                f"| {r.get(f'gate/{who}_recall_at_10', float('nan')):.4f} |"
            )
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(f"\n{work / 'result.json'}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    run_script(main)
