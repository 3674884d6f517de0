"""What every agent node needs: its context, settings, artifact store, progress stream and typed views of state."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from langgraph.config import get_config
from langgraph.runtime import Runtime

from robopt.calibration.providers import CalibrationProvider
from robopt.domain.analysis import AnalysisReport
from robopt.domain.criteria import Criteria
from robopt.domain.plan import DeciderEvent
from robopt.domain.records import ArtifactRef, Attempt, InputSpec, Measurement
from robopt.evaluation.base import (
    EvaluationSetup,
    Evaluator,
    EvaluatorSpec,
    build_evaluator,
    evaluator_criteria_options,
    evaluator_needs_reference,
)
from robopt.evaluation.profile_artifact import ArtifactProfile, profile_artifact
from robopt.graph.context import Context
from robopt.graph.state import ModelState, State
from robopt.memory.artifacts import ArtifactStore
from robopt.progress import Progress
from robopt.settings import Settings


@dataclass
class NodeEnv:
    """The resolved environment of one node execution."""

    context: Context
    settings: Settings
    store: ArtifactStore
    progress: Progress
    runtime: Runtime[Context]

    @property
    def threads(self) -> int:
        return self.settings.effective_threads()


def node_env(node: str, runtime: Runtime[Context]) -> NodeEnv:
    context = runtime.context if isinstance(runtime.context, Context) else Context()
    settings = context.settings()
    cancel = context.cancel if isinstance(context.cancel, threading.Event) else threading.Event()
    progress = Progress(emit=runtime.stream_writer, node=node, cancel=cancel)
    progress.check()
    progress.emit({"type": "node", "node": node, "status": "start"})
    return NodeEnv(context, settings, ArtifactStore(settings.artifacts_dir), progress, runtime)


def session_id() -> str:
    """The thread id of the running graph (the session), or 'adhoc' outside a checkpointed run."""
    try:
        return str(get_config().get("configurable", {}).get("thread_id") or "adhoc")
    except RuntimeError:
        return "adhoc"


def model_state(artifact: ArtifactRef, measurement: Measurement, analysis: AnalysisReport) -> ModelState:
    return {
        "artifact": artifact.model_dump(mode="json"),
        "measurement": measurement.model_dump(mode="json"),
        "analysis": analysis.model_dump(mode="json"),
    }


@dataclass
class ModelView:
    """Typed view of a ModelState."""

    artifact: ArtifactRef
    measurement: Measurement
    analysis: AnalysisReport

    @classmethod
    def of(cls, value: ModelState | dict[str, Any]) -> ModelView:
        return cls(
            artifact=ArtifactRef.model_validate(value["artifact"]),
            measurement=Measurement.model_validate(value["measurement"]),
            analysis=AnalysisReport.model_validate(value["analysis"]),
        )


def criteria_of(state: State) -> Criteria:
    return Criteria.model_validate(state.get("criteria") or {})


def attempts_of(state: State) -> list[Attempt]:
    """The session's attempts; provisional steps undone with their failed chain read as rejected."""
    undone = set(state.get("rolled_back") or [])
    attempts = [Attempt.model_validate(a) for a in state.get("attempts") or []]
    for a in attempts:
        if a.index in undone and a.status == "accepted":
            a.status = "rejected"
            a.reason = f"rolled back with its chain: {a.reason}"
    return attempts


def evaluator_spec(state: State) -> EvaluatorSpec:
    """The run's evaluator spec, with the criteria that are evaluator settings (episodes, control rate, target)."""
    spec = EvaluatorSpec.model_validate(state["evaluator_resolved"])
    criteria = criteria_of(state)
    settings = {
        key: getattr(criteria, key)
        for key in evaluator_criteria_options(spec.name)
        if getattr(criteria, key, None) is not None
    }
    return spec.model_copy(update={"options": {**spec.options, **settings}}) if settings else spec


def make_evaluator(state: State, env: NodeEnv) -> Evaluator:
    """The run's evaluator; evaluators that compare with the original (fidelity, closed loop) get the baseline."""
    spec = evaluator_spec(state)
    baseline = ArtifactRef.model_validate(state["ingested"]["artifact"])
    reference = env.store.load(baseline) if evaluator_needs_reference(spec.name) else None
    return build_evaluator(
        spec, EvaluationSetup(reference=reference, input_spec=baseline.input_spec, seed=env.context.seed)
    )


def profile(state: State, env: NodeEnv, ref: ArtifactRef) -> ArtifactProfile:
    """Measure an artifact of this run with the run's evaluator and settings."""
    ingested = state["ingested"]
    return profile_artifact(
        env.store,
        ref,
        evaluator=make_evaluator(state, env),
        threads=env.threads,
        progress=env.progress,
        seed=env.context.seed,
        isolated=env.context.isolated_measurement,
        source=ingested["source"],
        hf_config=ingested.get("hf_config"),
    )


def closed_loop_task(spec: EvaluatorSpec) -> str | None:
    """The simulator task a closed-loop evaluator runs (its dataset), else None."""
    return (spec.dataset or None) if spec.name == "closed-loop" else None


def run_calibration(state: State, env: NodeEnv, input_spec: InputSpec | None) -> CalibrationProvider:
    """The run's calibration source: the user's --calibration file, else data chosen by evaluator and model type."""
    from pathlib import Path

    from robopt.calibration import calibration_source

    return calibration_source(
        evaluator_spec(state),
        input_spec,
        env.settings.data_dir,
        env.context.seed,
        user_file=Path(state["calibration"]) if state.get("calibration") else None,
        progress=env.progress,
    )


def history_key(state: State) -> str:
    """Past attempts are comparable only on the same model judged by the same evaluator."""
    import json

    baseline = AnalysisReport.model_validate(state["baseline"]["analysis"])
    spec = evaluator_spec(state)
    options = json.dumps(spec.options, sort_keys=True, default=str) if spec.options else ""
    return f"{baseline.fingerprint()}|{spec.name}:{spec.dataset or ''}{options}"


def decider_event(agent: str, decider: str, ok: bool, detail: str = "") -> dict[str, Any]:
    return DeciderEvent(agent=agent, decider=decider, ok=ok, detail=detail).model_dump()  # type: ignore[arg-type]


def log_attempt(env: NodeEnv, attempt: Attempt) -> dict[str, Any]:
    """Emit the attempt as an event, keep it in the cross-session history, and return it as state data."""
    from robopt.memory.history import record_attempt

    data = attempt.model_dump(mode="json")
    env.progress.emit({"type": "attempt", "node": env.progress.node, **data})
    record_attempt(env.runtime.store, attempt)
    return data


def json_safe(value: Any) -> Any:
    """Technique details as plain JSON (tensors and other objects become strings)."""
    import json

    return json.loads(json.dumps(value, default=str))
