"""Optimization agent: applies the next planned step to the last accepted model and stores the result as a
new artifact."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from langgraph.runtime import Runtime
from langgraph.types import Command

from robopt.agents.common import (
    ModelView,
    closed_loop_task,
    evaluator_spec,
    history_key,
    json_safe,
    log_attempt,
    node_env,
    run_calibration,
)
from robopt.domain.plan import OptimizationPlan
from robopt.domain.records import ArtifactRef, Attempt
from robopt.errors import CancelledError, TechniqueFailedError
from robopt.graph.context import Context
from robopt.graph.state import State
from robopt.tools.example_inputs import make_example_inputs
from robopt.tools.outputs import all_finite
from robopt.tools.registry import ApplyContext, validate_step


def optimize(state: State, runtime: Runtime[Context]) -> Command[Literal["evaluate", "rollback"]]:
    env = node_env("optimize", runtime)
    plan = OptimizationPlan.model_validate(state["plan"])
    step = plan.steps[state.get("cursor", 0)]
    current = ModelView.of(state["current"])
    index = len(state.get("attempts") or [])
    env.progress.emit(
        {"type": "step", "node": "optimize", "index": index, "technique": step.technique, "config": step.config}
    )
    started = time.perf_counter()
    try:
        technique, config = validate_step(step, current.analysis)
        model = env.store.load(current.artifact)
        inputs = (
            make_example_inputs(current.artifact.input_spec, env.context.seed) if current.artifact.input_spec else None
        )
        calibration = run_calibration(state, env, current.artifact.input_spec)
        baseline_ref = ArtifactRef.model_validate(state["ingested"]["artifact"])
        with tempfile.TemporaryDirectory(prefix="robopt-step-") as workdir:
            result = technique.apply(
                model,
                config,
                ApplyContext(
                    analysis=current.analysis,
                    example_inputs=inputs,
                    progress=env.progress,
                    seed=env.context.seed,
                    workdir=Path(workdir),
                    calibration=calibration,
                    teacher=lambda: env.store.load(baseline_ref),
                    task=closed_loop_task(evaluator_spec(state)),
                ),
            )
            if inputs is not None:
                with torch.no_grad():
                    if not all_finite(result.model(*inputs)):
                        raise TechniqueFailedError(f"{step.technique} produced a model with NaN/inf outputs")
            provenance = {
                "parent": current.artifact.sha256,
                "technique": step.technique,
                "input_spec": current.artifact.input_spec,
            }
            if result.onnx_path is not None:
                import onnx

                ref = env.store.put_onnx(onnx.load(str(result.onnx_path)), **provenance)
            else:
                ref = env.store.put_module(result.model, **provenance)
    except CancelledError:
        raise
    except Exception as e:  # a technique may fail in any library: the failure is the attempt's recorded outcome
        attempt = Attempt(
            index=index,
            step=step,
            status="failed",
            reason=f"{type(e).__name__}: {e}",
            input_artifact=current.artifact.sha256,
            duration_s=time.perf_counter() - started,
            session=state.get("session"),
            model_fingerprint=history_key(state),
        )
        return Command(goto="rollback", update={"candidate": None, "attempts": [log_attempt(env, attempt)]})
    details = dict(result.details)
    if calibration.served:  # what the technique calibrated on, unless it recorded that itself
        details.setdefault("calibration", [entry.as_dict() for entry in calibration.served])
    candidate = {
        "step": step.model_dump(mode="json"),
        "artifact": ref.model_dump(mode="json"),
        "backend": result.backend,
        "notes": result.notes,
        "details": json_safe(details),
        "duration_s": time.perf_counter() - started,
        "index": index,
    }
    return Command(goto="evaluate", update={"candidate": candidate})
