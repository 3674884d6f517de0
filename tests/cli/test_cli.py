"""The command line as a user runs it: subprocesses, exit codes, JSON on stdout, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def robopt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "robopt.cli.main", *args],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "Traceback" not in done.stderr, done.stderr
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_demo_table(fresh_data_dir):
    done = robopt("demo")
    assert "before" in done.stdout and "after" in done.stdout and "criteria met" in done.stdout
    assert "smaller" in done.stdout
    assert "Analysis" in done.stderr and "Evaluation" in done.stderr  # the live progress display


def test_optimize_json_history_and_rollback(fresh_data_dir):
    result = json.loads(
        robopt(
            "optimize", "digits-cnn", "--max-size", "3x", "--max-accuracy-drop", "1%", "--session", "cli-1", "--json"
        ).stdout
    )
    base, best = result["baseline"], result["best"]
    assert result["criteria_met"] is True and result["artifact"] == best["artifact"]
    assert best["size_bytes"] * 3 <= base["size_bytes"]
    assert base["metrics"]["accuracy"] - best["metrics"]["accuracy"] <= 0.01
    for model in (base, best):
        assert model["latency_ms_p50"] > 0 and model["peak_memory_bytes"] > 0
    assert Path(best["artifact"]).is_file()

    history = json.loads(robopt("history", "cli-1", "--json").stdout)
    assert history["attempts"][0]["status"] == "accepted"
    assert history["checkpoints"][-1]["artifact"] == best["sha256"]
    baseline_checkpoint = next(c for c in history["checkpoints"] if c["next"] == ["plan"])
    restored = json.loads(robopt("rollback", "cli-1", "--to", baseline_checkpoint["checkpoint"], "--json").stdout)
    assert restored["best"]["sha256"] == base["sha256"]
    assert "cli-1" in robopt("sessions").stdout
    assert "checkpoints of cli-1" in robopt("history", "cli-1").stdout


def test_chat_request(fresh_data_dir):
    result = json.loads(
        robopt("chat", "shrink digits-cnn to under 200 KB and lose at most 1% accuracy", "--json").stdout
    )
    assert result["criteria"]["max_size_bytes"] == 200_000
    assert result["criteria_met"] is True and result["best"]["size_bytes"] <= 200_000


def test_analyze_json(fresh_data_dir):
    report = json.loads(robopt("analyze", "digits-cnn", "--json").stdout)
    assert report["architecture"] == "cnn"
    assert report["param_count"] == 138_698
    assert report["flops"] > 0 and report["latency_ms_p50"] > 0
    assert report["layer_census"]["Conv2d"] == 2 and report["layer_census"]["Linear"] == 2
    outlooks = {t["technique"]: t for t in report["techniques"]}
    assert (
        outlooks["quantize_dynamic_int8"]["applicable"]
        and outlooks["quantize_dynamic_int8"]["expected_size_ratio"] < 0.4
    )


def test_techniques_json():
    rows = json.loads(robopt("techniques", "--json").stdout)
    names = {r["name"] for r in rows}
    assert {
        "quantize_dynamic_int8",
        "weight_only_int8",
        "weight_only_int4",
        "prune_unstructured",
        "prune_structured",
    } <= names
    for r in rows:
        assert r["family"] and "properties" in r["config_schema"]
        assert r["available"] or r["reason"]


def test_zoo_build_and_list(fresh_data_dir):
    assert "digits-cnn" in robopt("zoo", "list").stdout
    card = json.loads(robopt("zoo", "build", "digits-cnn", "--json").stdout)["card"]
    assert card["metrics"]["accuracy"] >= 0.97 and card["evaluator"]["name"] == "classification"


@pytest.mark.parametrize(
    ("content", "name", "code"),
    [
        (b"", "empty.pt", "corrupt_model"),
        (b"not a model at all, just text\n", "model.onnx", "unsupported_format"),
        (os.urandom(4096), "random.pt", None),
    ],
)
def test_bad_inputs_give_typed_errors(tmp_path, content, name, code):
    path = tmp_path / name
    path.write_bytes(content)
    done = robopt("analyze", str(path), check=False)
    assert done.returncode == 2
    assert "error:" in done.stderr and "hint:" in done.stderr
    as_json = json.loads(robopt("analyze", str(path), "--json", check=False).stdout)
    assert as_json["error"] and as_json["message"] and as_json["hint"]
    if code:
        assert as_json["error"] == code


def test_missing_model_and_bad_criteria_are_explained(fresh_data_dir):
    done = robopt("optimize", "no-such-model", check=False)
    assert done.returncode == 2 and "digits-cnn" in done.stderr
    done = robopt("optimize", "digits-cnn", "--max-size", "tiny", check=False)
    assert done.returncode == 2 and "4x" in done.stderr
    done = robopt("resume", "no-such-session", check=False)
    assert done.returncode == 2 and "sessions" in done.stderr
