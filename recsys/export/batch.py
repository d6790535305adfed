"""Chunked, restartable batch export: parts under a temporary folder, one atomic publish.

Two output layouts (``layout``): ``file``, one parquet file; ``parts``, a folder of parquet files,
one per chunk (``part-NNNNN.parquet``, rows in the same order across files), which readers take
as one table (``pl.read_parquet("out.parquet/*.parquet")``, pyarrow/Spark/DuckDB datasets).
``parts`` skips the single-writer step that re-reads every row: at scale, the export's fastest.

Layout while running (beside the output):

```
.recommendations.parquet.parts-<fingerprint>/
  plan.json              what is being exported (the fingerprint's inputs)
  part-00000.parquet     finished chunks (written as .tmp, then renamed: a part that exists is whole)
  part-00000.json        that chunk's row count and rule counts
```

``file``: as soon as a part and every part before it exist, the part is appended to the output,
which is written under a temporary name in the parts folder; when the last part is in, it is
renamed to ``recommendations.parquet``. ``parts``: the parts are written zstd-compressed, as
published; when the last is in, they are linked into a folder that is renamed into place. Then
the manifest ``recommendations.manifest.json`` is written the same way, and the parts folder is
removed. A rerun with the same arguments after a kill finds
the folder (same fingerprint) and computes only the missing parts; the output is byte-identical
to an uninterrupted run because each part depends only on its users and the model.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.atomic import write_atomic, write_text_atomic
from recsys.columns import Columns
from recsys.errors import ConfigError
from recsys.export.engine import FUSED, OUTPUT_SCHEMA, Engine, EngineRecipe
from recsys.output import output_lock
from recsys.pipeline_model import check_histories_mode
from recsys.rank.rules import LIST_RULE_SETTINGS
from recsys.threads import thread_limits

log = logging.getLogger(__name__)

LAYOUTS = ("file", "parts")  # export_recommendations(layout=...): one parquet file, or a folder of parts
PARALLEL = ("threads", "processes")  # export_recommendations(parallel=...): what the workers are


@dataclass
class ExportResult:
    path: Path
    manifest_path: Path
    manifest: dict[str, Any]


def frame_hash(df: pl.DataFrame | None) -> str | None:
    if df is None:
        return None
    h = hashlib.sha256()
    h.update(json.dumps(df.columns).encode())
    h.update(df.write_csv().encode())
    return h.hexdigest()[:16]


def export_recommendations(
    engine: Engine,
    user_ids: Sequence[str],
    out_path: str | Path,
    histories: pl.DataFrame | None = None,
    chunk_size: int = 4096,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    after_part: Callable[[int], None] | None = None,
    workers: int = 1,
    layout: str = "file",
    parallel: str = "threads",
    histories_mode: str = "extend",
) -> ExportResult:
    """Write top-K for ``user_ids`` (exported in sorted order) to ``out_path`` plus a manifest.

    Args:
        engine: the loaded pipeline with its rules, K and scorer.
        user_ids: users to export (a sequence of ids: a lone ``str`` is refused, as it would be
            read as one user per character); each gets its stored history and the rows
            ``histories`` has for it (``histories_mode``) -- new users need them.
        histories: ``user_id, item_id[, timestamp, event]`` rows (``TrainedPipeline.histories``:
            without a timestamp they happened "just now", at the pipeline's ``now``).
        chunk_size: users per part (memory grows with it, not with the number of users).
        info: recorded in the manifest and the fingerprint (model URI, run id, config hash ...).
        after_part: called (in the calling thread) with the part number after each part is
            written, whichever worker wrote it (tests use it).
        workers: how many compute parts at once: the calling thread plus a pool of
            ``workers - 1`` (``parallel``), each taking the next part not yet taken. The output
            does not depend on it (each part depends only on its users and the model).
        layout: ``file`` (one parquet file) or ``parts`` (a folder of one parquet file per chunk).
        parallel: ``threads``: the pool's threads share ``engine`` (the compiled loops, products,
            polars and parquet release the GIL); memory is one more chunk per worker.
            ``processes``: a ``spawn`` process pool, each process loading the pipeline again
            from ``engine.recipe`` (``Engine.load``); memory is one more pipeline and chunk per
            worker. On 2 cores threads were 10-30 % faster (docs/benchmarks.md); processes may
            scale further on many cores, where threads would contend for the GIL. A script that
            exports with processes needs the ``if __name__ == "__main__":`` guard (``spawn``
            imports the main module in each worker).
        histories_mode: ``extend`` (a known user's stored events plus its ``histories`` rows,
            all filtered as seen; as ``python -m recsys.recommend``) or ``replace`` (its
            ``histories`` rows alone, as the pyfunc model serves a request's rows).
    """
    if isinstance(user_ids, str | bytes):
        raise TypeError(
            f"user_ids must be a sequence of user ids, got the string {user_ids!r} (it would be read one "
            f"character per user): pass [{user_ids!r}]"
        )
    out_path = check_output(out_path, layout)
    check_parallel(parallel)
    check_histories_mode(histories_mode)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    # Two exports to one output would share one parts folder and delete it under each other.
    with output_lock(out_path):
        users = sorted(set(map(str, user_ids)))
        plan = _plan(engine, users, histories, dict(info or {}), chunk_size, layout, histories_mode)
        work, fingerprint = _parts_folder(out_path, plan)
        if histories is not None:
            histories = histories.with_columns(pl.col(Columns.User).cast(pl.String))
        job = _Job(users, histories, work, chunk_size, final_parts=layout == "parts", histories_mode=histories_mode)
        parts = [_part_file(work, i) for i in range(job.n_parts)]
        done = [p.exists() for p in parts]
        todo = [i for i in range(len(parts)) if not done[i]]
        if sum(done):
            log.info("resuming %s: %d of %d parts already written", out_path, sum(done), len(parts))
        n_workers = max(min(workers, len(todo)), 1)
        if n_workers > 1 and parallel == "processes" and engine.recipe is None:
            raise ConfigError(
                "parallel=processes needs an engine made by Engine.load (worker processes load the pipeline from its "
                "folder); parallel=threads shares this one"
            )
        t0 = time.perf_counter()
        by_worker = [0] * n_workers  # parts computed by the calling thread, then by each worker of the pool
        publish = (_Publisher if layout == "file" else _FolderPublisher)(parts, work, engine.timings)
        bar = (
            _progress_bar(len(users), sum(len(job.block(i)) for i in range(len(parts)) if done[i]))
            if progress
            else None
        )

        def finished(i: int, who: int) -> None:
            done[i] = True
            by_worker[who] += 1
            if bar is not None:
                bar.update(len(job.block(i)))
            if after_part is not None:
                after_part(i)
            publish.advance(done)  # the finished parts go to the output while the workers compute

        try:
            _compute_parts(engine, job, todo, n_workers - 1, parallel, finished)
            if not all(done):
                raise RuntimeError(f"export parts {[i for i in range(len(parts)) if not done[i]][:5]} were not written")
            publish.advance(done)
            publish.close(out_path)
        finally:
            publish.abort()
            if bar is not None:
                bar.close()
        run = {"parts_resumed": len(parts) - len(todo), "workers": n_workers, "parallel": parallel}
        run = {**run, "parts_by_process": by_worker, "fingerprint": fingerprint}
        manifest = _manifest(engine, plan, out_path, work, len(parts), run, time.perf_counter() - t0)
        manifest_path = out_path.with_name(out_path.name.removesuffix(".parquet") + ".manifest.json")
        write_text_atomic(json.dumps(manifest, indent=2, default=str), manifest_path)  # ASCII: same bytes anywhere
        shutil.rmtree(work, ignore_errors=True)
        warn_short_lists(manifest, manifest_path, engine.p.n_candidates if engine.scorer == FUSED else None)
        return ExportResult(out_path, manifest_path, manifest)


def _plan(
    engine: Engine,
    users: list[str],
    histories: pl.DataFrame | None,
    info: dict,
    chunk_size: int,
    layout: str,
    histories_mode: str,
) -> dict[str, Any]:
    """What is exported: its hash names the parts folder, so a rerun with the same plan resumes."""
    return {
        "info": info,
        "k": engine.k,
        "scorer": engine.scorer,
        "rules": engine.rules.rules.describe(),
        "explain": vars(engine.explain),
        "chunk_size": chunk_size,
        "layout": layout,
        "n_users": len(users),
        "users_hash": hashlib.sha256("\n".join(users).encode()).hexdigest()[:16],
        "histories_hash": frame_hash(histories),
        # Only with histories: a plan without them keeps the fingerprint it had (a rerun resumes).
        **({"histories_mode": histories_mode} if histories is not None else {}),
    }


def _parts_folder(out_path: Path, plan: dict[str, Any]) -> tuple[Path, str]:
    """The parts folder of ``plan`` beside ``out_path`` (kept from a killed run of the same plan),
    and the plan's fingerprint that names it."""
    fingerprint = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = out_path.parent / f".{out_path.name}.parts-{fingerprint}"
    work.mkdir(exist_ok=True)
    (work / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True, default=str))
    return work, fingerprint


