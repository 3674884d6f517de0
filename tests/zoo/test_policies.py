"""The reacher-policy and fetchreach-policy zoo entries: cloned MLP policies that drive their simulated robots."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from robopt import zoo
from robopt.progress import Progress
from robopt.robotics.reacher_task import ReacherTask
from robopt.robotics.rollout import expert_policy, model_policy, run_episodes
from robopt.robotics.task import make_task
from robopt.zoo import load_card_model
from robopt.zoo.bc_policy import CloningConfig, MLPPolicy, clone_policy

EVAL_SEEDS = range(1000, 1050)
POLICIES = {  # zoo name -> (task name, input width, action width, minimum success on the 50 evaluation seeds)
    "reacher-policy": ("reacher", 10, 2, 0.88),
    "fetchreach-policy": ("fetchreach", 13, 4, 0.9),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread_inference():
    # Batch-1 MLP inference gains nothing from more threads, and idle torch worker threads spinning between
    # calls slow the simulator down several times on a 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(POLICIES))
def built(request, data_dir):
    name = request.param
    weights, card = zoo.resolve(name, data_dir / "zoo")
    task = make_task(POLICIES[name][0])
    yield name, weights, card, load_card_model(weights, card), task
    task.close()


def _success_rate(task, policy, seeds=EVAL_SEEDS, ticks: int = 1) -> float:
    return float(np.mean([o.success for o in run_episodes(task, policy, seeds, ticks=ticks)]))


def test_card_describes_a_self_contained_mlp_policy(built) -> None:
    name, weights, card, model, _ = built
    task_name, width, actions, _ = POLICIES[name]
    assert card.kind == "module" and card.family == "mlp-policy"
    assert card.architecture == "robopt.zoo.bc_policy:MLPPolicy"
    assert card.input_spec.inputs[0].name == "observation"
    assert card.input_spec.inputs[0].shape == [1, width] and card.input_spec.inputs[0].dtype == "float32"
    assert card.evaluator.name == "closed-loop" and card.evaluator.dataset == task_name
    assert card.evaluator.options == {"episodes": 50}
    assert card.suggested_criteria["max_accuracy_drop"] == "10%"
    # the architecture kwargs rebuild the class exactly, normalisation statistics included in the weights
    state = load_file(str(weights))
    assert set(state) == set(MLPPolicy(**card.architecture_kwargs).state_dict())
    assert {"observation_mean", "observation_std"} <= set(state)
    assert bool((state["observation_std"] > 0).all()) and not bool((state["observation_mean"] == 0).all())
    assert model(torch.zeros(1, width)).shape == (1, actions)


def test_policy_reaches_near_expert_success(built) -> None:
    name, _, _, model, task = built
    expert = _success_rate(task, expert_policy(task))
    policy = _success_rate(task, model_policy(task, model))
    assert expert >= 0.9
    assert policy >= POLICIES[name][3] and policy >= expert - 0.1


def test_zeroed_and_noised_weights_fail(built) -> None:
    _, _, _, model, task = built
    zeroed, noised = copy.deepcopy(model), copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in zeroed.parameters():
            p.zero_()
        for p in noised.parameters():  # noise as large as the weights themselves
            p.add_(torch.randn(p.shape, generator=generator) * p.std())
    seeds = range(1000, 1030)
    assert _success_rate(task, model_policy(task, zeroed), seeds) <= 0.2
    assert _success_rate(task, model_policy(task, noised), seeds) <= 0.2


LATE_TICKS = {"reacher-policy": 5, "fetchreach-policy": 10}  # 100 ms and 400 ms late


def test_late_actions_break_the_policy(built) -> None:
    name, _, _, model, task = built
    seeds = range(1000, 1030)
    on_time = _success_rate(task, model_policy(task, model), seeds)
    late = _success_rate(task, model_policy(task, model), seeds, ticks=LATE_TICKS[name])
    assert on_time >= 0.85 and late <= 0.3


SMALL = CloningConfig(demonstration_seeds=range(6), dagger_seeds=[range(6, 9)], epochs=2, batch_size=64)
SMALL_KWARGS = {"observation_dim": 10, "action_dim": 2, "hidden": 32, "depth": 2}


def test_cloning_is_deterministic_and_reports_progress() -> None:
    events: list[dict] = []
    first = clone_policy(ReacherTask, SMALL, 0, Progress(emit=events.append, min_interval_s=0), SMALL_KWARGS)
    second = clone_policy(ReacherTask, SMALL, 0, Progress(), SMALL_KWARGS)
    other = clone_policy(ReacherTask, SMALL, 1, Progress(), SMALL_KWARGS)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not torch.equal(first.net[0].weight, other.net[0].weight)
    train = [(e["current"], e["total"]) for e in events if e["stage"] == "train" and "current" in e]
    assert train == [(i, SMALL.total_epochs) for i in range(SMALL.total_epochs + 1)]
    assert {e["stage"] for e in events} >= {"demonstrations", "dagger", "train"}
    assert any("round 1" in e.get("message", "") for e in events)


def test_training_refuses_evaluation_seeds() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        CloningConfig(demonstration_seeds=range(990, 1010))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        CloningConfig(demonstration_seeds=range(10), dagger_seeds=[[1000]])
