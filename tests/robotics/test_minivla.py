"""The mini-vla task: a seeded MuJoCo table scene, its instruction language, its action bins and its expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robopt.errors import EvaluationError
from robopt.robotics import minivla_scene as scene
from robopt.robotics.minivla_task import (
    ACTION_LIMIT,
    INSTRUCTION_LENGTH,
    SUCCESS_RADIUS,
    VOCABULARY,
    MiniVlaTask,
    action_to_bins,
    bin_centres,
    tokenize,
)
from robopt.robotics.rollout import expert_policy, run_episodes
from robopt.robotics.task import list_tasks, make_task

EVAL_SEEDS = range(1000, 1020)


@pytest.fixture(scope="module")
def task():
    task = MiniVlaTask()
    yield task
    task.close()


def test_registered_by_name() -> None:
    assert "mini-vla" in list_tasks()
    made = make_task("mini-vla")
    try:
        assert isinstance(made, MiniVlaTask)
        assert (made.action_dim, made.action_bins, made.control_hz) == (2, 256, 10.0)
    finally:
        made.close()


def test_reset_is_deterministic_per_seed(task: MiniVlaTask) -> None:
    first = task.reset(1003)
    instruction = task.instruction
    task.step(np.array([0.03, -0.02], dtype=np.float32))
    again = task.reset(1003)
    assert np.array_equal(first["image"], again["image"])
    assert np.array_equal(first["instruction"], again["instruction"]) and task.instruction == instruction
    other = task.reset(1004)
    assert not np.array_equal(first["image"], other["image"])


def test_model_inputs_match_the_declared_shapes(task: MiniVlaTask) -> None:
    image, instruction = task.model_inputs(task.reset(1000))
    assert image.shape == (1, 3, 64, 64) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.std()) > 0.01
    assert instruction.shape == (1, INSTRUCTION_LENGTH) and instruction.dtype == torch.int64
    words = [VOCABULARY[i] for i in instruction[0].tolist() if i]
    assert " ".join(words) == task.instruction
    assert any(colour in words for colour in scene.COLOUR_NAMES)


def test_balls_do_not_overlap_and_lie_in_reach() -> None:
    for seed in range(1000, 1050):
        layout = scene.sample_layout(seed, 4)
        gaps = [np.linalg.norm(a - b) for i, a in enumerate(layout.balls) for b in layout.balls[i + 1 :]]
        assert min(gaps) >= scene.BALL_MIN_GAP
        assert np.all(np.linalg.norm(layout.balls, axis=1) < scene.LINK1 + scene.LINK2)
        assert layout.target != layout.decoy


def test_expert_reaches_the_instructed_ball(task: MiniVlaTask) -> None:
    outcomes = run_episodes(task, expert_policy(task), EVAL_SEEDS)
    assert np.mean([o.success for o in outcomes]) >= 0.8


def test_holding_still_does_not_succeed(task: MiniVlaTask) -> None:
    outcomes = run_episodes(task, lambda observation: task.hold_action(), EVAL_SEEDS)
    assert np.mean([o.success for o in outcomes]) <= 0.1


def test_success_is_judged_on_the_target_not_the_named_ball() -> None:
    swapped = MiniVlaTask(swap_instruction=True)
    try:
        swapped.reset(1001)
        named = next(c for c in scene.COLOUR_NAMES if c in swapped.instruction.split())
        target = scene.COLOUR_NAMES[scene.sample_layout(1001, 4).target]
        assert named != target
        # The expert still reaches the real target, so it succeeds whatever the instruction says.
        assert np.mean([o.success for o in run_episodes(swapped, expert_policy(swapped), range(1000, 1005))]) == 1.0
    finally:
        swapped.close()


def test_success_radius(task: MiniVlaTask) -> None:
    task.reset(1002)
    for _ in range(task.max_steps):
        task.step(task.expert_action())
    assert task.target_distance() <= SUCCESS_RADIUS and task.success()


def test_tokenizer() -> None:
    ids = tokenize("Reach the red ball")
    assert ids.shape == (INSTRUCTION_LENGTH,) and ids[4:].tolist() == [0, 0]
    with pytest.raises(EvaluationError, match="cannot tokenize"):
        tokenize("reach the purple ball")


def test_action_bins_round_trip(task: MiniVlaTask) -> None:
    centres = bin_centres(256)
    assert centres.shape == (256,) and centres[0] > -ACTION_LIMIT and centres[-1] < ACTION_LIMIT
    action = np.array([0.0123, -0.031], dtype=np.float32)
    logits = torch.zeros(1, 2, 256)
    logits[0, torch.arange(2), torch.from_numpy(action_to_bins(action))] = 5.0
    decoded = task.decode_action(logits)
    assert np.allclose(decoded, action, atol=2 * ACTION_LIMIT / 256)
    with pytest.raises(EvaluationError, match="action logits of shape"):
        task.decode_action(torch.zeros(1, 2))


def test_step_rejects_bad_actions(task: MiniVlaTask) -> None:
    task.reset(1000)
    with pytest.raises(EvaluationError, match="finite action"):
        task.step(np.array([np.nan, 0.0]))
    with pytest.raises(EvaluationError, match="finite action"):
        task.step(np.zeros(3))


def test_step_before_reset() -> None:
    fresh = MiniVlaTask()
    try:
        with pytest.raises(EvaluationError, match="reset"):
            fresh.step(np.zeros(2))
    finally:
        fresh.close()


def test_fence_keeps_the_fingertip_in_view(task: MiniVlaTask) -> None:
    task.reset(1000)
    for _ in range(task.max_steps):
        task.step(np.array([-ACTION_LIMIT, -ACTION_LIMIT], dtype=np.float32))
    x, y = task.fingertip()
    assert scene.FENCE_X[0] - 0.01 <= x <= scene.FENCE_X[1] and scene.FENCE_Y[0] - 0.01 <= y <= scene.FENCE_Y[1]
    assert np.hypot(x - scene.FENCE_X[0], y - scene.FENCE_Y[0]) < 0.03  # it went as far as allowed: the corner
