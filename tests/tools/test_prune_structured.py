"""prune_structured on the zoo's digits-cnn and reacher-policy: measured parameter cuts, importances, global ranking,
and iterative schedules whose recovery fine-tuning wins back held-out accuracy / action fidelity."""

from __future__ import annotations

import copy
import io
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robopt import zoo
from robopt.calibration import calibration_source
from robopt.domain.analysis import AnalysisReport
from robopt.errors import CancelledError, TechniqueNotApplicableError
from robopt.evaluation.datasets import digits_split
from robopt.progress import Progress
from robopt.tools.example_inputs import make_example_inputs
from robopt.tools.registry import ApplyContext, get_technique, parse_config

TECHNIQUE = get_technique("prune_structured")


def analysis_of(model: nn.Module, architecture: str) -> AnalysisReport:
    """The census part of robopt's analysis (what estimate() and applicable() read)."""
    census: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    for m in model.modules():
        if next(m.children(), None) is None:
            census[type(m).__name__] += 1
            by_type[type(m).__name__] += sum(p.numel() for p in m.parameters(recurse=False))
    params = sum(p.numel() for p in model.parameters())
    return AnalysisReport(
        format="safetensors",
        source="zoo",
        param_count=params,
        size_on_disk_bytes=4 * params,
        size_in_memory_bytes=4 * params,
        layer_census=dict(census),
        params_by_layer_type=dict(by_type),
        architecture=architecture,  # type: ignore[arg-type]
    )


class Zoo:
    """A zoo model with what apply() needs: analysis, example inputs and the run's calibration source."""

    def __init__(self, name: str, architecture: str, data_dir: Path) -> None:
        weights, self.card = zoo.resolve(name, data_dir / "zoo")
        self.model = zoo.load_card_model(weights, self.card)
        self.analysis = analysis_of(self.model, architecture)
        self.inputs = tuple(make_example_inputs(self.card.input_spec, 0))
        self.calibration = calibration_source(self.card.evaluator, self.card.input_spec, data_dir, 0)

    def context(self, calibration: bool = True, progress: Progress | None = None, seed: int = 0) -> ApplyContext:
        return ApplyContext(
            analysis=self.analysis,
            example_inputs=self.inputs,
            calibration=self.calibration if calibration else None,
            progress=progress or Progress(),
            seed=seed,
        )

    def prune(self, config: dict[str, Any], **context: Any) -> Any:
        return TECHNIQUE.apply(copy.deepcopy(self.model), parse_config(TECHNIQUE, config), self.context(**context))


@pytest.fixture(scope="module")
def cnn(data_dir: Path) -> Zoo:
    return Zoo("digits-cnn", "cnn", data_dir)


@pytest.fixture(scope="module")
def policy(data_dir: Path) -> Zoo:
    return Zoo("reacher-policy", "mlp-policy", data_dir)


@pytest.fixture(scope="module")
def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    _, _, x, y = digits_split()
    return x, y


@pytest.fixture(scope="module")
def heldout_states() -> torch.Tensor:
    """Expert states of evaluation episodes (seeds >= 1000): never part of the calibration (training) states."""
    from robopt.robotics.rollout import expert_demonstrations
    from robopt.robotics.task import make_task

    task = make_task("reacher")
    try:
        inputs, _, _ = expert_demonstrations(task, range(1000, 1006))
    finally:
        task.close()
    return torch.cat([s[0] for s in inputs])


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((model(data[0]).argmax(-1) == data[1]).float().mean())


def action_mse(model: nn.Module, reference: nn.Module, states: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(states), reference(states)))


