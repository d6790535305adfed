"""Atomic writes: a file appears whole under its name or not at all, even after kill -9.

Below every layer that writes results (evaluation, export, training), so none of them imports
another to get it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import polars as pl


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary name in the same folder, then rename it to ``path``
    (atomic on one file system): a reader never sees a half-written file, even after kill -9."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_parquet_atomic(df: pl.DataFrame, path: str | Path) -> Path:
    return write_atomic(path, df.write_parquet)


def write_text_atomic(text: str, path: str | Path) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))
