"""The fetchreach task: seeded resets, the env's own 5 cm success test at the final tick, and the expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robopt.errors import EvaluationError
from robopt.robotics.fetchreach_task import FetchReachTask
from robopt.robotics.rollout import expert_policy, run_episodes
from robopt.robotics.task import list_tasks, make_task

EVAL_SEEDS = range(1000, 1030)


@pytest.fixture(scope="module")
def task():
    task = make_task("fetchreach")
    yield task
    task.close()


def _success_rate(task: FetchReachTask, policy, seeds=EVAL_SEEDS) -> float:
    return float(np.mean([o.success for o in run_episodes(task, policy, seeds)]))


def test_registered_with_the_native_rate(task) -> None:
    assert "fetchreach" in list_tasks()
    assert isinstance(task, FetchReachTask)
    assert task.control_hz == pytest.approx(1.0 / task.env.dt) == 25.0
    assert (task.max_steps, task.action_dim) == (50, 4)


def test_reset_is_deterministic_per_seed(task) -> None:
    first = task.reset(1000)
    action = np.array([0.5, -0.5, 0.2, 0.0], np.float32)
    after = task.step(action).observation
    again = task.reset(1000)
    for key in ("observation", "desired_goal", "achieved_goal"):
        np.testing.assert_array_equal(first[key], again[key])
    np.testing.assert_array_equal(task.step(action).observation["observation"], after["observation"])
    assert not np.array_equal(task.reset(1001)["desired_goal"], first["desired_goal"])


def _success_with_goal_offset(task: FetchReachTask, offset_m: float) -> tuple[bool, float]:
    """Put the goal `offset_m` (along x) from the gripper, hold still for one tick, return (success, distance)."""
    observation = task.reset(1000)
    task.env.goal = observation["observation"][:3] + np.array([offset_m, 0.0, 0.0])
    task.step(np.zeros(4, np.float32))
    return task.success(), task.goal_distance()


def test_success_is_the_envs_5cm_test(task) -> None:
    assert task.env.distance_threshold == 0.05
    near, near_distance = _success_with_goal_offset(task, 0.045)
    far, far_distance = _success_with_goal_offset(task, 0.055)
    assert near_distance < 0.05 < far_distance  # the gripper barely moves when holding still
    assert near and not far


def test_expert_succeeds_on_eval_seeds(task) -> None:
    assert _success_rate(task, expert_policy(task)) >= 0.9


def test_doing_nothing_fails(task) -> None:
    assert _success_rate(task, lambda observation: task.hold_action()) <= 0.2


def test_success_is_judged_after_the_final_tick(task) -> None:
    # The expert reaches the goal; driving the gripper away over the last 5 ticks makes the episode fail.
    ticks = {"n": 0}

    def leave_at_the_end(observation: object) -> np.ndarray:
        ticks["n"] += 1
        return np.array([1.0, 1.0, 1.0, 0.0], np.float32) if ticks["n"] > task.max_steps - 5 else task.expert_action()

    assert run_episodes(task, expert_policy(task), [1001])[0].success
    assert not run_episodes(task, leave_at_the_end, [1001])[0].success


def test_model_inputs_and_action_decoding(task) -> None:
    observation = task.reset(1002)
    (inputs,) = task.model_inputs(observation)
    assert inputs.shape == (1, 13) and inputs.dtype == torch.float32
    np.testing.assert_allclose(inputs.numpy()[0, :10], observation["observation"], rtol=1e-6)
    np.testing.assert_allclose(inputs.numpy()[0, 10:], observation["desired_goal"], rtol=1e-6)
    np.testing.assert_array_equal(task.decode_action(torch.tensor([[2.0, -3.0, 0.5, 0.0]])), [1.0, -1.0, 0.5, 0.0])
    with pytest.raises(EvaluationError, match="4 action values"):
        task.decode_action(torch.zeros(1, 2))
    with pytest.raises(EvaluationError, match="'observation' and 'desired_goal'"):
        task.model_inputs(np.zeros(13))


def test_expert_moves_towards_the_goal_with_fingers_still(task) -> None:
    observation = task.reset(1003)
    action = task.expert_action()
    direction = observation["desired_goal"] - observation["observation"][:3]
    assert action[3] == 0.0 and np.all(np.abs(action) <= 1.0)
    assert float(np.dot(action[:3], direction)) > 0


def test_bad_use_raises_typed_errors() -> None:
    fresh = FetchReachTask()
    try:
        with pytest.raises(EvaluationError, match="not started"):
            fresh.step(np.zeros(4, np.float32))
        fresh.reset(0)
        with pytest.raises(EvaluationError, match="4 finite values"):
            fresh.step(np.zeros(3))
    finally:
        fresh.close()
