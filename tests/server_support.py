"""A server started as its README command starts it, in its own process group, for the live tests
(``mlflow ui``, ``mlflow models serve``): bounded waits, 127.0.0.1 only, the whole group stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(
    cmd: list[str], env: dict[str, str], ready_url: str, name: str, timeout: float, cwd: str | None = None
) -> Iterator[subprocess.Popen]:
    """Start ``cmd``, wait until ``ready_url`` answers 200 (or fail naming ``name``), and stop its
    process group (SIGTERM, then SIGKILL after 15 s) when the block ends."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"{name} did not answer within {timeout:.0f} s"
            time.sleep(0.5)
        yield proc
    finally:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # A server that died on start has no group left: the failed assertion is what to report.
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
