"""Planning agent: picks the next chain of techniques from criteria, analysis and history (LLM or rules)."""

from __future__ import annotations

import time
from typing import Literal

from langgraph.runtime import Runtime
from langgraph.types import Command

from robopt.agents.common import ModelView, attempts_of, criteria_of, decider_event, history_key, node_env
from robopt.agents.deciders.chat_model import resolve_chat_model
from robopt.agents.deciders.llm_planner import llm_plan
from robopt.agents.deciders.rule_planner import rule_plan
from robopt.domain.plan import OptimizationPlan
from robopt.graph.context import Context
from robopt.graph.state import State
from robopt.memory.history import past_attempts
from robopt.tools.registry import list_techniques, plannable


def stop_reason(state: State, context: Context) -> str | None:
    """Why no further attempt may start, or None."""
    criteria = criteria_of(state)
    attempts = state.get("attempts") or []
    if criteria.time_budget_s is not None and time.time() - state["started_at"] > criteria.time_budget_s:
        return f"time budget of {criteria.time_budget_s:g} s spent"
    if len(attempts) >= context.max_attempts:
        return f"attempt limit reached ({context.max_attempts})"
    if state.get("replans", 0) > context.max_replans:
        return f"replan limit reached ({context.max_replans})"
    return None


def mark_chains(plan: OptimizationPlan) -> OptimizationPlan:
    """A step followed by a recovery step is judged together with it (provisional), whoever planned it."""
    families = {t.name: t.family for t in list_techniques()}
    steps = [
        step.model_copy(update={"judged_with_next": True})
        if i + 1 < len(plan.steps) and families.get(plan.steps[i + 1].technique) == "recovery"
        else step
        for i, step in enumerate(plan.steps)
    ]
    return plan.model_copy(update={"steps": steps})


def plan(state: State, runtime: Runtime[Context]) -> Command[Literal["optimize", "report"]]:
    env = node_env("plan", runtime)
    if reason := stop_reason(state, env.context):
        return Command(goto="report", update={"stop_reason": reason})
    current = ModelView.of(state["current"])
    baseline = ModelView.of(state["baseline"])
    criteria = criteria_of(state)
    attempts = attempts_of(state)
    history = past_attempts(runtime.store, history_key(state), exclude_session=state.get("session"))
    allowed = set(state["techniques"]) if state.get("techniques") else None
    events: list[dict] = []

    result: OptimizationPlan | None = None
    chat, error = resolve_chat_model(env.context)
    if error:
        events.append(decider_event("plan", "llm", False, error))
    if chat is not None:
        usable = [t for t in plannable(allowed) if t.outlook(current.analysis).applicable]
        try:
            result = llm_plan(
                chat,
                techniques=usable,
                analysis=current.analysis,
                current=current.measurement,
                criteria=criteria,
                attempts=attempts,
                past_attempts=history,
            )
            events.append(decider_event("plan", "llm", True, result.summary))
        except Exception as e:  # any provider, parsing or registry failure: recorded, then the rules decide
            events.append(decider_event("plan", "llm", False, f"invalid plan: {type(e).__name__}: {e}"))
            result = None
    if result is None:
        result = rule_plan(
            analysis=current.analysis,
            current=current.measurement,
            baseline=baseline.measurement,
            criteria=criteria,
            attempts=attempts,
            past_attempts=history,
            allowed=allowed,
        )
        events.append(decider_event("plan", "rules", True, result.summary))
    result = mark_chains(result)
    env.progress.emit({"type": "plan", "node": "plan", "plan": result.model_dump(mode="json")})
    update = {
        "plan": result.model_dump(mode="json"),
        "cursor": 0,
        "replans": state.get("replans", 0) + 1,
        "decider_events": events,
    }
    if not result.steps:
        return Command(goto="report", update={**update, "stop_reason": result.summary or "nothing left to try"})
    return Command(goto="optimize", update=update)
