"""End to end through the graph (Python API) on the digits-cnn zoo model, with faults injected."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import tests.helpers.fault_techniques  # noqa: F401  (registers test_raise / test_nan / test_slow_int8)
from robopt import api
from robopt.domain.criteria import Criteria
from robopt.evaluation.base import EvaluationSetup, EvaluatorSpec, build_evaluator
from robopt.graph.context import Context
from robopt.memory.artifacts import ArtifactStore
from robopt.progress import Progress

FAST = Context(isolated_measurement=False)  # in-process latency: same code paths, no benchmark subprocess


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def accuracy_of(artifact_path: str) -> float:
    """Re-measure an artifact's accuracy independently of the run that produced it."""
    store = ArtifactStore(Path(artifact_path).parent.parent)
    ref = store.get(Path(artifact_path).parent.name)
    evaluator = build_evaluator(EvaluatorSpec(name="classification", dataset="digits"), EvaluationSetup())
    return evaluator.evaluate(store.load(ref), Progress())["accuracy"]


def test_optimize_digits_cnn_meets_criteria_with_measured_numbers(fresh_data_dir):
    events = []
    result = api.optimize(
        "digits-cnn", Criteria(max_size_ratio=1 / 3, max_metric_drop=0.01), context=FAST, on_event=events.append
    )
    base, best = result.baseline.measurement, result.best.measurement
    assert result.criteria_met
    assert base.metrics["accuracy"] >= 0.97
    assert best.size_bytes * 3 <= base.size_bytes
    assert base.metrics["accuracy"] - best.metrics["accuracy"] <= 0.01
    assert best.latency_ms_p50 and best.latency_ms_p50 > 0
    # The reported accuracy is the artifact's own: re-measured from the file it matches exactly.
    assert accuracy_of(result.artifact) == pytest.approx(best.metrics["accuracy"], abs=1e-12)
    assert best.size_bytes == Path(result.artifact).stat().st_size
    accepted = [a for a in result.attempts if a.status == "accepted"]
    assert accepted and accepted[-1].artifact.path == result.artifact
    # progress streamed from every node
    nodes = {e["node"] for e in events if e.get("type") == "node"}
    assert {"intake", "analyze", "plan", "optimize", "evaluate", "report"} <= nodes
    assert any(e.get("type") == "progress" and e.get("total") for e in events)


def test_a_raising_step_rolls_back_and_the_run_goes_on(fresh_data_dir):
    result = api.optimize(
        "digits-cnn", Criteria(max_size_ratio=1 / 3), techniques=["test_raise", "quantize_dynamic_int8"], context=FAST
    )
    first, second = result.attempts[0], result.attempts[1]
    assert first.step.technique == "test_raise" and first.status == "failed"
    assert "injected failure" in first.reason
    # The failed step's input (the baseline) is untouched: still hashes to its address, byte for byte.
    assert first.input_artifact == result.baseline.artifact.sha256
    ArtifactStore(fresh_data_dir / "artifacts").verify(result.baseline.artifact)
    assert second.step.technique == "quantize_dynamic_int8" and second.status == "accepted"
    assert second.input_artifact == result.baseline.artifact.sha256
    assert result.criteria_met


def test_a_nan_step_is_rejected_and_recorded(fresh_data_dir):
    baseline_bytes = None
    result = api.optimize(
        "digits-cnn", Criteria(max_size_ratio=1 / 3), techniques=["test_nan", "quantize_dynamic_int8"], context=FAST
    )
    nan_attempt = result.attempts[0]
    assert nan_attempt.step.technique == "test_nan" and nan_attempt.status == "failed"
    assert "NaN" in nan_attempt.reason
    baseline_bytes = Path(result.baseline.artifact.path).read_bytes()
    assert hashlib.sha256(baseline_bytes).hexdigest()  # readable and intact
    ArtifactStore(fresh_data_dir / "artifacts").verify(result.baseline.artifact)
    assert result.best.artifact.technique == "quantize_dynamic_int8"


def test_an_accuracy_breaking_step_is_rejected_then_replanned_milder(fresh_data_dir):
    # Structured pruning (with its built-in recovery) still costs a little accuracy. Under a budget of 0.05 points
    # the size limit's ratio 0.3 is rejected, and the planner retries the milder 0.15 from the same accepted model.
    result = api.optimize(
        "digits-cnn",
        Criteria(max_size_ratio=0.6, max_metric_drop=0.0005),
        techniques=["prune_structured"],
        context=FAST,
    )
    ratios = [a.step.config["ratio"] for a in result.attempts]
    assert ratios[:2] == [0.3, 0.15]
    first = result.attempts[0]
    assert first.status == "rejected" and "dropped" in first.reason
    assert all(a.input_artifact == result.baseline.artifact.sha256 for a in result.attempts)
    drops = [
        result.baseline.measurement.metrics["accuracy"] - a.measurement.metrics["accuracy"] for a in result.attempts
    ]
    assert drops[0] > 0.0005 and drops[0] >= drops[1]  # milder pruning hurts no more
    if result.best.artifact.sha256 == result.baseline.artifact.sha256:  # nothing accepted: the run says why
        assert not result.criteria_met and "nothing left" in result.stop_reason


