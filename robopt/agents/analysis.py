"""Analysis agent: profiles the baseline (static analysis, latency, memory, task metric) and what each
technique could gain."""

from __future__ import annotations

from typing import Literal

from langgraph.runtime import Runtime
from langgraph.types import Command

from robopt.agents.common import make_evaluator, model_state, node_env
from robopt.domain.records import ArtifactRef
from robopt.evaluation.profile_artifact import profile_artifact
from robopt.graph.context import Context
from robopt.graph.state import State
from robopt.tools.registry import list_techniques


def analyze(state: State, runtime: Runtime[Context]) -> Command[Literal["plan"]]:
    env = node_env("analyze", runtime)
    ingested = state["ingested"]
    ref = ArtifactRef.model_validate(ingested["artifact"])
    profile = profile_artifact(
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
    analysis = profile.analysis
    analysis.source_format = ingested["source_format"]
    analysis.techniques = [t.outlook(analysis) for t in list_techniques()]
    baseline = model_state(ref, profile.measurement, analysis)
    env.progress.emit(
        {
            "type": "analysis",
            "node": "analyze",
            "analysis": baseline["analysis"],
            "measurement": baseline["measurement"],
        }
    )
    return Command(goto="plan", update={"baseline": baseline, "current": baseline})
