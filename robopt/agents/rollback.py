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
    update: dict = {"candidate": None}
    anchor = state.get("chain_anchor")
    undone: list[int] = []
    if anchor:  # the failed step closed a chain: its provisional steps go too
        chain_start = ModelView.of(anchor).artifact.sha256
        undone = _provisional_attempts(state, chain_start)
        update.update(current=anchor, chain_anchor=None, rolled_back=undone)
    current = ModelView.of(anchor or state["current"])
    # Artifacts are immutable, so returning to the last accepted model is exact; verify it anyway.
    env.store.verify(current.artifact)
    last = (state.get("attempts") or [{}])[-1]
    also = f" (and the provisional step(s) {undone} of its chain)" if undone else ""
    env.progress.message(
        "rollback",
        f"back to {current.artifact.sha256[:12]} after {last.get('status')} "
        f"{last.get('step', {}).get('technique')}{also}: {last.get('reason')}",
    )
    return Command(goto="plan", update=update)


def _provisional_attempts(state: State, chain_start: str) -> list[int]:
    """Indices of the accepted attempts since the model `chain_start` (the chain being undone)."""
    undone: list[int] = []
    earlier = set(state.get("rolled_back") or [])
    model = chain_start
    for attempt in state.get("attempts") or []:
        if attempt["index"] in earlier:
            continue
        if attempt.get("status") == "accepted" and attempt.get("input_artifact") == model:
            undone.append(attempt["index"])
            model = (attempt.get("artifact") or {}).get("sha256", model)
    return undone
