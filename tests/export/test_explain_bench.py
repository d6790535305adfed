"""``bench/explain.py`` runs end to end on a small model: it patches the engine's feature
explanations, so a change of that method's signature broke it without any test noticing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_explain_bench_runs_and_its_cache_changes_nothing(tmp_path):
    cmd = [sys.executable, "bench/explain.py", "--chunks", "1", "--chunk", "256", "--trees", "5", "--rounds", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["same_output"] is True
    assert result["explained_rows_per_chunk"] == 3 * 256  # ranks 1-3 of each user
