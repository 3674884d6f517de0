"""Rollback agent: discards the failed candidate, proves the last accepted artifact is intact, and asks for
a new plan."""

from __future__ import annotations

from typing import Literal

from langgraph.runtime import Runtime
from langgraph.types import Command

from robopt.agents.common import ModelView, node_env
from robopt.graph.context import Context
from robopt.graph.state import State


def rollback(state: State, runtime: Runtime[Context]) -> Command[Literal["plan"]]:
    env = node_env("rollback", runtime)
    current = ModelView.of(state["current"])
    # Artifacts are immutable, so returning to the last accepted model is exact; verify it anyway.
    env.store.verify(current.artifact)
    last = (state.get("attempts") or [{}])[-1]
    env.progress.message(
        "rollback",
        f"back to {current.artifact.sha256[:12]} after {last.get('status')} "
        f"{last.get('step', {}).get('technique')}: {last.get('reason')}",
    )
    return Command(goto="plan", update={"candidate": None})
