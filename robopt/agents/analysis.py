"""Analysis agent: profiles the baseline (static analysis, latency, memory, task metric) and what each
technique could gain."""

from __future__ import annotations

from typing import Literal

from langgraph.runtime import Runtime
from langgraph.types import Command

from robopt.agents.common import NodeEnv, evaluator_spec, model_state, node_env, profile
from robopt.domain.analysis import AnalysisReport
from robopt.domain.records import ArtifactRef
from robopt.graph.context import Context
from robopt.graph.state import State
from robopt.tools.registry import list_techniques


def measure_layer_sensitivity(state: State, env: NodeEnv, ref: ArtifactRef, analysis: AnalysisReport) -> None:
    """Per-layer quantization sensitivity on the run's calibration data, into the report (or why not, into
    `unmeasured`); bounded by the sensitivity_budget_s setting."""
    from pathlib import Path

    from robopt.tools.sensitivity_report import artifact_sensitivity

    result = artifact_sensitivity(
        env.store,
        ref,
        evaluator=evaluator_spec(state),
        data_dir=env.settings.data_dir,
        seed=env.context.seed,
        budget_s=env.settings.sensitivity_budget_s,
        progress=env.progress,
        user_file=Path(state["calibration"]) if state.get("calibration") else None,
    )
    if isinstance(result, str):
        analysis.unmeasured["layer_sensitivity"] = result
    else:
        analysis.layer_sensitivity = result


def analyze(state: State, runtime: Runtime[Context]) -> Command[Literal["plan"]]:
    env = node_env("analyze", runtime)
    ingested = state["ingested"]
    ref = ArtifactRef.model_validate(ingested["artifact"])
    measured = profile(state, env, ref)
    analysis = measured.analysis
    analysis.source_format = ingested["source_format"]
    measure_layer_sensitivity(state, env, ref, analysis)
    analysis.techniques = [t.outlook(analysis) for t in list_techniques()]
    baseline = model_state(ref, measured.measurement, analysis)
    env.progress.emit(
        {
            "type": "analysis",
            "node": "analyze",
            "analysis": baseline["analysis"],
            "measurement": baseline["measurement"],
        }
    )
    return Command(goto="plan", update={"baseline": baseline, "current": baseline})
