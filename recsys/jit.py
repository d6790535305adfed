"""``njit``: numba's compiler with an on-disk cache keyed by the source file's content.

numba caches a compiled function beside its module (``__pycache__``), so every copy of the
package compiles again: the checkout, an installed wheel, and each registered model, whose
pyfunc carries its own copy of ``recsys`` (``code_paths``). A served model's first request then
spent ~9 s compiling. Here the cache folder is named after the module's name and a hash of its
bytes, in one user-wide folder (``$NUMBA_CACHE_DIR``, else ``~/.cache/recsys/numba``), so every
copy of the same code shares one compiled cache. numba already checks the cached code against
the same content hash; where the folder is not writable numba's own locators take over.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
from numba.core import caching

MARK = "__recsys_jit__"


def cache_root() -> Path:
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        return Path(configured, "recsys")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "recsys", "numba")


class ContentCacheLocator(caching.UserWideCacheLocator):
    """numba's user-wide locator, with the folder named by the file's content instead of its path."""

    def __init__(self, py_func: Callable, py_file: str) -> None:
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        digest = hashlib.sha256(Path(py_file).read_bytes()).hexdigest()[:20]
        self._cache_path = str(cache_root() / f"{Path(py_file).stem}-{digest}")

    @classmethod
    def from_function(cls, py_func: Callable, py_file: str) -> ContentCacheLocator | None:
        if not getattr(py_func, MARK, False) or not os.path.isfile(py_file):
            return None  # another library's function, or one without a source file
        return super().from_function(py_func, py_file)


if ContentCacheLocator not in caching.CacheImpl._locator_classes:
    caching.CacheImpl._locator_classes.insert(0, ContentCacheLocator)


def njit(**options: Any) -> Callable[[Callable], Callable]:
    """``numba.njit(**options)`` whose ``cache=True`` uses the content-keyed cache."""

    def wrap(func: Callable) -> Callable:
        setattr(func, MARK, True)
        return numba.njit(**options)(func)

    return wrap