def _progress_bar(total: int, already: int) -> Any:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="user", desc="export", smoothing=0.1)
    bar.update(already)
    return bar


def _manifest(
    engine: Engine, plan: dict, out_path: Path, work: Path, n_parts: int, run: dict, seconds: float
) -> dict[str, Any]:
    """The manifest: the plan, the counts summed over the parts, how the export ran."""
    rows, removed, counts = 0, Counter(), Counter({name: 0 for name in SERVING_COUNTS})
    ranges = []
    for i in range(n_parts):
        stats = json.loads(_part_file(work, i, ".json").read_text())
        rows += stats["rows"]
        removed.update(stats["removed"])
        counts.update({name: stats.get(name, 0) for name in SERVING_COUNTS})
        if stats.get("score_range") is not None:  # absent in parts written before it was counted
            ranges.append(stats["score_range"])
    if counts["unknown_users_without_history"] or counts["history_rows_with_unknown_items"]:
        log.warning(
            "%s: %d unknown user(s) without history (non-personal lists from the fused and popularity scorers, none "
            "from the others); %d history row(s) with an unknown item ignored",
            out_path,
            counts["unknown_users_without_history"],
            counts["history_rows_with_unknown_items"],
        )
    return {
        **plan["info"],
        "output": str(out_path.resolve()),
        "k": engine.k,
        "scorer": engine.scorer,
        "rules": plan["rules"],
        "removed_by_rule": dict(sorted(removed.items())),
        "score_range": [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None,
        "explain": plan["explain"],
        "rows": rows,
        "users": plan["n_users"],
        **dict(counts),
        "chunk_size": plan["chunk_size"],
        "layout": plan["layout"],
        "parts": n_parts,
        **run,
        "columns": list(OUTPUT_SCHEMA),
        "seconds": round(seconds, 3),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def warn_short_lists(
    manifest: dict[str, Any], manifest_path: Path, candidates: Mapping[str, int] | None = None
) -> None:
    """Log the manifest's ``lists_shorter_than_k``, which a reader of the output would otherwise
    find only there: a warning with what each list rule removed when some lists are short, an
    error naming the rule likely responsible when every list is empty. The export still
    succeeds (a short list is what the rules asked for), but an empty output is rarely what was
    meant: a ``rules.min_score`` read as a probability removes every row of the fused ranker,
    whose scores are LambdaMART raw scores, negative in the reported case (around -3.5).

    ``candidates``: the fused scorer's ``rank.n_candidates`` (``None`` for a single model). The
    fused scorer ranks only each user's candidates, so past their number (e.g. ``k=200`` with the
    default sources, at most 190, fewer where sources agree) every list is short though no rule
    removed anything and the catalogue is far larger: the warning then names that, not the
    catalogue."""
    short, users, k = manifest["lists_shorter_than_k"], manifest["users"], manifest["k"]
    if not short:
        return
    counts = manifest["removed_by_rule"]
    removed = sorted(((counts[name], name) for name in LIST_RULE_SETTINGS if counts.get(name)), reverse=True)
    cold = manifest.get("unknown_users_without_history", 0)
    cold_note = (
        f"; {cold} of the users are unknown to the model and given no history: the {manifest['scorer']} scorer has "
        "no list for them if it reads histories (every scorer but fused and the popularity ones do)"
        if cold
        else ""
    )
    by_rule = ", ".join(f"{LIST_RULE_SETTINGS[name]} removed {n}" for n, name in removed)
    no_rule = (
        "no list rule removed anything; the catalogue less the user's history and the masked items holds fewer than k"
    )
    if candidates:
        no_rule = (
            f"no list rule removed anything; the fused scorer ranks only each user's candidates, the union of each "
            f"source's top-N (rank.n_candidates: {dict(candidates)}, at most {sum(candidates.values())} items, fewer "
            "where sources propose the same item; a user without history gets only the popularity sources'), so a k "
            "beyond them leaves lists short (a single scorer, e.g. scorer=als, ranks the whole catalogue)"
        )
    scale = ""
    if counts.get("min_score") and (span := manifest.get("score_range")) is not None:
        scale = (
            f"; the {manifest['scorer']} scorer's scores range from {span[0]:.4g} to {span[1]:.4g} (its own scale, "
            "not a probability: docs/export.md)"
        )
    if manifest["rows"]:
        log.warning(
            "%d of %d list(s) shorter than k=%d: %s%s (counts in %s)",
            short,
            users,
            k,
            by_rule or no_rule,
            scale + cold_note,
            manifest_path,
        )
        return
    if counts.get("min_score"):
        cause = (
            f"rules.min_score={manifest['rules'].get('min_score')} removed all {counts['min_score']} candidates the "
            f"other rules left{scale}. Lower rules.min_score or set it to null"
        )
    elif cold == users:
        cause = (
            f"every user is unknown to the model and given no history; the {manifest['scorer']} scorer reads a "
            "user's history, so it has no list for them (the fused scorer lists them from popularity; or pass "
            "their events with histories=)"
        )
    elif removed:
        cause = f"{LIST_RULE_SETTINGS[removed[0][1]]} removed the most candidates ({by_rule}){cold_note}"
    else:
        cause = (
            f"no list rule removed anything; the model had no candidates left (removed_by_rule: {dict(counts)})"
            f"{cold_note}"
        )
    log.error("no recommendations: every one of the %d list(s) is empty. %s. Manifest: %s", users, cause, manifest_path)


def check_parallel(parallel: str) -> None:
    """A ``ConfigError`` unless ``parallel`` names a kind of worker (checked before any work)."""
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel must be one of {list(PARALLEL)}, got {parallel!r}")


def check_output(out_path: str | Path, layout: str) -> Path:
    """The output path, once the layout is known and the path can take it (checked before any
    work: the CLI calls it before loading the model)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    out_path = Path(out_path)
    blocked = next((d for d in out_path.parents if d.exists() and not d.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"output {out_path}: {blocked} is a file, not a folder; choose another output path")
    if layout == "file" and out_path.is_dir():
        raise ConfigError(f"output {out_path} is a folder: choose a file name, or layout=parts to replace the folder")
    return out_path


def _write_part(df: pl.DataFrame, path: Path, final: bool) -> None:
    """One part's rows. ``final`` (layout=parts): as published, zstd at level 1 (pyarrow's
    default, as the file layout): 20 % less CPU than polars' 3 for 10 % more bytes. Otherwise
    (layout=file) the part is temporary and read back once by the publish step, which compresses
    the output: a zstd part cost 0.67 CPU-s to write and read back per 400k rows, an uncompressed
    one 0.13 s."""
    if final:
        df.write_parquet(path, compression="zstd", compression_level=1)
    else:
        df.write_parquet(path, statistics=False, compression="uncompressed")


def _part_file(work: Path, i: int, suffix: str = ".parquet") -> Path:
    """Part ``i``'s file in the parts folder ``work`` (``.parquet``: its rows, ``.json``: its counts)."""
    return work / f"part-{i:05d}{suffix}"


@dataclass
class _Job:
    """Which users each part holds, and where it goes."""

    users: list[str]
    histories: pl.DataFrame | None
    work: Path
    chunk_size: int
    final_parts: bool = False  # layout=parts: the parts are the output, compressed as published
    histories_mode: str = "extend"  # what ``histories`` rows do to a stored history (``TrainedPipeline.histories``)

    @property
    def n_parts(self) -> int:
        return (len(self.users) + self.chunk_size - 1) // self.chunk_size

    def block(self, i: int) -> list[str]:
        """The users of part ``i``."""
        return self.users[i * self.chunk_size : (i + 1) * self.chunk_size]

    def given(self, i: int) -> pl.DataFrame | None:
        """The given history rows of part ``i``'s users."""
        if self.histories is None:
            return None
        return self.histories.filter(pl.col(Columns.User).is_in(self.block(i)))

    def compute(self, engine: Engine, i: int) -> None:
        _compute_part(engine, self.work, self.final_parts, i, self.block(i), self.given(i), self.histories_mode)


def _compute_part(
    engine: Engine, work: Path, final: bool, i: int, block: list[str], given: pl.DataFrame | None, mode: str
) -> None:
    """Write part ``i``: its rows and its counts (``mode``: ``TrainedPipeline.histories``)."""
    engine.rules.clear_counts()
    t1 = time.perf_counter()
    ph = engine.p.histories(block, given, mode)
    engine.add_time("history", time.perf_counter() - t1)
    df = engine.recommend(ph)
    t1 = time.perf_counter()
    stats = {
        "rows": df.height,
        "users": len(block),
        "removed": dict(engine.rules.removed),
        "score_range": engine.rules.score_range,
        **_serving_counts(engine, block, given, ph, df),
    }
    _part_file(work, i, ".json").write_text(json.dumps(stats, sort_keys=True))
    # Written atomically: a part that exists is whole.
    write_atomic(_part_file(work, i), lambda tmp: _write_part(df, tmp, final))
    engine.add_time("write_part", time.perf_counter() - t1)


# Counted per part and summed in the manifest (``export_recommendations``).
SERVING_COUNTS = ("unknown_users_without_history", "history_rows_with_unknown_items", "lists_shorter_than_k")


def _serving_counts(engine: Engine, block: list[str], given: pl.DataFrame | None, ph: Any, df: pl.DataFrame) -> dict:
    """What the manifest reports about one part: users the model does not know and who brought no
    usable history (nothing personal to rank on: their lists come from the non-personal sources
    such as popularity), given history rows naming an item outside the catalogue (ignored), and
    users whose list holds fewer than ``k`` items (rules, or a small catalogue)."""
    with_history = np.bincount(ph.history.interactions[Columns.UserIdx].to_numpy(), minlength=len(block)) > 0
    unknown = engine.p.users.index(block) < 0
    ignored = 0
    if given is not None and given.height:
        ignored = given.filter(~pl.col(Columns.Item).is_in(engine.p.items[Columns.Item].implode())).height
    full = df.group_by(Columns.User).len().filter(pl.col("len") >= engine.k).height
    return {
        "unknown_users_without_history": int((unknown & ~with_history).sum()),
        "history_rows_with_unknown_items": int(ignored),
        "lists_shorter_than_k": len(block) - full,
    }


def _compute_parts(
    engine: Engine, job: _Job, todo: list[int], pool_size: int, parallel: str, finished: Callable[[int, int], None]
) -> None:
    """Compute the parts ``todo`` in the calling thread and a pool of ``pool_size`` workers
    (``parallel``), each taking the next part not yet taken. ``finished(part, who)`` is called in
    the calling thread; ``who`` is 0 for it, 1.. for the pool's workers in the order of their
    first part. A worker's error is raised here, as it was raised, once the pool's running parts
    are done."""
    pending, running, who = deque(todo), {}, {}  # running: future -> part; who: worker -> its number

    def collect(block: bool) -> None:
        ready, _ = cf.wait(running, timeout=None if block else 0, return_when=cf.FIRST_COMPLETED)
        for f in ready:
            i = running.pop(f)
            worker, timings = f.result()
            engine.timings.update(timings)
            finished(i, who.setdefault(worker, len(who) + 1))
        while pending and len(running) < room():
            i = pending.popleft()
            running[submit(i)] = i

    try:
        with contextlib.ExitStack() as stack:
            submit, room = _open_pool(stack, engine, job, pool_size, parallel)
            stack.callback(lambda: [f.cancel() for f in running])  # on an error: no other part starts
            while pending:
                i = pending.popleft()
                collect(block=False)
                job.compute(engine, i)
                finished(i, 0)
            for f in [f for f in running if f.cancel()]:  # queued, not started: quicker done here
                i = running.pop(f)
                job.compute(engine, i)
                finished(i, 0)
            while running:
                collect(block=True)
    except cf.BrokenExecutor as e:  # a worker process died, or failed to build its engine
        raise RuntimeError(f"an export worker failed ({e}); its traceback is in its output above") from e


def _open_pool(
    stack: contextlib.ExitStack, engine: Engine, job: _Job, n: int, parallel: str
) -> tuple[Callable[[int], cf.Future], Callable[[], int]]:
    """A pool of ``n`` workers, closed with ``stack`` (after its running parts); returns how to
    submit part ``i`` to it and how many parts it may hold now: two per worker (its next part is
    queued while the calling thread computes its own), one while its processes are still loading
    (a part given to a worker cannot be taken back: the caller may be done before it is loaded)."""
    if n == 0:
        return lambda i: None, lambda: 0
    if parallel == "threads":
        # BLAS's thread pool is process-wide and only the first thread to limit it can: the
        # caller holds the engine's limits until the threads are done (``thread_limits``).
        stack.enter_context(thread_limits(engine.threads))
        threads = stack.enter_context(cf.ThreadPoolExecutor(n, thread_name_prefix="recsys-export"))
        return lambda i: threads.submit(_in_thread, job, engine, i), lambda: 2 * n
    # spawn, not fork: polars' and OpenMP's thread pools do not survive a fork (a child can hang
    # on a pool whose threads stayed in the parent). The users and histories go with each part.
    processes = cf.ProcessPoolExecutor(
        n,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(engine.recipe, job.work, job.final_parts),
    )
    stack.enter_context(processes)
    loaded = [processes.submit(os.getpid) for _ in range(n)]  # done once a worker has built its engine
    return (
        lambda i: processes.submit(_in_process, i, job.block(i), job.given(i), job.histories_mode),
        lambda: 2 * n if any(f.done() for f in loaded) else n,
    )


def _in_thread(job: _Job, engine: Engine, i: int) -> tuple[str, dict]:
    """Part ``i`` in a pool thread, with the caller's engine (its timings are added there)."""
    job.compute(engine, i)
    return threading.current_thread().name, {}


_worker: dict[str, Any] = {}  # in a worker process: its engine and where parts go (``_start_worker``)


def _start_worker(recipe: EngineRecipe, work: Path, final: bool) -> None:
    """A worker process's initializer: exit with the export process, build the engine."""
    t0 = time.perf_counter()
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    engine = recipe.build()
    engine.timings["worker_start"] += time.perf_counter() - t0
    _worker.update(engine=engine, work=work, final=final)


def _exit_with_parent() -> None:
    """A killed export must not leave workers writing parts behind."""
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    os._exit(1)


def _in_process(i: int, block: list[str], given: pl.DataFrame | None, mode: str) -> tuple[int, dict]:
    """Part ``i`` in a worker process; returns the process id and the stage timings since its last part."""
    engine = _worker["engine"]
    _compute_part(engine, _worker["work"], _worker["final"], i, block, given, mode)
    timings = dict(engine.timings)
    engine.timings.clear()
    return os.getpid(), timings


class _FolderPublisher:
    """layout=parts: the finished parts, hard-linked (the parts folder keeps them until the end,
    so a kill at any point leaves a resumable folder) into a folder that replaces the output in
    one rename. An existing output is first moved aside into the parts folder (removed with it):
    a reader sees the old output or the new one, never a mix (between the two renames, for an
    instant, neither)."""

    def __init__(self, parts: Sequence[Path], work: Path, timings: Counter) -> None:
        self.parts, self.work, self.timings = parts, work, timings
        self.tmp = work / f"publish.tmp{os.getpid()}"

    def advance(self, done: Sequence[bool]) -> None:
        """Nothing to do while parts are computed: they are written as published."""

    def close(self, out_path: Path) -> None:
        t0 = time.perf_counter()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        for p in self.parts:
            try:
                os.link(p, self.tmp / p.name)
            except OSError:  # a file system without hard links
                shutil.copyfile(p, self.tmp / p.name)
        if not self.parts:  # no users: one empty file, so that readers see the columns
            _write_part(pl.DataFrame(schema=OUTPUT_SCHEMA), self.tmp / _part_file(self.work, 0).name, final=True)
        if out_path.exists() or out_path.is_symlink():
            os.replace(out_path, self.work / f"previous{os.getpid()}")
        os.replace(self.tmp, out_path)
        self.timings["publish"] += time.perf_counter() - t0

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class _Publisher:
    """Appends the parts, in order, into one zstd parquet file (in the parts folder), as soon as
    each and every part before it is written; ``close`` renames it into place. The same parts
    give the same bytes whenever they are appended, so a resumed run is byte-identical.
    The seconds it spends go to ``timings["publish"]`` (the engine's stage timings)."""

    def __init__(self, parts: Sequence[Path], work: Path, timings: Counter) -> None:
        self.parts, self.next, self.writer, self.timings = parts, 0, None, timings
        self.tmp = work / f"publish.parquet.tmp{os.getpid()}"
        self.schema = pl.DataFrame(schema=OUTPUT_SCHEMA).to_arrow().schema

    def _open(self) -> Any:
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        return self.writer

    def advance(self, done: Sequence[bool]) -> None:
        import pyarrow.parquet as pq

        t0 = time.perf_counter()
        while self.next < len(self.parts) and done[self.next]:
            writer = self._open()
            table = pq.read_table(self.parts[self.next])
            if table.num_rows:
                writer.write_table(table.cast(self.schema))
            self.next += 1
        self.timings["publish"] += time.perf_counter() - t0

    def close(self, out_path: Path) -> None:
        import pyarrow as pa

        t0 = time.perf_counter()
        writer = self._open()
        if not self.parts:
            writer.write_table(pa.Table.from_pylist([], schema=self.schema))
        writer.close()
        self.writer = None
        os.replace(self.tmp, out_path)
        self.timings["publish"] += time.perf_counter() - t0

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.tmp.unlink(missing_ok=True)
