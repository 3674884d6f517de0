"""The closed-loop task interface: a seeded simulated episode, the model's view of it, an expert, a success test.

Every simulated task (Reacher, FetchReach, the mini-VLA scene) implements `ClosedLoopTask` and registers a
factory under a dataset name, so the closed-loop evaluator can run it by name (`closed-loop:reacher`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from robopt.errors import EvaluationError


def ensure_headless_rendering() -> None:
    """MuJoCo rendering without a display needs MUJOCO_GL=egl set before mujoco is imported; without it the
    process dies on the first render. Call this before importing mujoco anywhere in robopt."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


@dataclass
class StepResult:
    observation: Any
    reward: float
    terminated: bool


class ClosedLoopTask(ABC):
    """One simulated task. Not thread-safe: one instance runs one episode at a time.

    Time: the simulator advances one control tick per `step`; `control_hz` ticks make one simulated second.
    Success is decided by `success()` at the end of the episode (after `max_steps` ticks or termination).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    control_hz: ClassVar[float]  # the task's native control rate: ticks per simulated second
    max_steps: ClassVar[int]  # ticks per episode
    action_dim: ClassVar[int]
    action_bins: ClassVar[int | None] = None  # set when the model emits discretized action tokens (logits per bin)

    @abstractmethod
    def reset(self, seed: int) -> Any:
        """Start the episode for `seed` (the same seed always gives the same initial state); return the observation."""

    @abstractmethod
    def step(self, action: np.ndarray) -> StepResult:
        """Apply `action` for one control tick."""

    @abstractmethod
    def success(self) -> bool:
        """Whether the episode so far counts as a success (called at the end of the episode)."""

    @abstractmethod
    def model_inputs(self, observation: Any) -> tuple[torch.Tensor, ...]:
        """The model's batch-1 input tensors for this observation."""

    @abstractmethod
    def decode_action(self, output: torch.Tensor) -> np.ndarray:
        """The environment action for the model's primary output (batch 1)."""

    @abstractmethod
    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current simulator state."""

    def hold_action(self) -> np.ndarray:
        """What the robot does before the first inference finishes: nothing (zero action)."""
        return np.zeros(self.action_dim, dtype=np.float32)

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release simulator and renderer resources."""


TaskFactory = Callable[[], ClosedLoopTask]
_TASKS: dict[str, tuple[TaskFactory, str]] = {}


def register_task(name: str, description: str) -> Callable[[TaskFactory], TaskFactory]:
    def decorator(factory: TaskFactory) -> TaskFactory:
        _TASKS[name] = (factory, description)
        return factory

    return decorator


def _ensure_builtin() -> None:
    import robopt.robotics.tasks  # noqa: F401  (registers the built-in tasks on import)


def list_tasks() -> dict[str, str]:
    _ensure_builtin()
    return {name: desc for name, (_, desc) in sorted(_TASKS.items())}


def make_task(name: str | None) -> ClosedLoopTask:
    _ensure_builtin()
    if name not in _TASKS:
        raise EvaluationError(
            f"no simulated task named {name!r}",
            f"closed-loop tasks: {', '.join(sorted(_TASKS))} (e.g. --evaluator closed-loop:reacher)",
        )
    return _TASKS[name][0]()
