"""Two exports to one output at the same time (issue 24): one crashed with FileNotFoundError,
as both shared one parts folder and the first to finish deleted it. The output's lock makes
the second one refuse at once, with exit 2 naming the lock."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pytest
from reliability_support import env, run_recommend
from test_bad_input import assert_clean_failure

from recsys.errors import ConfigError
from recsys.output import lock_path, output_lock


def test_a_held_output_lock_refuses_a_second_holder_and_is_reentrant(tmp_path):
    out = tmp_path / "recs.parquet"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time\nfrom recsys.output import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"held by process {holder.pid}") as info, output_lock(out):
            pass
        assert str(lock_path(out)) in str(info.value)
    finally:
        holder.communicate("\n", timeout=30)
    assert not lock_path(out).exists()  # the holder removed it when done
    with output_lock(out), output_lock(out):  # free again; re-entrant in one process
        assert lock_path(out).exists()
    assert not lock_path(out).exists()


@pytest.mark.slow
def test_cli_export_to_an_output_being_written_is_refused(tmp_path):
    """The lock is taken before the model loads (the model URI here does not even exist)."""
    out = tmp_path / "recs.parquet"
    with output_lock(out):
        proc = run_recommend(tmp_path, f"model_uri={tmp_path / 'no-such-pipeline'}", f"output={out}")
    assert_clean_failure(proc, "another export is writing", str(lock_path(out).absolute()))
    assert "no-such-pipeline" not in proc.stderr


@pytest.mark.slow
def test_two_identical_concurrent_exports(tmp_path):
    """Two real processes export the smoke model to one output at once: each succeeds or is
    refused naming the lock; never a traceback, the output is whole, nothing is left behind."""
    from export_support import trained_run

    model = trained_run().pipeline_dir
    out = tmp_path / "recs.parquet"
    cmd = [sys.executable, "-m", "recsys.recommend", f"paths.mlruns_dir={tmp_path / 'mlruns'}",
           f"model_uri={model}", f"output={out}", "chunk_size=20", "progress=false"]  # fmt: skip
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
    for stderr, rc in results:
        assert rc in (0, 2) and "Traceback" not in stderr, stderr[-3000:]
        if rc == 2:
            assert "another export is writing" in stderr and str(lock_path(out).absolute()) in stderr, stderr
    assert 0 in [rc for _, rc in results]
    solo = tmp_path / "solo" / "recs.parquet"
    assert run_recommend(tmp_path, f"model_uri={model}", f"output={solo}", "chunk_size=20").returncode == 0
    assert pl.read_parquet(out).equals(pl.read_parquet(solo))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
