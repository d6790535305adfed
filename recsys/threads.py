"""How many threads torch, BLAS and OpenMP use while a block of users is recommended.

The work is many mid-sized products and small ops, where extra threads mostly spin; callers that
want more cores run more workers (the batch export's ``workers``) instead.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def thread_limits(n: int) -> Iterator[None]:
    """torch, BLAS and OpenMP at ``n`` threads inside, as ``Engine.recommend`` runs.

    OpenMP's setting is per thread, so each caller sets its own. BLAS (OpenBLAS's pthreads
    pool) is process-wide: threadpoolctl lets only the first thread to limit it do so and makes
    the others' calls no-ops, so threads sharing an engine rely on the thread that started them
    holding this around them (the batch export does). torch's setting is process-wide too: the
    first caller in sets it and the last one out restores it."""
    from threadpoolctl import threadpool_limits

    with _torch_threads(n), threadpool_limits(n):
        yield


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS tells it. A batch
    scheduler's allocation (Slurm's cpuset) or ``taskset`` gives a process fewer cores than the
    machine has, which ``os.cpu_count()`` counts."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_TORCH_LOCK = threading.Lock()
_torch_state: list = [0, None]  # callers inside, the setting the first one found


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    # An export that never loaded a text part never imported torch: nothing to limit.
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    with _TORCH_LOCK:
        if _torch_state[0] == 0:
            _torch_state[1] = torch.get_num_threads()
            torch.set_num_threads(n)
        _torch_state[0] += 1
    try:
        yield
    finally:
        with _TORCH_LOCK:
            _torch_state[0] -= 1
            if _torch_state[0] == 0:
                torch.set_num_threads(_torch_state[1])
