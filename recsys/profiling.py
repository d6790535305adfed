"""Wall time and peak memory per stage of a job, logged as ``time/<stage>_s`` and ``mem/<stage>_peak_mb``.

The peak of a stage is the process's high-water mark of resident memory (``VmHWM``) since the
previous stage ended: Linux resets that mark when ``5`` is written to ``/proc/self/clear_refs``.
Where that file is missing or read-only the recorded figure is the peak since the process started
(``peak_is_per_stage`` is then False).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recsys.errors import InputError, require_number

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_mb() -> float | None:
    """The process's peak resident memory (MB) since start or the last ``reset_peak_rss``; None off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Restart the peak-memory mark at the current resident size; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@functools.cache
def _malloc_trim():  # glibc's malloc_trim, or None (musl, macOS, Windows)
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_free_memory() -> bool:
    """Hand the heap memory freed so far back to the OS; False where the C library cannot.

    glibc keeps freed blocks for reuse, and after a large array is freed it serves arrays of up
    to 32 MB from that heap instead of fresh mappings: a stage's temporaries then stay resident
    under the next stage's. Trimming at each stage's end keeps them out of the later peaks
    (at 10x the report's peak fell from 3,333 to 2,357 MiB, docs/design.md "Scale"); it takes milliseconds.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class StageTimings(dict):
    """``{stage: seconds}``; setting an entry closes that stage and records its peak memory.

    Stages are contiguous: a stage's memory window runs from the previous ``timings[...] = ``
    (or the creation of this object) to its own, so work between two timed blocks is charged to
    the next stage. ``total`` is not a window: its peak is the largest of all. Closing a stage
    returns the memory it freed to the OS (``release_free_memory``).

    >>> t = StageTimings()
    >>> t["load"] = 1.5
    >>> dict(t), sorted(t.peak_mb) == (["load"] if t.peak_mb else [])
    ({'load': 1.5}, True)
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak_mb: dict[str, float] = {}
        self.peak_is_per_stage = reset_peak_rss()

    def __setitem__(self, stage: str, seconds: float) -> None:
        super().__setitem__(stage, seconds)
        peak = peak_rss_mb()
        if peak is None:
            return
        if stage == "total":
            self.peak_mb[stage] = max([peak, *self.peak_mb.values()])
            return
        self.peak_mb[stage] = peak
        release_free_memory()
        if self.peak_is_per_stage:
            reset_peak_rss()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (recorded only when the block finishes without error).

        >>> t = StageTimings()
        >>> with t.stage("fit"):
        ...     pass
        >>> list(t)
        ['fit']
        """
        t0 = time.perf_counter()
        yield
        self[name] = time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        """``time/<stage>_s`` and ``mem/<stage>_peak_mb`` for MLflow."""
        out = {f"time/{k}_s": v for k, v in self.items()}
        out.update({f"mem/{k}_peak_mb": v for k, v in self.peak_mb.items()})
        return out


# The peak-memory estimate of a training job, from row counts. The libraries, the encoder and
# MLflow take about 1 GB whatever the data. The ranker's candidate rows (its taught users x the sum
# of rank.n_candidates, 190 slots of which the union holds ~160 a user): its frames, ~35 feature
# columns, the copies polars makes while joining them and LightGBM's dataset, all held while it
# trains. Evaluated users: the test stage ranks them a block at a time, so what grows with them is
# what it keeps, each model's top-eval.max_k lists (8 models x 100 items and scores) and their
# metrics, and the copies made while joining the blocks' lists. Events: the raw frame, the splits,
# each stage's user x item matrices and CF factors, and the histories the saved pipelines hold.
# Items: their tokens, the embedding tables and the item-kNN neighbours. Fitted to the peaks of
# `python bench/scale.py` runs (2-core machine, 2026-12-05: 1.59, 3.42 and 11.14 GB at 1x, 10x and
# 100x with every test user evaluated, 8.01 GB at 100x on the default sample of 50,000) and of
# Amazon-Scientific's job (1.86 GB), and rounded up: they say 1.78, 3.63, 11.93, 8.68 and 2.16 GB
# there, 6-16 % high. The peak is ranker training at 1x and 10x, the evaluation at 100x with every
# user, the model save (CF refit on every event, each saved pipeline loaded back once) on the sample.
# A CF fit that holds much beyond the data (``Recommender.fit_memory_gb``: SASRec's full softmax,
# EASE's dense matrix) peaks before any candidate row exists: the estimate is the larger moment.
BASE_GB = 1.0
BYTES_PER_CANDIDATE_ROW = 600
BYTES_PER_EVALUATED_USER = 13_000
BYTES_PER_EVENT = 1000
BYTES_PER_ITEM = 7000


def estimate_peak_gb(
    n_events: int,
    n_items: int,
    ranker_users: int,
    eval_users: int,
    candidates_per_user: int,
    cf_fit_gb: float = 0.0,
) -> float:
    """Estimated peak resident memory (GB) of ``recsys.train`` from its row counts.

    The ranker holds the candidate rows of its ``ranker_users`` while it trains; the test stage
    builds the ``eval_users``' candidates a block at a time and keeps their lists. ``cf_fit_gb``:
    what the hungriest CF fit holds beyond the data (``Recommender.fit_memory_gb``: SASRec's
    logits, EASE's dense matrix), on top of what the job holds while CF is fitted (the data,
    before any candidate row): the peak is the larger of the two moments.

    >>> round(estimate_peak_gb(42_000, 1_500, 6_000, 3_000, 190), 2)
    1.78
    >>> round(estimate_peak_gb(42_000, 1_500, 6_000, 3_000, 190, cf_fit_gb=2.0), 2)
    3.05
    """
    data = n_events * BYTES_PER_EVENT + n_items * BYTES_PER_ITEM
    rows = ranker_users * candidates_per_user * BYTES_PER_CANDIDATE_ROW + eval_users * BYTES_PER_EVALUATED_USER
    return BASE_GB + max(data + rows, data + cf_fit_gb * 1e9) / 1e9


def memory_limit_gb() -> float | None:
    """This process's memory limit: the cgroup's (containers, CI runners) or else the machine's RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text) / 1e9
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(
    n_events: int,
    n_items: int,
    ranker_users: int,
    eval_users: int,
    candidates_per_user: int,
    limit_gb: float | None = None,
    cf_fit: tuple[str, float] | None = None,
) -> float:
    """The estimated peak (GB); an ``InputError`` before any training when it exceeds ``limit_gb``
    (default: ``memory_limit_gb()``), naming the counts and the settings that lower it.
    ``cf_fit``: the CF model whose fit holds the most beyond the data, and how much (GB)."""
    require_number("memory_limit_gb", limit_gb, 0, low_open=True, optional=True)
    fit_name, fit_gb = cf_fit or ("", 0.0)
    need = estimate_peak_gb(n_events, n_items, ranker_users, eval_users, candidates_per_user, fit_gb)
    limit = memory_limit_gb() if limit_gb is None else limit_gb
    if limit is not None and need > limit:
        rows = estimate_peak_gb(n_events, n_items, ranker_users, eval_users, candidates_per_user)
        if rows >= need:
            lower = "Lower rank.max_train_users, eval.max_users or rank.n_candidates"
        else:  # the CF fit is the peak
            lower = f"Fitting cf.{fit_name} alone holds about {fit_gb:.1f} GB: drop it or make it smaller"
        raise InputError(
            f"the job needs about {need:.1f} GB of memory and the limit is {limit:.1f} GB "
            f"({n_events:,} events, {n_items:,} items, ranker trained on {ranker_users:,} users and "
            f"{eval_users:,} users evaluated, {candidates_per_user} candidates each; estimate: "
            f"recsys/profiling.py). {lower}, or raise memory_limit_gb on a larger machine"
        )
    return need