def test_history_and_rollback_to_a_checkpoint(fresh_data_dir):
    result = api.optimize("digits-cnn", Criteria(max_size_ratio=1 / 3), context=FAST, session="hist-1")
    rows = api.history("hist-1", context=FAST)
    assert rows[0]["next"] == ["__start__"] and rows[1]["next"] == ["intake"] and rows[-1]["next"] == []
    assert rows[-1]["artifact"] == result.best.artifact.sha256
    # the checkpoint right after analysis holds the baseline as the accepted model
    after_analysis = next(r for r in rows if r["next"] == ["plan"])
    assert after_analysis["artifact"] == result.baseline.artifact.sha256
    restored = api.rollback("hist-1", after_analysis["checkpoint"][:20], context=FAST)
    assert restored.best.artifact.sha256 == result.baseline.artifact.sha256
    assert "rolled back" in restored.stop_reason
    # the rollback is itself a new checkpoint at the head of the session; the optimized artifact still exists
    assert api.history("hist-1", context=FAST)[-1]["artifact"] == result.baseline.artifact.sha256
    ArtifactStore(fresh_data_dir / "artifacts").verify(result.best.artifact)
    # resuming from the post-analysis checkpoint (by prefix) forks there and re-runs the same plan
    forked = api.resume("hist-1", checkpoint=after_analysis["checkpoint"][:20], context=FAST)
    assert forked.criteria_met and forked.best.artifact.sha256 == result.best.artifact.sha256
    from robopt.errors import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError):
        api.resume("hist-1", checkpoint="no-such-checkpoint", context=FAST)


def test_a_live_module_is_stored_as_an_artifact_first(fresh_data_dir):
    from robopt import zoo
    from robopt.tools.loading import load_model

    path, card = zoo.resolve("digits-cnn", fresh_data_dir / "zoo")
    module = load_model(path, architecture=card.instantiate().__class__).module
    result = api.optimize(module, Criteria(max_size_ratio=1 / 3), evaluator="classification:digits", context=FAST)
    assert result.criteria_met
    assert result.baseline.measurement.metrics["accuracy"] >= 0.97


def test_time_budget_stops_new_attempts(fresh_data_dir):
    result = api.optimize("digits-cnn", Criteria(max_size_ratio=0.01, time_budget_s=0.001), context=FAST)
    assert result.attempts == []
    assert "time budget" in result.stop_reason
    assert not result.criteria_met


def test_an_onnx_model_is_optimized_as_onnx(fresh_data_dir, tmp_path):
    import onnxruntime as ort
    import torch

    from robopt import zoo
    from robopt.evaluation.datasets import digits_split
    from robopt.tools.loading import load_model

    path, card = zoo.resolve("digits-cnn", fresh_data_dir / "zoo")
    module = load_model(path, architecture=card.instantiate().__class__).module
    onnx_path = tmp_path / "digits.onnx"
    torch.onnx.export(
        module,
        (torch.zeros(1, 1, 8, 8),),
        str(onnx_path),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    result = api.optimize(
        str(onnx_path), Criteria(max_size_ratio=1 / 3), evaluator="classification:digits", context=FAST
    )
    assert result.criteria_met
    assert result.best.artifact.format == "onnx" and result.best.artifact.technique == "onnx_dynamic_int8"
    # the artifact is a plain ONNX file: onnxruntime alone reproduces the reported accuracy
    _, _, x_test, y_test = digits_split()
    session = ort.InferenceSession(result.artifact, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": x_test.numpy()})[0]
    measured = float((logits.argmax(1) == y_test.numpy()).mean())
    assert measured == pytest.approx(result.best.measurement.metrics["accuracy"], abs=1e-12)


def test_cancel_stops_the_run_and_it_resumes(fresh_data_dir):
    import threading

    from robopt.errors import CancelledError

    cancel = threading.Event()

    def on_event(event):
        if event.get("type") == "node" and event.get("node") == "optimize" and event.get("status") == "start":
            cancel.set()  # e.g. a user pressing Stop while the first step starts

    context = Context(isolated_measurement=False, cancel=cancel)
    with pytest.raises(CancelledError):
        api.optimize(
            "digits-cnn", Criteria(max_size_ratio=1 / 3), session="cancel-1", context=context, on_event=on_event
        )
    assert api.history("cancel-1", context=FAST)[-1]["next"] == ["optimize"]
    result = api.resume("cancel-1", context=FAST)
    assert result.criteria_met and [a.status for a in result.attempts] == ["accepted"]
