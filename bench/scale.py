"""How the default job's cost grows with the data: wall time and peak memory per stage at 1x, 10x, 100x.

    python bench/scale.py                      # 1x and 10x the generated data set
    python bench/scale.py --sizes 1,10,100     # 100x: 300k users, 150k items, about 4.3 M events
    python bench/scale.py --sizes 1 -- encoder=tiny   # any further Hydra overrides after --
    python bench/scale.py --profile /tmp/prof  # also a cProfile of each job: /tmp/prof/x<size>.prof

Each size runs ``python -m recsys.train`` in a fresh process on the generated data set scaled by
that factor (``data.n_users=3000*s data.n_items=1500*s``), writing into a temporary folder
(data, MLflow store, outputs), with a short text-tower budget (``--epochs`` x ``--steps`` steps;
the bench measures how the rest grows, the text budget is set apart) and every test user
evaluated (``eval.max_users=null``): the job's default sample of 50,000 users leaves the 100x
comparison of fused against ALS, 0.0002 apart, inside its interval. ``-- eval.max_users=50000``
runs the job's default instead (later overrides win). The job logs, per stage,
its seconds (``time/<stage>_s``) and its peak resident memory (``mem/<stage>_peak_mb``: the
high-water mark since the previous stage ended, see ``recsys/profiling.py``); this script reads
them back from the run and prints one table. Figures vary between runs on shared machines:
compare the columns of one run (the growth column divides by the first size), and read them
with the load average recorded at each job's start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recsys.errors import run_script

REPO = Path(__file__).resolve().parents[1]

# (row label, the job's stage windows it sums). Time is summed, memory is the largest window's.
STAGES: list[tuple[str, list[str]]] = [
    ("data (generate, load, split)", ["load"]),
    ("text (import Lightning, load the encoder)", ["text_setup"]),
    ("CF (fit on train, refit on train+val)", ["cf_fit_val", "cf_fit_test"]),
    ("text (fine-tune)", ["text_finetune"]),
    ("text (catalogue passes)", ["text_encode"]),
    ("ranker training (candidates, features, LambdaMART)", ["ranker_fit"]),
    ("test ranking (candidates, features, scoring)", ["test_rank"]),
    ("evaluation (all models, full ranking)", ["evaluate"]),
    ("evaluation bundle + report", ["evaluation_report"]),
    ("export (recommendations.parquet)", ["export"]),
    ("model save (MLflow pyfunc)", ["model_save"]),
    ("total", ["total"]),
]
# Parts of the two ranker rows, summed over both stages (time only).
PARTS: list[tuple[str, str]] = [
    ("  of which candidates + features", "fusion_candidates_features"),
    ("  of which LambdaMART training", "fusion_ranker_train"),
    ("  of which LambdaMART scoring", "fusion_ranker_predict"),
]


def run_size(
    scale: int,
    root: Path,
    epochs: int,
    steps: int,
    overrides: list[str],
    timeout: float,
    profile: Path | None = None,
) -> dict:
    """Run the job at ``scale`` x the default size; returns its metrics, wall time and sizes.

    ``profile``: run it under cProfile, writing ``<profile>/x<scale>.prof`` (``python -m pstats``).
    """
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    profiler = []
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        profiler = ["-m", "cProfile", "-o", str(profile / f"x{scale}.prof")]
    cmd = [
        sys.executable,
        *profiler,
        "-m",
        "recsys.train",
        f"data.n_users={3000 * scale}",
        f"data.n_items={1500 * scale}",
        f"trainer.max_epochs={epochs}",
        f"text.data.steps_per_epoch={steps}",
        f"paths.data_dir={root / 'data'}",
        f"paths.mlruns_dir={root / 'mlruns'}",
        f"hydra.run.dir={root / 'out'}",  # the run folder (paths.output_dir), with its .hydra/ record
        f"text.resume_root={root / 'checkpoints'}",
        "eval.max_users=null",  # every test user (the module docstring says why)
        *overrides,
    ]
    print(f"[{scale}x] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    load_start = load_average()
    t0 = time.perf_counter()
    with open(root / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - t0
    load_end = load_average()
    if proc.returncode != 0:
        tail = (root / "log.txt").read_text()[-3000:]
        raise SystemExit(f"[{scale}x] recsys.train failed (exit {proc.returncode}); log {root / 'log.txt'}:\n{tail}")
    import mlflow

    from recsys.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root / "mlruns"))
    experiments = [e.experiment_id for e in client.search_experiments()]
    run = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1)[0]
    metrics = dict(run.data.metrics)
    events = sum(metrics.get(f"data/{s}_events", 0) for s in ("train", "val", "test"))
    return {
        "scale": scale,
        "wall_s": wall,
        "load": [load_start, load_end],
        "events": int(events),
        "metrics": metrics,
        "run_id": run.info.run_id,
    }


def load_average() -> float:
    """The machine's 1-minute load average (NaN where the OS has none): the figures depend on it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def table(results: list[dict]) -> str:
    """Markdown: a row per stage, seconds and peak MB per size, and the growth against the first size."""
    first = results[0]
    head = ["stage"]
    for r in results:
        head += [f"{r['scale']}x s", f"{r['scale']}x peak MB"]
    if len(results) > 1:
        head += [f"{r['scale']}x / {first['scale']}x time" for r in results[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def seconds(r: dict, keys: list[str]) -> float | None:
        vals = [r["metrics"].get(f"time/{k}_s") for k in keys]
        return sum(v for v in vals if v is not None) if any(v is not None for v in vals) else None

    def peak(r: dict, keys: list[str]) -> float | None:
        vals = [r["metrics"][f"mem/{k}_peak_mb"] for k in keys if f"mem/{k}_peak_mb" in r["metrics"]]
        return max(vals) if vals else None

    def fmt(x: float | None, digits: int = 1) -> str:
        return "–" if x is None else f"{x:,.{digits}f}"

    rows = [(label, keys, True) for label, keys in STAGES] + [(label, [key], False) for label, key in PARTS]
    for label, keys, with_mem in rows:
        cells = [label]
        for r in results:
            cells += [fmt(seconds(r, keys)), fmt(peak(r, keys), 0) if with_mem else ""]
        base = seconds(first, keys)
        for r in results[1:]:
            s = seconds(r, keys)
            cells.append(f"{s / base:.1f}x" if s is not None and base else "–")
        lines.append("| " + " | ".join(cells) + " |")
    work = ["events (train + val + test)"]
    for r in results:
        work += [f"{r['events']:,}", ""]
    work += [f"{r['events'] / first['events']:.1f}x" for r in results[1:]]
    lines.append("| " + " | ".join(work) + " |")
    wall = ["process wall time, s"]
    for r in results:
        wall += [f"{r['wall_s']:,.1f}", ""]
    wall += [f"{r['wall_s'] / first['wall_s']:.1f}x" for r in results[1:]]
    lines.append("| " + " | ".join(wall) + " |")
    load = ["load average (1 min), start / end"]
    for r in results:
        load += [" / ".join(f"{x:.1f}" for x in r["load"]), ""]
    load += ["" for _ in results[1:]]
    lines.append("| " + " | ".join(load) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10", help="comma-separated multiples of the default size")
    parser.add_argument("--epochs", type=int, default=1, help="text-tower epochs (trainer.max_epochs)")
    parser.add_argument("--steps", type=int, default=10, help="text-tower steps per epoch")
    parser.add_argument("--workdir", default=None, help="keep data, runs and logs here (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per size before giving up")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--profile", default=None, help="run each size under cProfile, writing x<size>.prof here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(s < 1 for s in sizes):
        parser.error("--sizes: whole multiples >= 1")
    with tempfile.TemporaryDirectory(prefix="recsys-scale-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        profile = Path(args.profile) if args.profile else None
        results = [run_size(s, work / f"x{s}", args.epochs, args.steps, extra, args.timeout, profile) for s in sizes]
    print(
        f"\npython bench/scale.py --sizes {args.sizes} --epochs {args.epochs} --steps {args.steps}"
        + (f" -- {' '.join(extra)}" if extra else "")
    )
    print(f"{os.cpu_count()} CPUs, load average {load_average():.1f} at the end\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_script(main)