def reloaded(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# -- size --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["cnn", "policy"])
@pytest.mark.parametrize(("ratio", "most"), [(0.5, 0.3), (0.75, 0.1)])
def test_ratio_cuts_parameters_as_estimated(fixture: str, ratio: float, most: float, request: pytest.FixtureRequest):
    subject: Zoo = request.getfixturevalue(fixture)
    result = subject.prune({"ratio": ratio, "recovery_steps": 0}, calibration=False)
    before = sum(p.numel() for p in subject.model.parameters())
    after = sum(p.numel() for p in result.model.parameters())
    assert (result.details["params_before"], result.details["params_after"]) == (before, after)
    assert after <= most * before  # interior layers keep ~(1-ratio)^2
    estimate = TECHNIQUE.estimate(subject.analysis, parse_config(TECHNIQUE, {"ratio": ratio}))
    assert estimate.size_ratio == pytest.approx(after / before, abs=0.03)
    assert estimate.speedup <= 2.0 and estimate.note
    with torch.no_grad():
        assert result.model(*subject.inputs).shape == subject.model(*subject.inputs).shape


def test_global_ranking_cuts_layers_unevenly(cnn: Zoo) -> None:
    def widths(model: nn.Module) -> list[float]:
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]  # the head is kept
        return [(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) for m in layers]

    original = widths(cnn.model)
    local = cnn.prune({"ratio": 0.5, "recovery_steps": 0}, calibration=False)
    ranked = cnn.prune({"ratio": 0.5, "recovery_steps": 0, "global_pruning": True}, calibration=False)
    local_kept = [w / o for w, o in zip(widths(local.model), original, strict=True)]
    global_kept = [w / o for w, o in zip(widths(ranked.model), original, strict=True)]
    assert local_kept == pytest.approx([0.5] * len(original))
    assert max(global_kept) - min(global_kept) > 0.1  # layers lose different shares
    assert sum(widths(ranked.model)) == pytest.approx(0.5 * sum(original), abs=2)  # half of all channels
    assert ranked.details["global_pruning"] and "global ranking" in ranked.backend


# -- importance ------------------------------------------------------------------------------------------------------


def test_gradient_importances_keep_more_accuracy_than_magnitude(cnn: Zoo, digits_test) -> None:
    """One shot at 0.75 without recovery: Taylor and OBD-Hessian rankings (per-sample gradients against the teacher
    on the digits train split) keep far more test accuracy than weight magnitude (measured 0.74 / 0.62 vs 0.26)."""
    base = accuracy(cnn.model, digits_test)
    scores = {}
    for importance in ("magnitude_l2", "taylor", "hessian"):
        result = cnn.prune({"ratio": 0.75, "recovery_steps": 0, "importance": importance, "gradient_samples": 64})
        scores[importance] = accuracy(result.model, digits_test)
        assert result.details["params_after"] == pytest.approx(0.067 * result.details["params_before"], rel=0.05)
    assert base > 0.97
    assert scores["taylor"] > scores["magnitude_l2"] + 0.15, scores
    assert scores["hessian"] > scores["magnitude_l2"] + 0.15, scores


def test_gradient_importance_needs_training_inputs(cnn: Zoo) -> None:
    with pytest.raises(TechniqueNotApplicableError, match="training inputs") as info:
        cnn.prune({"importance": "taylor", "recovery_steps": 0}, calibration=False)
    assert info.value.hint


# -- iterative schedule with recovery --------------------------------------------------------------------------------


