"""Analysis agent: profiles the baseline (static analysis, latency, memory, task metric) and what each
technique could gain."""

from __future__ import annotations

from typing import Literal

from langgraph.runtime import Runtime
from langgraph.types import Command

from robopt.agents.common import model_state, node_env, profile
from robopt.domain.records import ArtifactRef
from robopt.graph.context import Context
from robopt.graph.state import State
from robopt.tools.registry import list_techniques


def analyze(state: State, runtime: Runtime[Context]) -> Command[Literal["plan"]]:
    env = node_env("analyze", runtime)
    ingested = state["ingested"]
    ref = ArtifactRef.model_validate(ingested["artifact"])
    measured = profile(state, env, ref)
    analysis = measured.analysis
    analysis.source_format = ingested["source_format"]
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
