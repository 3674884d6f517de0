"""Evaluation agent: measures the candidate, judges it against the criteria, and accepts it or sends it to rollback."""

from __future__ import annotations

from typing import Literal

from langgraph.runtime import Runtime
from langgraph.types import Command

from robopt.agents.common import (
    ModelView,
    criteria_of,
    history_key,
    log_attempt,
    model_state,
    node_env,
    profile,
)
from robopt.agents.planning import stop_reason
from robopt.domain.plan import OptimizationPlan
from robopt.domain.records import ArtifactRef, Attempt, PlanStep
from robopt.errors import EvaluationError, PrefilterRejectedError
from robopt.evaluation.judge import judge_candidate
from robopt.graph.context import Context
from robopt.graph.state import State


def _has_next_step(state: State) -> bool:
    plan = OptimizationPlan.model_validate(state["plan"]) if state.get("plan") else None
    return plan is not None and state.get("cursor", 0) + 1 < len(plan.steps)


def evaluate(state: State, runtime: Runtime[Context]) -> Command[Literal["optimize", "plan", "rollback", "report"]]:
    env = node_env("evaluate", runtime)
    candidate = state["candidate"]
    assert candidate is not None, "evaluate runs only after optimize produced a candidate"
    step = PlanStep.model_validate(candidate["step"])
    ref = ArtifactRef.model_validate(candidate["artifact"])
    current = ModelView.of(state["current"])
    baseline = ModelView.of(state["baseline"])
    attempt = Attempt(
        index=candidate["index"],
        step=step,
        status="rejected",
        input_artifact=current.artifact.sha256,
        artifact=ref,
        backend=candidate["backend"],
        duration_s=candidate["duration_s"],
        session=state.get("session"),
        model_fingerprint=history_key(state),
    )
    try:
        measured = profile(state, env, ref)
    except PrefilterRejectedError as e:
        attempt.reason = e.message
        return Command(goto="rollback", update={"attempts": [log_attempt(env, attempt)]})
    except EvaluationError as e:
        attempt.reason = f"evaluation failed: {e.message}"
        return Command(goto="rollback", update={"attempts": [log_attempt(env, attempt)]})

    anchor = ModelView.of(state["chain_anchor"]) if state.get("chain_anchor") else None
    verdict = judge_candidate(
        measured.measurement,
        (anchor or current).measurement,  # a chain's closing step counts the chain's gain
        baseline.measurement,
        criteria_of(state),
        provisional=step.judged_with_next and _has_next_step(state),
    )
    attempt.measurement = measured.measurement
    attempt.reason = verdict.reason
    if not verdict.accepted:
        return Command(goto="rollback", update={"attempts": [log_attempt(env, attempt)]})

    attempt.status = "accepted"
    update = {
        "attempts": [log_attempt(env, attempt)],
        "current": model_state(ref, measured.measurement, measured.analysis),
        "candidate": None,
        # while a chain is open, rollback returns to the model before it; a step judged in full closes the chain
        "chain_anchor": (state.get("chain_anchor") or state["current"]) if verdict.provisional else None,
    }
    if verdict.criteria_met:
        return Command(goto="report", update={**update, "stop_reason": "all criteria met"})
    plan = OptimizationPlan.model_validate(state["plan"])
    cursor = state.get("cursor", 0) + 1
    if cursor < len(plan.steps):
        # the time and attempt limits hold inside a plan too (the plan node checks them between plans)
        so_far: State = {**state, "attempts": [*(state.get("attempts") or []), *update["attempts"]]}  # type: ignore[typeddict-item]
        if reason := stop_reason(so_far, env.context):
            return Command(goto="report", update={**update, "stop_reason": reason})
        return Command(goto="optimize", update={**update, "cursor": cursor})
    return Command(goto="plan", update=update)
