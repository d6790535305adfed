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

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.columns import Columns
from recsys.errors import ConfigError
from recsys.export.engine import FUSED, OUTPUT_SCHEMA, Engine, thread_limits
from recsys.export.writer import output_lock, write_atomic, write_text_atomic

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


def _holding_output_lock(export: Callable[..., ExportResult]) -> Callable[..., ExportResult]:
    """Run ``export`` holding the output's lock (``output_lock``): two exports to one output at a
    time would share one parts folder and delete it under each other."""

    @functools.wraps(export)
    def locked(engine: Engine, user_ids: Sequence[str], out_path: str | Path, *args: Any, **kwargs: Any):
        with output_lock(out_path):
            return export(engine, user_ids, out_path, *args, **kwargs)

    return locked


@_holding_output_lock
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
) -> ExportResult:
    """Write top-K for ``user_ids`` (exported in sorted order) to ``out_path`` plus a manifest.

    Args:
        engine: the loaded pipeline with its rules, K and scorer.
        user_ids: users to export; each gets its stored history unless ``histories`` has rows
            for it (which then replace it -- new users need them).
        histories: ``user_id, item_id[, timestamp, event]`` rows.
        chunk_size: users per part (memory grows with it, not with the number of users).
        info: recorded in the manifest and the fingerprint (model URI, run id, config hash ...).
        after_part: called (in the calling thread) with the part number after each part is
            written, whichever worker wrote it (tests use it).
        workers: how many compute parts at once, each taking the next part not yet taken: the
            calling thread plus ``workers - 1`` others (``parallel``). The output does not depend
            on it (each part depends only on its users and the model).
        layout: ``file`` (one parquet file) or ``parts`` (a folder of one parquet file per chunk).
        parallel: ``threads``: the other workers are threads of this process sharing ``engine``
            (the compiled loops, products, polars and parquet release the GIL); memory is one
            more chunk per worker. ``processes``: they are processes started with ``spawn``,
            each loading the pipeline again from ``engine.recipe`` (``Engine.load``); memory is
            one more pipeline and chunk per worker. On 2 cores threads were 10-30 % faster
            (docs/benchmarks.md); processes may scale further on many cores, where threads
            would contend for the GIL.
    """
    out_path = check_output(out_path, layout)
    check_parallel(parallel)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    users = sorted(set(map(str, user_ids)))
    info = dict(info or {})
    plan = {
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
    }
    fingerprint = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]
    work = out_path.parent / f".{out_path.name}.parts-{fingerprint}"
    work.mkdir(exist_ok=True)
    (work / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True, default=str))
    if histories is not None:
        histories = histories.with_columns(pl.col(Columns.User).cast(pl.String))

    parts = [_part_file(work, i) for i in range((len(users) + chunk_size - 1) // chunk_size)]
    done = [p.exists() for p in parts]
    resumed = sum(done)
    if resumed:
        log.info("resuming %s: %d of %d parts already written", out_path, resumed, len(parts))
    todo = [i for i in range(len(parts)) if not done[i]]
    n_workers = min(workers, len(todo))
    if n_workers > 1 and parallel == "processes" and engine.recipe is None:
        raise ConfigError(
            "parallel=processes needs an engine made by Engine.load (worker processes load the pipeline from its "
            "folder); parallel=threads shares this one"
        )
    bar = None
    t0 = time.perf_counter()
    job = _Job(users, histories, work, chunk_size, todo, final_parts=layout == "parts")
    by_process = [0] * max(n_workers, 1)  # parts computed by this process, then by each worker
    pool = None
    publisher = (
        _Publisher(parts, work, engine.timings) if layout == "file" else _FolderPublisher(parts, work, engine.timings)
    )
    try:
        if n_workers > 1:
            pool = (_Threads if parallel == "threads" else _Workers)(engine, job, n_workers - 1)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(users), unit="user", desc="export", smoothing=0.1)
            bar.update(sum(len(job.block(i)) for i in range(len(parts)) if done[i]))

        def finished(i: int, who: int = 0) -> None:
            done[i] = True
            by_process[who] += 1
            if bar is not None:
                bar.update(len(job.block(i)))
            if after_part is not None:
                after_part(i)

        counter = pool.counter if pool is not None else _LocalCounter()
        while (j := _claim(counter, len(todo))) is not None:
            job.compute(engine, todo[j])
            finished(todo[j])
            if pool is not None:
                pool.poll(finished, block=False)
            publisher.advance(done)  # the finished parts go to the output while the workers compute
        if pool is not None:
            pool.poll(finished, block=False)
            pool.drop_idle()
            while pool.running():
                pool.poll(finished, block=True)
                publisher.advance(done)
            engine.timings.update(pool.timings)
        if not all(done):
            missing = [i for i in range(len(parts)) if not done[i]]
            raise RuntimeError(f"export parts {missing[:5]} were not written")
        elapsed_compute = time.perf_counter() - t0
        publisher.advance(done)
        publisher.close(out_path)
    finally:
        if pool is not None:
            pool.stop()
        publisher.abort()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    log.debug("computed in %.1f s, published in %.1f s", elapsed_compute, elapsed - elapsed_compute)

    rows, removed, counts = 0, Counter(), Counter({name: 0 for name in SERVING_COUNTS})
    for i in range(len(parts)):
        stats = json.loads(_part_file(work, i, ".json").read_text())
        rows += stats["rows"]
        removed.update(stats["removed"])
        counts.update({name: stats.get(name, 0) for name in SERVING_COUNTS})
    if counts["unknown_users_without_history"] or counts["history_rows_with_unknown_items"]:
        log.warning(
            "%s: %d unknown user(s) without history (served non-personal lists); %d history row(s) with an unknown "
            "item ignored",
            out_path,
            counts["unknown_users_without_history"],
            counts["history_rows_with_unknown_items"],
        )
    manifest = {
        **info,
        "output": str(out_path.resolve()),
        "k": engine.k,
        "scorer": engine.scorer,
        "rules": engine.rules.rules.describe(),
        "removed_by_rule": dict(sorted(removed.items())),
        "explain": vars(engine.explain),
        "rows": rows,
        "users": len(users),
        **dict(counts),
        "chunk_size": chunk_size,
        "layout": layout,
        "parts": len(parts),
        "parts_resumed": resumed,
        "workers": max(n_workers, 1),
        "parallel": parallel,
        "parts_by_process": by_process,
        "fingerprint": fingerprint,
        "columns": list(OUTPUT_SCHEMA),
        "seconds": round(elapsed, 3),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    manifest_path = out_path.with_name(out_path.name.removesuffix(".parquet") + ".manifest.json")
    write_text_atomic(json.dumps(manifest, indent=2, default=str), manifest_path)  # ASCII: same bytes anywhere
    shutil.rmtree(work, ignore_errors=True)
    return ExportResult(out_path, manifest_path, manifest)


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
    """What every process needs to compute part ``i`` (picklable: sent to the workers)."""

    users: list[str]
    histories: pl.DataFrame | None
    work: Path
    chunk_size: int
    todo: list[int]
    final_parts: bool = False  # layout=parts: the parts are the output, compressed as published

    def block(self, i: int) -> list[str]:
        """The users of part ``i``."""
        return self.users[i * self.chunk_size : (i + 1) * self.chunk_size]

    def compute(self, engine: Engine, i: int) -> None:
        block = self.block(i)
        engine.rules.removed.clear()
        given = None
        if self.histories is not None:
            given = self.histories.filter(pl.col(Columns.User).is_in(block))
        t1 = time.perf_counter()
        ph = engine.p.histories(block, given)
        engine.add_time("history", time.perf_counter() - t1)
        df = engine.recommend(ph)
        t1 = time.perf_counter()
        stats = {
            "rows": df.height,
            "users": len(block),
            "removed": dict(engine.rules.removed),
            **_serving_counts(engine, block, given, ph, df),
        }
        _part_file(self.work, i, ".json").write_text(json.dumps(stats, sort_keys=True))
        # Written atomically: a part that exists is whole.
        write_atomic(_part_file(self.work, i), lambda tmp: _write_part(df, tmp, self.final_parts))
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


class _LocalCounter:
    """``multiprocessing.Value``'s interface for a process working alone."""

    def __init__(self) -> None:
        self.value = 0

    def get_lock(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()


class _ThreadCounter(_LocalCounter):
    """``multiprocessing.Value``'s interface for threads of one process."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock


def _claim(counter: Any, n: int) -> int | None:
    """The next index below ``n`` that no process has taken (``counter``: shared by them)."""
    with counter.get_lock():
        j = counter.value
        counter.value = j + 1
    return j if j < n else None


class _Threads:
    """``n`` threads of this process computing parts with the caller's engine (``_Workers``'
    interface). A thread's error stops the others after their current part and is raised again
    in the caller, as it was raised."""

    def __init__(self, engine: Engine, job: _Job, n: int) -> None:
        import queue

        # BLAS's thread pool is process-wide and only the first thread to limit it can: the
        # caller holds the engine's limits until the threads are done (``thread_limits``).
        self._limits = contextlib.ExitStack()
        self._limits.enter_context(thread_limits(engine.threads))
        self.counter = _ThreadCounter()
        self.timings: Counter = Counter()  # the threads add theirs to the shared engine's directly
        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._alive = n
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._run, args=(engine, job, w), name=f"recsys-export-{w + 1}", daemon=True)
            for w in range(n)
        ]
        for t in self._threads:
            t.start()

    def _run(self, engine: Engine, job: _Job, w: int) -> None:
        try:
            while not self._stop.is_set() and (j := _claim(self.counter, len(job.todo))) is not None:
                job.compute(engine, job.todo[j])
                self._events.put(("part", job.todo[j], w))
        except BaseException as e:  # raised again by the caller's poll
            self._stop.set()
            self._events.put(("error", e, w))
        finally:
            self._events.put(("end", None, w))

    def running(self) -> bool:
        return self._alive > 0

    def drop_idle(self) -> None:
        """Threads start at once: none is ever still loading."""

    def poll(self, finished: Callable[[int, int], None], block: bool) -> None:
        import queue

        while True:
            try:
                kind, value, w = self._events.get(block=block)
            except queue.Empty:
                return
            block = False  # after the first event, only what is already waiting
            if kind == "part":
                finished(value, 1 + w)
            elif kind == "error":
                self._error = self._error or value
            else:
                self._alive -= 1
            if self._error is not None:
                self.stop()
                raise self._error

    def stop(self) -> None:
        """Let the threads finish the part they are computing, and take no other."""
        self._stop.set()
        for t in self._threads:
            t.join()
        self._alive = 0
        self._limits.close()


class _Workers:
    """``n`` worker processes taking parts from a shared counter; each reports the parts it
    wrote, then its stage timings, through a pipe."""

    def __init__(self, engine: Engine, job: _Job, n: int) -> None:
        import multiprocessing as mp

        # spawn, not fork: polars' and OpenMP's thread pools do not survive a fork (a child can
        # hang on a pool whose threads stayed in the parent).
        ctx = mp.get_context("spawn")
        self.counter = ctx.Value("q", 0)
        self.timings: Counter = Counter()
        self.procs, self.conns, self.errors = [], [], []
        self.ids = {}  # pipe -> worker number
        self.ready = set()  # pipes of the workers that have loaded the pipeline
        for w in range(n):
            recv, send = ctx.Pipe(duplex=False)
            job_recv, job_send = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker_main,
                args=(job_recv, self.counter, send, os.getpid()),
                name=f"recsys-export-{w + 1}",
                daemon=True,
            )
            _start_without_main(proc)
            send.close()
            job_recv.close()
            # The job (user list, histories, rules) goes through a pipe of our own, from a thread:
            # the worker reads it only after its imports, and if it dies first the send fails
            # instead of blocking (the start() of a large process object can block for ever).
            threading.Thread(target=_send_job, args=(job_send, (engine.recipe, job)), daemon=True).start()
            self.procs.append(proc)
            self.conns.append(recv)
            self.ids[recv] = w

    def running(self) -> bool:
        return bool(self.conns)

    def drop_idle(self) -> None:
        """Stop the workers still loading the pipeline: once every part is taken, they would
        find none left (a small export can end before a worker is ready)."""
        for conn in [c for c in self.conns if c not in self.ready]:
            # Killed before its pipe is closed: a worker must not fail on a closed pipe first.
            proc = self.procs[self.conns.index(conn)]
            proc.kill()
            proc.join()
            self._forget(conn)

    def _forget(self, conn: Any) -> Any:
        """Close ``conn`` and stop tracking its worker; returns the worker's process."""
        proc = self.procs.pop(self.conns.index(conn))
        self.conns.remove(conn)
        conn.close()
        return proc

    def poll(self, finished: Callable[[int, int], None], block: bool) -> None:
        from multiprocessing.connection import wait

        for conn in wait(self.conns, timeout=None if block else 0):
            while conn in self.conns and conn.poll(0):  # every message waiting on this pipe
                self._receive(conn, finished)

    def _receive(self, conn: Any, finished: Callable[[int, int], None]) -> None:
        try:
            msg = conn.recv()
        except EOFError:  # the worker is gone
            proc = self._forget(conn)
            proc.join(timeout=30)
            if self.errors or proc.exitcode != 0:
                detail = "\n".join(self.errors) or f"{proc.name} exited with code {proc.exitcode}"
                raise RuntimeError(f"an export worker failed:\n{detail}") from None
            return
        kind = msg[0]
        if kind == "part":
            finished(msg[1], 1 + self.ids[conn])
        elif kind == "ready":
            self.ready.add(conn)
        elif kind == "timings":
            self.timings.update(msg[1])
        elif kind == "error":
            self.errors.append(msg[1])

    def stop(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        for conn in self.conns:
            conn.close()


def _start_without_main(proc: Any) -> None:
    """``proc.start()`` without the caller's ``__main__`` module: ``spawn`` would re-run the
    caller's script in the worker (and fail on scripts without an ``if __name__ ==
    "__main__"`` guard); the worker needs only ``recsys`` and what it is sent."""
    import types

    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        proc.start()
    finally:
        sys.modules["__main__"] = main


def _send_job(conn: Any, job: Any) -> None:
    try:
        conn.send(job)
    except OSError:  # the worker is gone: the parent learns it from the worker's pipe
        pass
    finally:
        conn.close()


def _worker_main(job_conn: Any, counter: Any, conn: Any, parent: int) -> None:
    """A worker process: build the engine, then compute parts until none is left."""
    _die_with_parent(parent)
    try:
        t0 = time.perf_counter()
        recipe, job = job_conn.recv()
        job_conn.close()
        if recipe.scorer == FUSED:
            _import_lightgbm_bare()
        engine = recipe.build()
        engine.timings["worker_start"] += time.perf_counter() - t0
        conn.send(("ready",))
        while (j := _claim(counter, len(job.todo))) is not None:
            job.compute(engine, job.todo[j])
            conn.send(("part", job.todo[j]))
            if os.getppid() != parent:
                return
        conn.send(("timings", dict(engine.timings)))
    except BaseException:
        import traceback

        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


# What lightgbm imports for its scikit-learn, pandas, dask and arrow integrations, if installed.
LIGHTGBM_EXTRAS = ("sklearn", "pandas", "dask", "pyarrow", "cffi", "matplotlib", "graphviz")


def _import_lightgbm_bare() -> None:
    """Import lightgbm without the integrations in ``LIGHTGBM_EXTRAS``: a worker only calls
    ``Booster.predict`` on numpy, and importing scikit-learn and pandas was 1.3 s of lightgbm's
    1.6 s, by which a fused export's worker started later (docs/benchmarks.md). Only in the
    export's own worker processes: lightgbm's scikit-learn API stays off in them for good.
    Modules already imported are left as they are; the others can be imported normally after."""
    if "lightgbm" in sys.modules:
        return
    hidden = [m for m in LIGHTGBM_EXTRAS if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # makes ``import m`` raise ImportError
    try:
        import lightgbm  # noqa: F401
    finally:
        for m in hidden:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (a killed export must not leave
    workers writing parts behind)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the workers check their parent between parts
        pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


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