def test_iterative_recovery_wins_back_digits_accuracy(cnn: Zoo, digits_test) -> None:
    """0.75 channel ratio (~15x fewer parameters): one shot without recovery vs 3 rounds with 100 recovery steps."""
    one_shot = cnn.prune({"ratio": 0.75, "recovery_steps": 0}, calibration=False)
    events: list[dict[str, Any]] = []
    iterative = cnn.prune({"ratio": 0.75, "steps": 3, "recovery_steps": 100}, progress=Progress(emit=events.append))
    assert iterative.details["params_after"] == one_shot.details["params_after"]
    assert iterative.details["params_after"] < 0.08 * iterative.details["params_before"]
    one_shot_accuracy = accuracy(one_shot.model, digits_test)
    recovered_accuracy = accuracy(iterative.model, digits_test)
    assert recovered_accuracy > 0.9
    assert recovered_accuracy > one_shot_accuracy + 0.3, (one_shot_accuracy, recovered_accuracy)

    rounds = iterative.details["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["ratio"] for r in rounds] == pytest.approx([0.25, 0.5, 0.75])
    assert rounds[0]["params"] > rounds[1]["params"] > rounds[2]["params"] == iterative.details["params_after"]
    for r in rounds:
        assert r["heldout_loss_recovered"] < r["heldout_loss_pruned"]
        assert r["recovery"]["steps"] == 100
    assert iterative.details["recovery"] == "on" and iterative.details["teacher_data"]["held_out"] > 0
    stages = {e["stage"] for e in events}
    assert {"prune_structured round 3/3", "prune_structured round 3/3: recovery"} <= stages

    model = iterative.model
    assert not model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # a plain dense module
    assert all(type(m).__module__.startswith(("torch.nn", "robopt.zoo")) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(reloaded(model)(digits_test[0]), model(digits_test[0]))


def test_recovery_lowers_reacher_action_error(policy: Zoo, heldout_states: torch.Tensor) -> None:
    """Action MSE against the original policy on states of evaluation episodes (not trained on)."""
    one_shot = policy.prune({"ratio": 0.75, "recovery_steps": 0}, calibration=False)
    recovered = policy.prune({"ratio": 0.75, "steps": 2, "recovery_steps": 100, "calibration_samples": 256})
    before = action_mse(one_shot.model, policy.model, heldout_states)
    after = action_mse(recovered.model, policy.model, heldout_states)
    assert after < 0.5 * before, (before, after)
    assert recovered.details["params_after"] < 0.08 * recovered.details["params_before"]
    assert recovered.details["teacher_data"]["loss"] == "mse"
    with torch.no_grad():
        assert torch.equal(reloaded(recovered.model)(heldout_states), recovered.model(heldout_states))


def test_recovery_distils_from_the_runs_teacher(policy: Zoo, heldout_states: torch.Tensor) -> None:
    """In a chain the input is an earlier step's result; recovery then fits the run's original model (context.teacher),
    so it also repairs what the earlier step broke."""
    damaged = policy.prune({"ratio": 0.5, "recovery_steps": 0}, calibration=False).model
    context = policy.context()
    context.teacher = lambda: copy.deepcopy(policy.model)
    config = parse_config(TECHNIQUE, {"ratio": 0.3, "recovery_steps": 100, "calibration_samples": 256})
    result = TECHNIQUE.apply(copy.deepcopy(damaged), config, context)
    assert action_mse(result.model, policy.model, heldout_states) < 0.5 * action_mse(
        damaged, policy.model, heldout_states
    )


def test_same_seed_same_result(policy: Zoo) -> None:
    config = {"ratio": 0.5, "importance": "hessian", "recovery_steps": 20, "calibration_samples": 64}
    first, second = policy.prune(config), policy.prune(config)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_recovery_without_training_inputs_is_skipped_and_said(policy: Zoo) -> None:
    result = policy.prune({"ratio": 0.3, "steps": 2}, calibration=False)
    assert result.details["recovery"].startswith("recovery skipped")
    assert result.notes == result.details["recovery"]
    assert [r["round"] for r in result.details["rounds"]] == [1, 2]


def test_cancel_stops_pruning(cnn: Zoo) -> None:
    progress = Progress()
    progress.cancel.set()
    with pytest.raises(CancelledError):
        cnn.prune({"ratio": 0.5, "recovery_steps": 10}, progress=progress)


# -- config ----------------------------------------------------------------------------------------------------------


def test_config_allows_big_cuts_and_milder_ladder() -> None:
    config = parse_config(TECHNIQUE, {"ratio": 0.9, "steps": 4, "importance": "taylor"})
    seen = []
    while (config := TECHNIQUE.milder(config)) is not None:
        assert (config.steps, config.importance) == (4, "taylor")
        seen.append(config.ratio)
    assert seen == [0.5, 0.3, 0.15]
    assert TECHNIQUE.config_cls.model_validate_json(parse_config(TECHNIQUE, {"ratio": 0.75}).model_dump_json())
    for bad in ({"ratio": 0.95}, {"steps": 0}, {"recovery_steps": -1}, {"importance": "random"}):
        with pytest.raises(ValueError):
            parse_config(TECHNIQUE, bad)
