"""The "reacher" task: gymnasium's MuJoCo Reacher-v5 two-link arm, driven by torques, with a Jacobian-transpose expert.

Success: the fingertip ends the episode (its final tick) within 2 cm of the target.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from robopt.errors import EvaluationError
from robopt.robotics.task import ClosedLoopTask, StepResult, ensure_headless_rendering, register_task

ENV_ID = "Reacher-v5"
SUCCESS_RADIUS_M = 0.02
# Jacobian-transpose PD gains, tuned on training seeds (0-499): a stiff virtual spring pulls the fingertip
# to the target; damping of the fingertip's velocity (task space) plus a little joint damping stops it there.
EXPERT_KP = 450.0
EXPERT_KV = 10.0
EXPERT_KD = 0.05


class ReacherTask(ClosedLoopTask):
    """Reacher-v5: a planar 2-link arm (0.1 m + 0.11 m) must bring its fingertip onto a random target.

    Observation (10,): cos q (2), sin q (2), target xy (2), joint velocities (2), fingertip - target xy (2).
    Action (2,): joint torques in [-1, 1] (motor gear 200). One tick is one env step (2 physics steps of
    10 ms), so the native control rate is 50 Hz; an episode lasts 50 ticks (1 simulated second).

    Success: the fingertip is within `SUCCESS_RADIUS_M` (2 cm) of the target at the end of the episode
    (after the final tick), measured between the `fingertip` and `target` bodies.
    """

    name: ClassVar[str] = "reacher"
    description: ClassVar[str] = (
        "MuJoCo Reacher-v5 (2-link arm, 50 Hz, 50 ticks): success = fingertip within 2 cm of the target "
        "at the final tick; expert = Jacobian-transpose PD controller"
    )
    control_hz: ClassVar[float] = 50.0
    max_steps: ClassVar[int] = 50
    action_dim: ClassVar[int] = 2
    observation_dim: ClassVar[int] = 10

    def __init__(self, kp: float = EXPERT_KP, kv: float = EXPERT_KV, kd: float = EXPERT_KD) -> None:
        ensure_headless_rendering()
        import gymnasium as gym
        import mujoco

        self._mujoco = mujoco
        self.kp, self.kv, self.kd = kp, kv, kd
        self._env = gym.make(ENV_ID)
        self.env = self._env.unwrapped  # the MuJoCo env: model, data, get_body_com
        if abs(1.0 / self.env.dt - self.control_hz) > 1e-6:
            raise EvaluationError(
                f"{ENV_ID} steps at {1.0 / self.env.dt:g} Hz, the reacher task assumes {self.control_hz:g} Hz",
                "the installed gymnasium changed Reacher's frame skip; update ReacherTask.control_hz",
            )
        self._fingertip = mujoco.mj_name2id(self.env.model, mujoco.mjtObj.mjOBJ_BODY, "fingertip")
        self._low = self._env.action_space.low.astype(np.float32)
        self._high = self._env.action_space.high.astype(np.float32)
        self._started = False

    def reset(self, seed: int) -> np.ndarray:
        observation, _ = self._env.reset(seed=int(seed))
        self._started = True
        return observation

    def step(self, action: np.ndarray) -> StepResult:
        self._require_started()
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        if action.shape != (self.action_dim,) or not np.isfinite(action).all():
            raise EvaluationError(
                f"reacher actions are 2 finite joint torques, got {action.tolist()}",
                "the policy must output [1, 2] values in [-1, 1]",
            )
        observation, reward, terminated, _truncated, _ = self._env.step(np.clip(action, self._low, self._high))
        return StepResult(observation=observation, reward=float(reward), terminated=bool(terminated))

    def fingertip_to_target(self) -> np.ndarray:
        """Target minus fingertip position in the arm's plane (metres)."""
        return (self.env.get_body_com("target") - self.env.get_body_com("fingertip"))[:2]

    def fingertip_distance(self) -> float:
        """Distance from the fingertip to the target (metres)."""
        return float(np.linalg.norm(self.fingertip_to_target()))

    def success(self) -> bool:
        """Fingertip within 2 cm of the target now; the rollout calls this after the episode's final tick."""
        self._require_started()
        return self.fingertip_distance() <= SUCCESS_RADIUS_M

    def model_inputs(self, observation: Any) -> tuple[torch.Tensor, ...]:
        """The 10-d observation as float32 [1, 10]."""
        return (torch.as_tensor(np.asarray(observation, dtype=np.float32).reshape(1, self.observation_dim)),)

    def decode_action(self, output: torch.Tensor) -> np.ndarray:
        """The model's [1, 2] output, clipped to the action space."""
        values = output.detach().to(torch.float32).cpu().numpy().reshape(-1)
        if values.shape != (self.action_dim,):
            raise EvaluationError(
                f"a reacher policy outputs 2 joint torques, got shape {list(output.shape)}",
                "the model must map [1, 10] observations to [1, 2] actions",
            )
        return np.clip(values, self._low, self._high)

    def expert_action(self) -> np.ndarray:
        """Jacobian-transpose PD control, clipped to the action space:
        torque = J^T (kp * (target - fingertip) - kv * fingertip_velocity) - kd * qdot, fingertip_velocity = J qdot."""
        self._require_started()
        model, data = self.env.model, self.env.data
        jacp = np.zeros((3, model.nv))
        self._mujoco.mj_jacBody(model, data, jacp, None, self._fingertip)
        jacobian = jacp[:2, :2]  # fingertip xy with respect to the two arm joints (the target joints come after)
        qdot = data.qvel[:2]
        force = self.kp * self.fingertip_to_target() - self.kv * (jacobian @ qdot)
        torque = jacobian.T @ force - self.kd * qdot
        return np.clip(torque, self._low, self._high).astype(np.float32)

    def close(self) -> None:
        self._env.close()

    def _require_started(self) -> None:
        if not self._started:
            raise EvaluationError("the reacher episode has not started", "call reset(seed) before stepping")


@register_task(ReacherTask.name, ReacherTask.description)
def make_reacher_task() -> ClosedLoopTask:
    return ReacherTask()
