"""Report agent: the result of a run — baseline, best accepted model, every attempt, and the criteria checks."""

from __future__ import annotations

from typing import Any

from langgraph.runtime import Runtime

from robopt.agents.common import ModelView, attempts_of, criteria_of, node_env
from robopt.domain.plan import DeciderEvent, ModelSummary, OptimizationResult
from robopt.evaluation.judge import check_criteria
from robopt.graph.context import Context
from robopt.graph.state import State


def build_result(state: State, stop_reason: str | None = None) -> OptimizationResult:
    """The result for a state: the best model is the last accepted one (each accepted step improves on it), or, if
    the run ended inside a chain, the model before the chain (a provisional step was never judged in full)."""
    baseline = ModelView.of(state["baseline"])
    best = ModelView.of(state.get("chain_anchor") or state["current"])
    criteria = criteria_of(state)
    checks = check_criteria(best.measurement, baseline.measurement, criteria)
    return OptimizationResult(
        session=state.get("session", "adhoc"),
        criteria=criteria,
        baseline=ModelSummary(artifact=baseline.artifact, measurement=baseline.measurement),
        best=ModelSummary(artifact=best.artifact, measurement=best.measurement),
        attempts=attempts_of(state),
        checks=checks,
        criteria_met=all(c.met for c in checks),
        stop_reason=stop_reason or state.get("stop_reason", ""),
        decider_events=[DeciderEvent.model_validate(e) for e in state.get("decider_events") or []],
    )


def report(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    env = node_env("report", runtime)
    result = build_result(state)
    env.progress.emit(
        {"type": "result", "node": "report", "criteria_met": result.criteria_met, "stop_reason": result.stop_reason}
    )
    return {"result": result.model_dump(mode="json")}
