"""Closed-loop rollouts: seeded episodes of a task driven by a policy, with a control-rate timing model.

Timing model. A control tick lasts 1/control_hz seconds and the simulator advances one tick per step. An
inference started at tick t on observation o_t takes `latency` seconds, so it spans
k = ceil(latency * control_hz) ticks (at least 1). Its action is applied from tick t + k - 1 on: an inference
that fits in one tick acts in the same tick (the ideal controller), and every further tick it spans delays it
by one tick, during which the robot keeps applying the previous action (zero before the first one is ready).
The next inference starts on the observation of the tick after the previous one finished. So a model that is
accurate but too slow for the control rate acts late and rarely, and fails in closed loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from robopt.errors import EvaluationError
from robopt.progress import Progress
from robopt.robotics.task import ClosedLoopTask

Policy = Callable[[object], np.ndarray]  # observation -> environment action


def ticks_per_inference(latency_ms: float | None, control_hz: float) -> int:
    """How many control ticks one inference spans (1 = acts within the tick it observed; None latency = ideal)."""
    if control_hz <= 0:
        raise EvaluationError(f"control rate must be positive, got {control_hz} Hz", "e.g. --control-rate 20Hz")
    if latency_ms is None:
        return 1
    # A tiny epsilon keeps a latency of exactly one period at one tick despite float rounding.
    return max(1, math.ceil(latency_ms / 1000.0 * control_hz - 1e-9))


@dataclass(frozen=True)
class EpisodeOutcome:
    seed: int
    success: bool
    episode_return: float
    steps: int
    inferences: int
    wall_s: float


def model_output(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The model's primary output (no grad) as float32 on CPU; non-finite outputs raise EvaluationError."""
    from robopt.evaluation.classification import call_model

    with torch.no_grad():
        output = call_model(model, inputs).detach().to(torch.float32).cpu()
    if not bool(torch.isfinite(output).all()):
        raise EvaluationError(
            "the policy produced non-finite outputs (NaN/inf)",
            "the model is numerically broken; it cannot drive a robot",
        )
    return output


def model_policy(task: ClosedLoopTask, model: nn.Module) -> Policy:
    """Drive `task` with `model`: encode the observation, run the model (eval mode, no grad), decode the action."""
    from robopt.evaluation.classification import set_eval_mode

    set_eval_mode(model)

    def policy(observation: object) -> np.ndarray:
        return task.decode_action(model_output(model, task.model_inputs(observation)))

    return policy


def expert_policy(task: ClosedLoopTask) -> Policy:
    """The task's scripted expert as a policy (it reads the simulator state, not the observation)."""
    return lambda observation: task.expert_action()


def run_episode(task: ClosedLoopTask, policy: Policy, seed: int, ticks: int = 1) -> EpisodeOutcome:
    """One seeded episode; `ticks` is how many control ticks each inference spans (see the module docstring)."""
    if ticks < 1:
        raise EvaluationError(f"ticks per inference must be >= 1, got {ticks}")
    start = time.perf_counter()
    observation = task.reset(seed)
    action = task.hold_action()
    pending: np.ndarray | None = None
    ready_at = 0
    total_reward = 0.0
    inferences = steps = 0
    for t in range(task.max_steps):
        if pending is None:
            pending = np.asarray(policy(observation), dtype=np.float32)
            ready_at = t + ticks - 1
            inferences += 1
        if t >= ready_at:
            action, pending = pending, None
        result = task.step(action)
        total_reward += float(result.reward)
        observation = result.observation
        steps = t + 1
        if result.terminated:
            break
    return EpisodeOutcome(
        seed=seed,
        success=bool(task.success()),
        episode_return=total_reward,
        steps=steps,
        inferences=inferences,
        wall_s=time.perf_counter() - start,
    )


def run_episodes(
    task: ClosedLoopTask,
    policy: Policy,
    seeds: Sequence[int],
    *,
    ticks: int = 1,
    progress: Progress | None = None,
    stage: str = "episodes",
) -> list[EpisodeOutcome]:
    """Run one episode per seed, in order, reporting progress (and honouring cancellation) per episode."""
    progress = progress or Progress()
    return [run_episode(task, policy, seed, ticks) for seed in progress.track(list(seeds), stage)]


def expert_demonstrations(
    task: ClosedLoopTask, seeds: Sequence[int], progress: Progress | None = None
) -> tuple[list[tuple[torch.Tensor, ...]], list[np.ndarray], list[bool]]:
    """Roll out the scripted expert on `seeds`: the model inputs seen at every tick, the expert's actions, and
    whether each episode succeeded. Behaviour cloning trains on these; offline proxies compare models on them."""
    progress = progress or Progress()
    inputs: list[tuple[torch.Tensor, ...]] = []
    actions: list[np.ndarray] = []
    successes: list[bool] = []
    for seed in progress.track(list(seeds), "demonstrations"):
        observation = task.reset(seed)
        for _ in range(task.max_steps):
            action = np.asarray(task.expert_action(), dtype=np.float32)
            inputs.append(task.model_inputs(observation))
            actions.append(action)
            result = task.step(action)
            observation = result.observation
            if result.terminated:
                break
        successes.append(bool(task.success()))
    return inputs, actions, successes
