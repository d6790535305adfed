"""recsys.jit: every copy of the same code shares one compiled cache (a registered model carries
its own copy of the package, and its first request must not compile again)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SOURCE = """
from recsys.jit import njit


@njit(cache=True, nogil=True)
def triple(x):
    return 3 * x
"""


def load(folder: Path, name: str, source: str = SOURCE):
    folder.mkdir(parents=True)
    (folder / "kernel.py").write_text(source)
    spec = importlib.util.spec_from_file_location(name, folder / "kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_copy_elsewhere_loads_the_first_copys_compiled_code(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    first = load(tmp_path / "checkout", "kernel_first")
    assert first.triple(2) == 6
    assert first.triple.stats.cache_misses and not first.triple.stats.cache_hits  # compiled here
    assert Path(first.triple.stats.cache_path).is_relative_to(tmp_path / "cache")

    copy = load(tmp_path / "model" / "code", "kernel_copy")  # same bytes, another folder
    assert copy.triple(2) == 6
    assert copy.triple.stats.cache_hits and not copy.triple.stats.cache_misses

    changed = load(tmp_path / "edited", "kernel_edited", SOURCE.replace("3 * x", "4 * x"))
    assert changed.triple(2) == 8  # other bytes: its own cache, never the stale one
    assert changed.triple.stats.cache_misses and not changed.triple.stats.cache_hits


def test_other_functions_keep_numbas_own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    plain = load(
        tmp_path / "plain", "kernel_plain", SOURCE.replace("from recsys.jit import njit", "from numba import njit")
    )
    assert plain.triple(2) == 6
    assert not Path(plain.triple.stats.cache_path).is_relative_to(tmp_path / "cache" / "recsys")
