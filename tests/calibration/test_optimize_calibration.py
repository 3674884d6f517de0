"""The optimize node hands techniques a working calibration source: the evaluator's training data by default, the
user's file with `calibration=` (Python) or `--calibration` (CLI), checked at intake; what a step calibrated on
is kept in the checkpointed state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from robopt import api
from robopt.calibration import CalibrationSet
from robopt.domain.analysis import AnalysisReport
from robopt.errors import CalibrationDataError, TechniqueNotApplicableError
from robopt.graph.build import build_graph
from robopt.graph.context import Context
from robopt.memory.checkpointer import open_persistence
from robopt.tools.registry import (
    Applicability,
    ApplyContext,
    Estimate,
    Technique,
    TechniqueConfig,
    TechniqueResult,
    register_technique,
)

FAST = Context(isolated_measurement=False)
SEEN: list[tuple[CalibrationSet, list[list[int]]]] = []  # what the probe received, and the model's output shapes
REPO = Path(__file__).resolve().parents[2]


class NoConfig(TechniqueConfig):
    pass


@register_technique
class CalibrationProbe(Technique):
    """Draws 4 calibration samples, runs the model on each and returns it unchanged (a test probe, never planned
    unless named: it compresses nothing)."""

    name = "test_calibration_probe"
    family = "quantization"
    description = "records the calibration set it is given; returns the model unchanged"
    config_cls = NoConfig
    planned_by_default = False

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        return Estimate(size_ratio=0.5, speedup=1.0, accuracy_risk="low", note="test probe")

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        if context.calibration is None:
            raise TechniqueNotApplicableError("test_calibration_probe needs calibration data")
        calibration = context.calibration(4)
        with torch.no_grad():
            shapes = [list(model(*sample).shape) for sample in calibration.samples]
        SEEN.append((calibration, shapes))
        return TechniqueResult(model=model, backend="test", notes=calibration.source)


def _step_details(session: str) -> dict:
    """The details of the session's first optimize step, read back from the checkpoints."""
    with open_persistence(FAST.settings()) as persistence:
        graph = build_graph(persistence.checkpointer, persistence.store)
        for snapshot in graph.get_state_history({"configurable": {"thread_id": session}}):
            candidate = snapshot.values.get("candidate")
            if candidate and "details" in candidate:
                return candidate["details"]
    raise AssertionError(f"no optimize step in session {session}")


def test_techniques_get_the_training_split_of_digits_cnn(fresh_data_dir) -> None:
    SEEN.clear()
    events: list[dict] = []
    result = api.optimize(
        "digits-cnn",
        techniques=["test_calibration_probe"],
        session="calib-default",
        context=FAST,
        on_event=events.append,
    )
    calibration, shapes = SEEN[0]
    assert len(calibration) == 4 and shapes == [[1, 10]] * 4
    assert calibration.source.startswith("scikit-learn digits train split")
    assert result.attempts[0].step.technique == "test_calibration_probe" and result.attempts[0].status != "failed"
    (recorded,) = _step_details("calib-default")["calibration"]
    assert recorded == {
        "samples": 4,
        "source": calibration.source,
        "fingerprint": calibration.fingerprint,
        "cached": False,
    }
    assert any("built 4 calibration samples" in e.get("message", "") for e in events)
    assert list((fresh_data_dir / "calibration").glob("*.pt"))  # cached in the run's data directory


def test_a_user_file_travels_through_the_state_to_the_technique(fresh_data_dir, tmp_path, monkeypatch) -> None:
    SEEN.clear()
    images = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", input=images)
    monkeypatch.chdir(tmp_path)  # a relative path is resolved by the API, where the caller is
    api.optimize("digits-cnn", techniques=["test_calibration_probe"], calibration="mine.npz", context=FAST)
    calibration, shapes = SEEN[0]
    assert calibration.source.startswith("user file mine.npz") and shapes == [[1, 10]] * 4
    rows = {row.tobytes() for row in images}
    assert all(sample[0][0].numpy().tobytes() in rows for sample in calibration.samples)


def test_a_bad_calibration_file_stops_the_run_at_intake(fresh_data_dir, tmp_path) -> None:
    SEEN.clear()
    with pytest.raises(CalibrationDataError, match="does not exist"):
        api.optimize("digits-cnn", techniques=["test_calibration_probe"], calibration=tmp_path / "no.npz", context=FAST)
    np.savez(tmp_path / "wrong.npz", input=np.zeros((3, 1, 28, 28), dtype=np.float32))
    with pytest.raises(CalibrationDataError, match=r"per-sample shape \[1, 28, 28\], the model takes \[1, 8, 8\]"):
        api.optimize(
            "digits-cnn", techniques=["test_calibration_probe"], calibration=tmp_path / "wrong.npz", context=FAST
        )
    assert not SEEN  # no step ran


def test_cli_calibration_option_refuses_a_missing_file(fresh_data_dir, tmp_path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "robopt.cli.main",
            "optimize",
            "digits-cnn",
            "--calibration",
            str(tmp_path / "no.npz"),
            "--json",
        ],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    error = json.loads(done.stdout)
    assert error["error"] == "calibration_data" and "does not exist" in error["message"] and error["hint"]
