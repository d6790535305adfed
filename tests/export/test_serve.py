"""The README's ``mlflow models serve`` command: the registered model behind a live REST server
answers ``POST /invocations`` with the rows ``pyfunc.predict`` returns, and bad requests with a
400 and a clear message, without going down."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from export_support import MODEL_NAME, trained_run
from server_support import free_port, running

pytestmark = pytest.mark.slow

# The README's commands, verbatim (tests/test_readme.py checks they are the README's).
README_COMMANDS = [
    "MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db mlflow models serve -m models:/recsys@champion "
    "--env-manager local -h 127.0.0.1 -p 5001",
    "curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
    """-d '{"dataframe_records": [{"user_id": "U00001"}], "params": {"k": 5}}'""",
]


def post(url: str, body: dict | str) -> tuple[int, dict]:
    data = body if isinstance(body, str) else json.dumps(body)
    req = urllib.request.Request(url, data=data.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server():
    """The README's serve command on a free port, this session's run's backend and model name."""
    run = trained_run()
    port = str(free_port())
    env_set, *cmd = shlex.split(README_COMMANDS[0])
    swap = {
        "mlflow": str(Path(sys.executable).with_name("mlflow")),
        "models:/recsys@champion": f"models:/{MODEL_NAME}@champion",
        "5001": port,
    }
    cmd = [swap.get(t, t) for t in cmd]
    key, _ = env_set.split("=", 1)
    env = {**os.environ, key: run.tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    base = f"http://127.0.0.1:{port}"
    proc = None
    try:
        with running(cmd, env, f"{base}/ping", "mlflow models serve", 120, cwd=run.root) as proc:
            yield base, run
    finally:
        # The whole group goes (the scoring workers too), within a bounded wait.
        deadline = time.monotonic() + 20
        while proc is not None and group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc is not None and group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("mlflow models serve left processes behind after SIGTERM")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def readme_request(port_base: str) -> tuple[str, str]:
    """URL and body of the README's curl command, with the server's port."""
    tokens = shlex.split(README_COMMANDS[1])
    url = next(t for t in tokens if t.startswith("http://"))
    body = tokens[tokens.index("-d") + 1]
    return url.replace("http://127.0.0.1:5001", port_base), body


def same_rows(served: list[dict], expected: pd.DataFrame) -> None:
    got = pd.DataFrame(served)
    assert list(got.columns) == list(expected.columns)
    for col in ("user_id", "item_id", "rank", "source", "explain_item"):
        assert got[col].fillna("-").astype(str).tolist() == expected[col].fillna("-").astype(str).tolist(), col
    assert got["score"].to_numpy() == pytest.approx(expected["score"].to_numpy(), rel=1e-6)


def test_served_rows_equal_pyfunc_predict(server):
    import mlflow

    base, run = server
    mlflow.set_tracking_uri(run.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")

    url, body = readme_request(base)
    status, answer = post(url, body)
    assert status == 200, answer
    request = json.loads(body)
    expected = model.predict(pd.DataFrame(request["dataframe_records"]), params=request["params"])
    assert len(expected) == 5
    same_rows(answer["predictions"], expected)

    # A new user, served from the history sent with the request.
    history = {"user_id": ["new", "new"], "item_id": ["I00010", "I00042"], "event": ["click", "purchase"]}
    status, answer = post(
        f"{base}/invocations", {"dataframe_split": {"columns": list(history), "data": list(zip(*history.values()))}}
    )
    assert status == 200, answer
    same_rows(answer["predictions"], model.predict(pd.DataFrame(history)))

    # Integer Unix seconds, as JSON numbers arrive (the signature refused them as not double).
    timed = [{"user_id": "new", "item_id": "I00010", "timestamp": 1_700_000_000, "event": "click"}]
    status, answer = post(f"{base}/invocations", {"dataframe_records": timed})
    assert status == 200, answer
    same_rows(answer["predictions"], model.predict(pd.DataFrame(timed)))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"dataframe_records": [{"user_id": "nobody"}]}, "unknown to the model"),
        ({"dataframe_records": [{"customer": "U00001"}]}, "user_id"),
        ({"dataframe_records": [{"user_id": "U00001"}], "params": {"k": 0}}, "k must be a whole number >= 1"),
        ({"dataframe_records": [{"user_id": "U00001"}], "params": {"k": -3}}, "k must be a whole number >= 1"),
        ({"dataframe_records": [{"user_id": "U00001"}], "params": {"scorer": "nope"}}, "unknown scorer 'nope'"),
        (
            {"dataframe_records": [{"user_id": "U00001"}], "params": {"histories_mode": "append"}},
            "histories_mode must be one of ['extend', 'replace'], got 'append'",
        ),
        (  # a row without its user was dropped, and the answer held fewer users than asked for
            {"dataframe_records": [{"user_id": "U00001"}, {"user_id": None, "item_id": "I00010"}]},
            "column 'user_id', row 2: 1 row(s) have an empty value",
        ),
    ],
)
def test_bad_requests_get_a_400_and_the_server_keeps_serving(server, body, message):
    base, _ = server
    status, answer = post(f"{base}/invocations", body)
    assert status == 400, answer
    assert message in answer["message"]
    assert "stack_trace" not in answer or "Traceback" not in answer.get("message", "")
    status, answer = post(f"{base}/invocations", {"dataframe_records": [{"user_id": "U00001"}]})
    assert status == 200 and answer["predictions"]
