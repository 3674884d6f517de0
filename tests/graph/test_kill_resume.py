"""A run killed with SIGKILL in the middle of a step leaves the last accepted artifact intact and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from robopt.graph.context import Context
from robopt.memory.artifacts import ArtifactStore
from robopt.runner import session_history, session_state

REPO = Path(__file__).resolve().parents[2]


def robopt_cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "robopt.cli.main", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_mid_step_then_resume(fresh_data_dir, tmp_path):
    marker = tmp_path / "in-step"
    env = {
        **os.environ,
        "ROBOPT_PLUGINS": "tests.helpers.fault_techniques",
        "ROBOPT_TEST_MARKER": str(marker),
        "ROBOPT_TEST_SLEEP": "120",
    }
    run = robopt_cli(
        "optimize",
        "digits-cnn",
        "--max-size",
        "3x",
        "--technique",
        "test_slow_int8",
        "--session",
        "kill-1",
        "--json",
        env=env,
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.2)
    store = ArtifactStore(fresh_data_dir / "artifacts")
    (baseline,) = store.list()
    before = Path(baseline.path).read_bytes()
    run.send_signal(signal.SIGKILL)
    assert run.wait(timeout=30) == -signal.SIGKILL

    # Killed inside optimize: the last checkpoint is the one before it, holding the baseline as accepted.
    state = session_state("kill-1", Context())
    assert not state.finished
    assert session_history("kill-1", Context())[-1]["next"] == ["optimize"]
    assert state.values["current"]["artifact"]["sha256"] == baseline.sha256
    assert [a.sha256 for a in store.list()] == [baseline.sha256]
    store.verify(baseline)
    assert Path(baseline.path).read_bytes() == before

    resumed = robopt_cli("resume", "kill-1", "--json", env={**env, "ROBOPT_TEST_SLEEP": "0"})
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    result = json.loads(out)
    assert result["criteria_met"] is True
    assert result["baseline"]["sha256"] == baseline.sha256
    assert result["attempts"][0]["technique"] == "test_slow_int8" and result["attempts"][0]["status"] == "accepted"
    assert result["best"]["size_bytes"] * 3 <= result["baseline"]["size_bytes"]
    assert Path(baseline.path).read_bytes() == before
