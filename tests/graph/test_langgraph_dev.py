"""`langgraph dev` serves the graph from langgraph.json (LangGraph Studio's server), and a run through its API
optimizes a model from a chat-style request."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(fresh_data_dir, tmp_path):
    cli = Path(sys.executable).parent / "langgraph"
    if not cli.exists() and shutil.which("langgraph") is None:
        pytest.fail("langgraph-cli is part of the dev extra; install with pip install -e '.[dev]'")
    port = free_port()
    log = (tmp_path / "langgraph-dev.log").open("w")
    proc = subprocess.Popen(
        [str(cli if cli.exists() else "langgraph"), "dev", "--no-browser", "--no-reload", "--port", str(port)],
        cwd=REPO,
        env=dict(os.environ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, (tmp_path / "langgraph-dev.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "langgraph dev did not come up"
        time.sleep(1)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_studio_server_runs_a_chat_request(server):
    assistants = httpx.post(f"{server}/assistants/search", json={}, timeout=30).json()
    assert [a["graph_id"] for a in assistants] == ["robopt"]
    thread = httpx.post(f"{server}/threads", json={}, timeout=30).json()["thread_id"]
    state = httpx.post(
        f"{server}/threads/{thread}/runs/wait",
        json={
            "assistant_id": "robopt",
            "input": {"request": "shrink digits-cnn to under 200 KB and lose at most 1% accuracy"},
        },
        timeout=600,
    ).json()
    result = state["result"]
    assert result["criteria_met"] is True
    assert result["best"]["measurement"]["size_bytes"] <= 200_000
    assert result["session"] == thread  # the Studio thread is the session
