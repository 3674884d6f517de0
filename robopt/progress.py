"""Progress events and cancellation for long loops, independent of LangGraph (nodes adapt it to the custom stream)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from robopt.errors import CancelledError

T = TypeVar("T")
Emit = Callable[[dict[str, Any]], None]


def _no_emit(event: dict[str, Any]) -> None:
    return None


@dataclass
class Progress:
    """Emits `{"type": "progress", "node", "stage", "current", "total", "message"}` events.

    `cancel` is a shared event: setting it makes the next `check()` raise CancelledError, so every long
    loop that reports progress can also be stopped.
    """

    emit: Emit = _no_emit
    node: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    min_interval_s: float = 0.1
    _last: dict[str, float] = field(default_factory=dict, repr=False)

    def check(self) -> None:
        if self.cancel.is_set():
            raise CancelledError("the run was cancelled", "resume it later with `robopt resume SESSION`")

    def message(self, stage: str, message: str) -> None:
        self.emit({"type": "progress", "node": self.node, "stage": stage, "message": message})

    def update(self, stage: str, current: int, total: int | None = None, message: str = "") -> None:
        """Report `current` of `total`; rate-limited except for the first and last update."""
        self.check()
        now = time.monotonic()
        last = current == total or current == 0
        if not last and now - self._last.get(stage, 0.0) < self.min_interval_s:
            return
        self._last[stage] = now
        self.emit(
            {
                "type": "progress",
                "node": self.node,
                "stage": stage,
                "current": current,
                "total": total,
                "message": message,
            }
        )

    def track(self, items: Iterable[T], stage: str, total: int | None = None) -> Iterator[T]:
        """Iterate, reporting progress and honouring cancellation at each item."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        self.update(stage, 0, total)
        i = 0
        for i, item in enumerate(items, 1):
            yield item
            self.update(stage, i, total)

    def child(self, node: str) -> Progress:
        """Same sink and cancel flag, another node name."""
        return Progress(emit=self.emit, node=node, cancel=self.cancel, min_interval_s=self.min_interval_s)


def langgraph_progress(node: str, cancel: threading.Event | None = None) -> Progress:
    """A Progress that writes to LangGraph's custom stream when running inside a graph node."""
    cancel = cancel or threading.Event()
    try:
        from langgraph.config import get_stream_writer

        writer = get_stream_writer()
    except RuntimeError:  # outside a runnable context there is no stream to write to
        return Progress(node=node, cancel=cancel)
    return Progress(emit=writer, node=node, cancel=cancel)
