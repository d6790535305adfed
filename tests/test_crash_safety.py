"""kill -9 during training resumes from the last checkpoint; kill -9 during a write never leaves a
partial file under the final name."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from reliability_support import SMOKE, checked, command, env, reference_run, run_cli, session_root

from recsys.atomic import write_parquet_atomic


@pytest.mark.slow
def test_kill_during_training_then_rerun_resumes_and_matches_an_uninterrupted_run():
    ref = reference_run()
    root = session_root()
    resume_root = root / "outputs" / "checkpoints"
    assert not resume_root.exists() or not any(resume_root.iterdir()), "a finished run leaves no resume state"

    (root / "cwd").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        command(root, "killed", *SMOKE), cwd=root / "cwd", env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while not list(resume_root.glob("*/last.ckpt")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    [folder] = [p for p in resume_root.iterdir() if p.is_dir()]
    assert not (folder / "done.json").exists(), "killed after training had finished: nothing to resume"
    assert not (root / "killed" / "recommendations.parquet").exists()

    # The same command again: it must continue from last.ckpt, not start over.
    again = checked(run_cli(root, "killed", *SMOKE))
    log = again.stdout + again.stderr
    assert f"resuming from {folder / 'last.ckpt'} (epoch " in log, log[-3000:]
    done = int(log.split(f"resuming from {folder / 'last.ckpt'} (epoch ")[1].split(" ")[0])
    assert 1 <= done < 3

    # ... and end exactly where the uninterrupted run ended.
    assert (root / "killed" / "metrics.csv").read_text() == (ref.out / "metrics.csv").read_text()
    rec = "recommendations.parquet"
    assert (root / "killed" / rec).read_bytes() == (ref.out / rec).read_bytes()
    # A finished run removes its resume state and keeps the best checkpoint in its run folder.
    assert not folder.exists()
    assert (root / "killed" / "checkpoints" / "best.ckpt").is_file()


def frames() -> list[pl.DataFrame]:
    return [pl.DataFrame({"user_id": [f"u{i}" for i in range(200_000)], "score": [float(v)] * 200_000}) for v in (1, 2)]


def test_writer_failing_halfway_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "recommendations.parquet"
    old, new = frames()
    write_parquet_atomic(old, path)
    real = pl.DataFrame.write_parquet

    def half_then_crash(self, file, *args, **kwargs):
        real(self, file, *args, **kwargs)
        Path(file).write_bytes(Path(file).read_bytes()[:1000])  # a partial file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(new, path)
    monkeypatch.undo()
    assert pl.read_parquet(path).equals(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "temporary file left behind"


WRITER = """
import sys, polars as pl
from recsys.atomic import write_parquet_atomic
n = 200_000
frames = [pl.DataFrame({"user_id": [f"u{i}" for i in range(n)], "score": [float(v)] * n}) for v in (1, 2)]
print("ready", flush=True)
i = 0
while True:
    write_parquet_atomic(frames[i % 2], sys.argv[1])
    i += 1
"""


@pytest.mark.slow
def test_kill_9_while_writing_never_exposes_a_partial_file(tmp_path):
    path = tmp_path / "recommendations.parquet"
    expected = frames()
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env())
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        if path.exists():  # whichever version it is, it is whole
            got = pl.read_parquet(path)
            assert got.equals(expected[0]) or got.equals(expected[1])
