"""Layering: a module imports only the layers below it (evaluation never imports the export)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EVALUATION = sorted(f"recsys.evaluation.{p.stem}" for p in (REPO_ROOT / "recsys" / "evaluation").glob("[!_]*.py"))


def loaded_after_import(modules: list[str]) -> set[str]:
    """The recsys modules a fresh interpreter holds after importing ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('recsys'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.slow
def test_evaluation_imports_no_layer_above_it():
    assert EVALUATION, "no evaluation modules found"
    loaded = loaded_after_import(EVALUATION)
    above = {
        m
        for m in loaded
        if m.split(".")[1:2] and m.split(".")[1] in {"export", "rank", "text", "pipeline", "train", "recommend"}
    }
    assert not above, f"recsys.evaluation imports {sorted(above)}"
