"""The test suite's own settings (``[tool.pytest.ini_options]`` in pyproject.toml)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tomllib

from conftest import REPO_ROOT


def test_a_crashed_worker_fails_the_run_instead_of_hanging_it(tmp_path):
    """Regression: a test that killed its xdist worker (a segfault in native code) left the whole
    run hanging until CI's time ran out. xdist 3.8 with ``--dist loadfile`` replaces the worker
    and then hangs or sends the crashed test to each replacement in turn. With
    ``--max-worker-restart=0`` the other worker runs the rest and the run ends, failed, naming
    the test (a run that hangs fails here at the timeout)."""
    crash = "import os, signal\n\ndef test_crash():\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
    (tmp_path / "test_crash.py").write_text(crash)
    passing = "import pytest\n\n@pytest.mark.parametrize('i', range(5))\ndef test_ok(i):\n    pass\n"
    for name in ("test_one.py", "test_two.py"):
        (tmp_path / name).write_text(passing)
    addopts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    (tmp_path / "pytest.ini").write_text(f"[pytest]\naddopts = {addopts}\n")  # the suite's options only
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:faulthandler", str(tmp_path)]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as hung:
        raise AssertionError(f"the run hung after its worker crashed: {shlex.join(cmd)}") from hung
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 failed, 10 passed" in proc.stdout, proc.stdout[-3000:]
    assert "test_crash.py::test_crash - worker 'gw" in proc.stdout, proc.stdout[-3000:]
