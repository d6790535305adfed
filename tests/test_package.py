"""The package itself: one regular package with its version and type information."""

from __future__ import annotations

import tomllib
from pathlib import Path

import recsys


def test_recsys_is_a_regular_package_with_its_version():
    """Regression: without ``__init__.py`` recsys was a namespace package, so a served model's copy
    of it (MLflow's ``code_paths``, put on ``sys.path``) supplied every submodule not yet imported
    while those already imported stayed the installed ones: two versions in one process."""
    root = Path(recsys.__file__).parent
    assert recsys.__file__ is not None and list(recsys.__path__) == [str(root)]
    project = tomllib.loads((root.parent / "pyproject.toml").read_text())["project"]
    assert recsys.__version__ == project["version"]
    assert (root / "py.typed").is_file()  # type checkers read the public API's hints
