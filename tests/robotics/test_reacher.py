"""The reacher task: seeded resets, the 2 cm success test at the end of the episode, and the scripted expert."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
import torch

from robopt.errors import EvaluationError
from robopt.robotics.reacher_task import SUCCESS_RADIUS_M, ReacherTask
from robopt.robotics.rollout import expert_policy, run_episodes
from robopt.robotics.task import list_tasks, make_task

EVAL_SEEDS = range(1000, 1030)


@pytest.fixture(scope="module")
def task():
    task = make_task("reacher")
    yield task
    task.close()


def _success_rate(task: ReacherTask, policy, seeds=EVAL_SEEDS) -> float:
    return float(np.mean([o.success for o in run_episodes(task, policy, seeds)]))


def test_registered_with_the_native_rate(task) -> None:
    assert "reacher" in list_tasks()
    assert isinstance(task, ReacherTask)
    assert task.control_hz == pytest.approx(1.0 / task.env.dt) == 50.0
    assert (task.max_steps, task.action_dim) == (50, 2)


def test_reset_is_deterministic_per_seed(task) -> None:
    first = task.reset(1000)
    actions = [np.array([0.3, -0.7], np.float32), np.array([-1.0, 0.2], np.float32)]
    trajectory = [task.step(a).observation for a in actions]
    again = task.reset(1000)
    np.testing.assert_array_equal(first, again)
    for action, observation in zip(actions, trajectory, strict=True):
        np.testing.assert_array_equal(task.step(action).observation, observation)
    assert not np.array_equal(task.reset(1001), first)


def _place_target(task: ReacherTask, offset_m: float) -> None:
    """Put the target `offset_m` from the fingertip (along x) and recompute positions."""
    data = task.env.data
    data.qpos[2:4] = task.env.get_body_com("fingertip")[:2] + np.array([offset_m, 0.0])
    data.qvel[:] = 0.0
    mujoco.mj_forward(task.env.model, data)


def test_success_is_fingertip_within_2cm(task) -> None:
    assert SUCCESS_RADIUS_M == 0.02
    task.reset(1000)
    _place_target(task, 0.019)
    assert task.fingertip_distance() == pytest.approx(0.019, abs=1e-9)
    assert task.success()
    _place_target(task, 0.021)
    assert task.fingertip_distance() == pytest.approx(0.021, abs=1e-9)
    assert not task.success()


def test_success_is_judged_after_the_final_tick(task) -> None:
    # The expert holds the fingertip on the target; when the arm is pushed away on the last tick it fails.
    outcome = run_episodes(task, expert_policy(task), [1000])[0]
    assert outcome.success and outcome.steps == task.max_steps
    final_distance = task.fingertip_distance()
    assert final_distance <= SUCCESS_RADIUS_M

    def push_away_at_the_end(observation: object) -> np.ndarray:
        late = task.env.data.time >= (task.max_steps - 10) * task.env.dt - 1e-9
        return np.array([1.0, 1.0], np.float32) if late else task.expert_action()

    pushed = run_episodes(task, push_away_at_the_end, [1000])[0]
    assert not pushed.success and task.fingertip_distance() > SUCCESS_RADIUS_M


def test_expert_succeeds_on_eval_seeds(task) -> None:
    assert _success_rate(task, expert_policy(task)) >= 0.9


def test_doing_nothing_fails(task) -> None:
    assert _success_rate(task, lambda observation: task.hold_action()) <= 0.1


def test_model_inputs_and_action_decoding(task) -> None:
    observation = task.reset(1003)
    (inputs,) = task.model_inputs(observation)
    assert inputs.shape == (1, 10) and inputs.dtype == torch.float32
    np.testing.assert_allclose(inputs.numpy()[0], observation, rtol=1e-6)
    # the last two observation entries are fingertip - target
    np.testing.assert_allclose(observation[8:10], -task.fingertip_to_target(), atol=1e-9)
    np.testing.assert_array_equal(task.decode_action(torch.tensor([[3.0, -0.25]])), [1.0, -0.25])
    with pytest.raises(EvaluationError, match="2 joint torques"):
        task.decode_action(torch.zeros(1, 3))


def test_expert_action_is_bounded(task) -> None:
    task.reset(1004)
    for _ in range(5):
        action = task.expert_action()
        assert action.shape == (2,) and action.dtype == np.float32 and np.all(np.abs(action) <= 1.0)
        task.step(action)


def test_bad_use_raises_typed_errors() -> None:
    fresh = ReacherTask()
    try:
        with pytest.raises(EvaluationError, match="not started"):
            fresh.step(np.zeros(2, np.float32))
        fresh.reset(0)
        with pytest.raises(EvaluationError, match="2 finite joint torques"):
            fresh.step(np.array([np.nan, 0.0]))
        with pytest.raises(EvaluationError, match="2 finite joint torques"):
            fresh.step(np.zeros(3))
    finally:
        fresh.close()
