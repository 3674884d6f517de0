"""The "fetchreach" task: gymnasium-robotics' FetchReach-v4 (7-DoF Fetch arm, Cartesian gripper control).

Success is the environment's own `is_success` at the final tick: the gripper within 5 cm of the goal.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, ClassVar

import numpy as np
import torch

from robopt.errors import EvaluationError
from robopt.robotics.task import ClosedLoopTask, StepResult, ensure_headless_rendering, register_task

ENV_ID = "FetchReach-v4"
# Proportional gain of the expert: an action of 1 moves the gripper's mocap target 5 cm, so a gain of 10 closes
# half of the remaining distance per tick without overshooting.
EXPERT_GAIN = 10.0


def _import_gymnasium_robotics() -> Any:
    # Importing it prints a notice about Adroit hand envs (unrelated to Fetch) to stderr; keep logs clean.
    with contextlib.redirect_stderr(io.StringIO()):
        import gymnasium_robotics
    return gymnasium_robotics


class FetchReachTask(ClosedLoopTask):
    """FetchReach-v4: move the Fetch gripper to a random 3-D goal within 15 cm of its start position.

    Model input (13,): the env's observation (gripper position 3, finger state 2, gripper linear velocity 3,
    finger velocities 2) followed by the desired goal (3). Action (4,): gripper displacement x, y, z and finger
    command, each in [-1, 1]. One tick is one env step (40 ms), so the native control rate is 25 Hz; an episode
    lasts 50 ticks (2 simulated seconds).

    Success: the environment's own definition, its `is_success` info after the final tick, which is true when
    the gripper (achieved goal) is closer than 5 cm to the desired goal.
    """

    name: ClassVar[str] = "fetchreach"
    description: ClassVar[str] = (
        "gymnasium-robotics FetchReach-v4 (Fetch arm, 25 Hz, 50 ticks): success = the env's is_success "
        "(gripper within 5 cm of the goal) at the final tick; expert = proportional control to the goal"
    )
    control_hz: ClassVar[float] = 25.0
    max_steps: ClassVar[int] = 50
    action_dim: ClassVar[int] = 4
    input_dim: ClassVar[int] = 13

    def __init__(self, gain: float = EXPERT_GAIN) -> None:
        ensure_headless_rendering()
        import gymnasium as gym

        gym.register_envs(_import_gymnasium_robotics())
        self.gain = gain
        self._env = gym.make(ENV_ID)
        self.env = self._env.unwrapped  # the robot env: model, data, goal, distance_threshold
        if abs(1.0 / self.env.dt - self.control_hz) > 1e-6:
            raise EvaluationError(
                f"{ENV_ID} steps at {1.0 / self.env.dt:g} Hz, the fetchreach task assumes {self.control_hz:g} Hz",
                "the installed gymnasium-robotics changed the Fetch step; update FetchReachTask.control_hz",
            )
        self._observation: dict[str, np.ndarray] | None = None
        self._success = False

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        observation, _ = self._env.reset(seed=int(seed))
        self._observation = observation
        # Before the first tick the env reports no is_success; judge the start with the env's own test.
        self._success = bool(self.env._is_success(observation["achieved_goal"], observation["desired_goal"]))
        return observation

    def step(self, action: np.ndarray) -> StepResult:
        self._require_started()
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        if action.shape != (self.action_dim,) or not np.isfinite(action).all():
            raise EvaluationError(
                f"fetchreach actions are 4 finite values, got {action.tolist()}",
                "the policy must output [1, 4] values in [-1, 1]",
            )
        observation, reward, terminated, _truncated, info = self._env.step(np.clip(action, -1.0, 1.0))
        self._observation = observation
        self._success = bool(info["is_success"])
        return StepResult(observation=observation, reward=float(reward), terminated=bool(terminated))

    def goal_distance(self) -> float:
        """Distance from the gripper to the goal (metres) at the latest observation."""
        self._require_started()
        assert self._observation is not None
        return float(np.linalg.norm(self._observation["achieved_goal"] - self._observation["desired_goal"]))

    def success(self) -> bool:
        """The env's `is_success` after the latest tick (gripper within 5 cm of the goal); judged after the last."""
        self._require_started()
        return self._success

    def model_inputs(self, observation: Any) -> tuple[torch.Tensor, ...]:
        """concat(observation (10), desired_goal (3)) as float32 [1, 13]."""
        try:
            features = np.concatenate([observation["observation"], observation["desired_goal"]])
        except (KeyError, TypeError, IndexError) as e:
            raise EvaluationError(
                f"a fetchreach observation is a dict with 'observation' and 'desired_goal', got {type(observation)}",
                "pass the observation returned by reset/step",
            ) from e
        return (torch.as_tensor(features.astype(np.float32).reshape(1, self.input_dim)),)

    def decode_action(self, output: torch.Tensor) -> np.ndarray:
        """The model's [1, 4] output, clipped to [-1, 1]."""
        values = output.detach().to(torch.float32).cpu().numpy().reshape(-1)
        if values.shape != (self.action_dim,):
            raise EvaluationError(
                f"a fetchreach policy outputs 4 action values, got shape {list(output.shape)}",
                "the model must map [1, 13] inputs to [1, 4] actions",
            )
        return np.clip(values, -1.0, 1.0)

    def expert_action(self) -> np.ndarray:
        """Proportional control: move the gripper by clip(gain * (goal - gripper)), leave the fingers alone."""
        self._require_started()
        assert self._observation is not None
        grip = self._observation["observation"][:3]
        action = np.zeros(self.action_dim, dtype=np.float32)
        action[:3] = np.clip(self.gain * (self._observation["desired_goal"] - grip), -1.0, 1.0)
        return action

    def close(self) -> None:
        self._env.close()

    def _require_started(self) -> None:
        if self._observation is None:
            raise EvaluationError("the fetchreach episode has not started", "call reset(seed) before stepping")


@register_task(FetchReachTask.name, FetchReachTask.description)
def make_fetchreach_task() -> ClosedLoopTask:
    return FetchReachTask()
