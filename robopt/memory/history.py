"""Cross-session history of attempts, kept in the LangGraph Store and read by the planner."""

from __future__ import annotations

import hashlib
from typing import Any

from langgraph.store.base import BaseStore

from robopt.domain.records import Attempt

_ROOT = ("robopt", "attempts")


def _namespace(fingerprint: str) -> tuple[str, ...]:
    return (*_ROOT, hashlib.sha256(fingerprint.encode()).hexdigest()[:16])


def record_attempt(store: BaseStore | None, attempt: Attempt) -> None:
    """Keep an attempt (with its metrics) for future planning on models with the same fingerprint."""
    if store is None or attempt.model_fingerprint is None:
        return
    key = f"{attempt.session}:{attempt.index}"
    store.put(_namespace(attempt.model_fingerprint), key, attempt.model_dump(mode="json"))


def past_attempts(store: BaseStore | None, fingerprint: str, *, exclude_session: str | None = None) -> list[Attempt]:
    """Attempts recorded for models with this fingerprint in other sessions, oldest first."""
    if store is None:
        return []
    items = store.search(_namespace(fingerprint), limit=1000)
    attempts = [Attempt.model_validate(item.value) for item in items]
    attempts = [a for a in attempts if a.session != exclude_session]
    return sorted(attempts, key=lambda a: (a.session or "", a.index))


def summarize(attempts: list[Attempt]) -> list[dict[str, Any]]:
    """A compact view for prompts and reports."""
    return [
        {
            "session": a.session,
            "technique": a.step.technique,
            "config": a.step.config,
            "status": a.status,
            "reason": a.reason,
            "size_bytes": a.measurement.size_bytes if a.measurement else None,
            "metrics": a.measurement.metrics if a.measurement else {},
        }
        for a in attempts
    ]
