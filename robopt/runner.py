"""Running, resuming, inspecting and rolling back checkpointed sessions of the optimization graph."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from langgraph.types import StateSnapshot

from robopt.agents.report import build_result
from robopt.domain.plan import OptimizationResult
from robopt.domain.records import ArtifactRef
from robopt.errors import CheckpointNotFoundError, SessionNotFoundError
from robopt.graph.build import build_graph
from robopt.graph.context import Context
from robopt.memory.artifacts import ArtifactStore
from robopt.memory.checkpointer import open_persistence

EventHandler = Callable[[dict[str, Any]], None]


def new_session_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _config(session: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    configurable = {"thread_id": session}
    if checkpoint_id:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


@dataclass
class SessionOutcome:
    """The state a run ended in; `finished` is False when it stopped early (crash, cancel) and can resume."""

    session: str
    values: dict[str, Any]
    finished: bool

    def result(self) -> OptimizationResult:
        if self.values.get("result"):
            return OptimizationResult.model_validate(self.values["result"])
        if "current" not in self.values:
            raise SessionNotFoundError(
                f"session {self.session} stopped before its baseline was measured",
                f"resume it with `robopt resume {self.session}`",
            )
        return build_result(self.values, stop_reason="unfinished: resume to continue")  # type: ignore[arg-type]


def run_session(
    inputs: dict[str, Any] | None,
    *,
    session: str,
    context: Context,
    on_event: EventHandler | None = None,
    checkpoint_id: str | None = None,
) -> SessionOutcome:
    """Run (inputs given) or resume (inputs None) a session until it ends; events go to `on_event`.
    `checkpoint_id` (an id or unique prefix) resumes from that checkpoint instead of the last, forking there."""
    emit = on_event or (lambda event: None)
    with open_persistence(context.settings()) as persistence:
        graph = build_graph(persistence.checkpointer, persistence.store)
        if checkpoint_id:
            checkpoint_id = _find_checkpoint(graph, session, checkpoint_id).config["configurable"]["checkpoint_id"]
        if inputs is None:
            snapshot = graph.get_state(_config(session, checkpoint_id))
            if not snapshot.values:
                raise SessionNotFoundError(f"no session {session!r}", "`robopt sessions` lists the sessions")
        emit({"type": "session", "session": session, "resumed": inputs is None})
        for mode, chunk in graph.stream(
            inputs, _config(session, checkpoint_id), context=context, stream_mode=["custom", "updates"]
        ):
            if mode == "custom":
                emit(chunk)
            elif mode == "updates":
                for node in chunk:
                    emit({"type": "node", "node": node, "status": "end"})
        final = graph.get_state(_config(session))
        return SessionOutcome(session, dict(final.values), finished=not final.next)


def _history(graph: Any, session: str) -> list[StateSnapshot]:
    snapshots = list(graph.get_state_history(_config(session)))
    if not snapshots:
        raise SessionNotFoundError(f"no session {session!r}", "`robopt sessions` lists the sessions")
    return snapshots


def _find_checkpoint(graph: Any, session: str, checkpoint: str) -> StateSnapshot:
    """The one checkpoint of `session` whose id starts with `checkpoint`."""
    matches = [s for s in _history(graph, session) if s.config["configurable"]["checkpoint_id"].startswith(checkpoint)]
    if len(matches) != 1:
        raise CheckpointNotFoundError(
            f"{len(matches) or 'no'} checkpoints of session {session} match {checkpoint!r}",
            f"`robopt history {session}` lists its checkpoints",
        )
    return matches[0]


def session_history(session: str, context: Context) -> list[dict[str, Any]]:
    """Checkpoints of a session, oldest first, each with the accepted model and attempt count at that point."""
    with open_persistence(context.settings()) as persistence:
        graph = build_graph(persistence.checkpointer, persistence.store)
        rows = []
        for snap in reversed(_history(graph, session)):
            values = snap.values
            current = values.get("current") or {}
            measurement = current.get("measurement") or {}
            rows.append(
                {
                    "checkpoint": snap.config["configurable"]["checkpoint_id"],
                    "created_at": snap.created_at,
                    "step": snap.metadata.get("step") if snap.metadata else None,
                    "source": snap.metadata.get("source") if snap.metadata else None,
                    "next": list(snap.next),
                    "attempts": len(values.get("attempts") or []),
                    "artifact": (current.get("artifact") or {}).get("sha256"),
                    "size_bytes": measurement.get("size_bytes"),
                    "latency_ms_p50": measurement.get("latency_ms_p50"),
                    "metrics": measurement.get("metrics") or {},
                }
            )
        return rows


def session_state(session: str, context: Context) -> SessionOutcome:
    with open_persistence(context.settings()) as persistence:
        graph = build_graph(persistence.checkpointer, persistence.store)
        snap = _history(graph, session)[0]
        return SessionOutcome(session, dict(snap.values), finished=not snap.next)


def rollback_session(session: str, checkpoint: str, context: Context) -> OptimizationResult:
    """Make the accepted model at `checkpoint` (an id or unique prefix) the session's result, as a new checkpoint."""
    with open_persistence(context.settings()) as persistence:
        graph = build_graph(persistence.checkpointer, persistence.store)
        target = _find_checkpoint(graph, session, checkpoint)
        if "current" not in target.values:
            raise CheckpointNotFoundError(
                f"checkpoint {checkpoint} is before the baseline was measured; there is no model to restore",
                "pick a later checkpoint from `robopt history`",
            )
        artifacts = ArtifactStore(context.settings().artifacts_dir)
        artifacts.verify(ArtifactRef.model_validate(target.values["current"]["artifact"]))
        reason = f"rolled back to checkpoint {target.config['configurable']['checkpoint_id']}"
        result = build_result(target.values, stop_reason=reason)  # type: ignore[arg-type]
        graph.update_state(
            target.config, {"result": result.model_dump(mode="json"), "stop_reason": reason}, as_node="report"
        )
        return result


def list_sessions(context: Context) -> list[dict[str, Any]]:
    """Every session in the database with its latest status."""
    with open_persistence(context.settings()) as persistence:
        graph = build_graph(persistence.checkpointer, persistence.store)
        threads: dict[str, Any] = {}
        for checkpoint in persistence.checkpointer.list(None):
            thread = checkpoint.config["configurable"]["thread_id"]
            threads.setdefault(thread, checkpoint)
        rows = []
        for thread in threads:
            snap = graph.get_state(_config(thread))
            values = snap.values
            result = values.get("result") or {}
            rows.append(
                {
                    "session": thread,
                    "model": values.get("model"),
                    "updated_at": snap.created_at,
                    "status": "finished" if not snap.next else f"stopped before {', '.join(snap.next)}",
                    "attempts": len(values.get("attempts") or []),
                    "criteria_met": result.get("criteria_met"),
                }
            )
        return sorted(rows, key=lambda r: r["updated_at"] or "", reverse=True)
