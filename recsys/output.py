"""What every stage that writes recommendations shares: the table ``user_id, item_id, score,
rank, source`` from index arrays, and the lock that keeps two writers off one output."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl

from recsys.columns import RECOMMENDATION_SCHEMA, Columns
from recsys.data.dataset import Dataset
from recsys.errors import ConfigError

_HELD: dict[Path, int] = {}  # output lock file -> how many times this process holds it


def recommendations_frame(
    dataset: Dataset, users: np.ndarray, items: np.ndarray, scores: np.ndarray, sources: np.ndarray | None = None
) -> pl.DataFrame:
    """``user_id, item_id, score, rank, source`` from ``[n_users, K]`` arrays (-1 = no item)."""
    k = items.shape[1]
    keep = items.ravel() >= 0
    src = sources.ravel()[keep] if sources is not None else np.full(int(keep.sum()), "", dtype=object)
    df = pl.DataFrame(
        {
            Columns.User: dataset.users.ids[np.repeat(users, k)[keep]].tolist(),
            Columns.Item: dataset.item_ids.ids[items.ravel()[keep]].tolist(),
            Columns.Score: scores.ravel()[keep].astype(np.float64),
            Columns.Rank: np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))[keep],
            Columns.Source: src.tolist(),
        },
        schema=RECOMMENDATION_SCHEMA,
    )
    return df.sort(Columns.User, Columns.Rank)


def lock_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f".{out_path.name}.lock")


EXPORT_BUSY = (
    "another export is writing {out} now (lock {lock} held by process {holder}); wait for it to finish or "
    "choose another output"
)


@contextmanager
def output_lock(out_path: str | Path, busy: str = EXPORT_BUSY) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``.<output name>.lock`` beside ``out_path`` while writing it:
    a second process exporting to the same output is refused at once with a ``ConfigError``
    naming the lock (two writers would share and delete each other's parts folder). The kernel
    releases the lock when the holder exits, also on ``kill -9`` (the file then stays, empty or
    with the dead pid, and is reused). Re-entrant within one process (flock would refuse a second
    descriptor of the same process). ``busy``: the refusal, formatted with ``out``, ``lock`` and
    ``holder`` (the holder's pid)."""
    lock = lock_path(out_path).absolute()
    if lock in _HELD:
        _HELD[lock] += 1
        try:
            yield lock
        finally:
            _HELD[lock] -= 1
        return
    fd = _acquire(lock, out_path, busy)
    _HELD[lock] = 1
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield lock
    finally:
        del _HELD[lock]
        lock.unlink(missing_ok=True)  # before the unlock: a waiting process then sees a new file
        os.close(fd)  # closing the descriptor releases the flock


def _acquire(lock: Path, out_path: str | Path, busy: str) -> int:
    """An open descriptor of ``lock`` holding its flock, or a ``ConfigError`` if another holds it."""
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot write beside the output {out_path}: {e.strerror} ({lock})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(busy.format(out=out_path, lock=lock, holder=holder)) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and our lock: take the new one
