"""finetune: full recovery fine-tuning toward the original model, after real compression steps from the registry.

digits-cnn is damaged by structured and unstructured pruning and judged on the digits TEST split (the training
inputs come from the train split through the run's calibration source); reacher-policy is judged by its action
error against the original on expert states of evaluation seeds (1000+, never trained on)."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robopt import zoo
from robopt.calibration.base import CalibrationSet
from robopt.calibration.providers import CalibrationProvider, calibration_source
from robopt.errors import CancelledError, TechniqueNotApplicableError
from robopt.evaluation.datasets import digits_split
from robopt.progress import Progress
from robopt.robotics.rollout import expert_demonstrations
from robopt.robotics.task import make_task
from robopt.tools.analysis import profile_module
from robopt.tools.loading import load_model
from robopt.tools.registry import ApplyContext, TechniqueResult, get_technique, parse_config
from robopt.training.fit import collate
from tests.tools.test_techniques import analyze


class Zoo:
    """An original zoo model, its card and the run's calibration source (training-side inputs)."""

    def __init__(self, name: str, data_dir: Path) -> None:
        weights, self.card = zoo.resolve(name, data_dir / "zoo")
        loaded = (
            load_model(weights).module if self.card.kind == "hf-folder" else zoo.load_card_model(weights, self.card)
        )
        self.original = loaded.eval()
        self.calibration: CalibrationProvider = calibration_source(
            self.card.evaluator, self.card.input_spec, data_dir, seed=0
        )
        self.example = self.calibration(1).samples[0]

    def context(self, model: nn.Module, events: list | None = None, **overrides: Any) -> ApplyContext:
        progress = Progress(emit=events.append, min_interval_s=0) if events is not None else Progress()
        fields: dict[str, Any] = {
            "analysis": analyze(model, self.card.family),
            "example_inputs": self.example,
            "progress": progress,
            "calibration": self.calibration,
            "teacher": lambda: copy.deepcopy(self.original),
        }
        return ApplyContext(**(fields | overrides))

    def compress(self, technique: str, config: dict[str, Any]) -> nn.Module:
        """The original after a real compression step applied through the technique registry."""
        t = get_technique(technique)
        context = ApplyContext(analysis=analyze(self.original, self.card.family), example_inputs=self.example)
        return t.apply(copy.deepcopy(self.original), parse_config(t, config), context).model


def finetune(model: nn.Module, context: ApplyContext, **config: Any) -> TechniqueResult:
    technique = get_technique("finetune")
    return technique.apply(copy.deepcopy(model), parse_config(technique, config), context)


@pytest.fixture(scope="module")
def digits(data_dir: Path) -> Zoo:
    return Zoo("digits-cnn", data_dir)


@pytest.fixture(scope="module")
def reacher(data_dir: Path) -> Zoo:
    return Zoo("reacher-policy", data_dir)


def accuracy_on_test_split(model: nn.Module) -> float:
    """Accuracy on the digits TEST split (the calibration source draws from the train split)."""
    _, _, x, y = digits_split()
    with torch.no_grad():
        return float((model.eval()(x).argmax(-1) == y).float().mean())


def step_events(events: list[dict], stage: str = "finetune") -> list[int]:
    return [e["current"] for e in events if e.get("stage") == stage and str(e.get("message", "")).startswith("step ")]


def assert_round_trips(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(model(*inputs), loaded(*inputs))


def test_structured_pruning_damage_is_recovered_on_the_digits_test_split(digits: Zoo) -> None:
    pruned = digits.compress("prune_structured", {"ratio": 0.6})
    before = accuracy_on_test_split(pruned)
    events: list[dict] = []
    result = finetune(pruned, digits.context(pruned, events), steps=200)
    after = accuracy_on_test_split(result.model)
    # Measured: original 0.989, pruned 0.44, recovered 0.956 on the 450 test images.
    assert before < 0.7, f"the pruning step did not damage the model ({before:.3f})"
    assert after >= 0.92 and after - before >= 0.3, (before, after)
    assert sum(p.numel() for p in result.model.parameters()) == sum(p.numel() for p in pruned.parameters())
    fit = result.details["fit"]
    assert fit["steps"] <= 200 and fit["stopped_by"] == "steps"
    assert step_events(events) == list(range(1, fit["steps"] + 1))  # one progress event per optimizer step
    assert result.details["check_loss_after"] < result.details["check_loss_before"] / 5
    assert "digits train split" in result.details["calibration_source"]
    assert_round_trips(result.model, (digits_split()[2][:16],))


def test_unstructured_zeros_stay_zero_while_accuracy_recovers(digits: Zoo) -> None:
    pruned = digits.compress("prune_unstructured", {"sparsity": 0.95})
    zeros = {n: p == 0 for n, p in pruned.named_parameters() if p.ndim >= 2}
    before = accuracy_on_test_split(pruned)
    result = finetune(pruned, digits.context(pruned), steps=200)
    after = accuracy_on_test_split(result.model)
    # Measured: pruned 0.907, recovered 0.980, with all 129,033 zeros kept.
    assert after - before >= 0.04, (before, after)
    params = dict(result.model.named_parameters())
    for name, mask in zeros.items():
        assert torch.equal(params[name] == 0, mask), f"zeros of {name} changed"
    assert result.details["pruned_zeros_kept"] == sum(int(m.sum()) for m in zeros.values()) > 100_000
    # Without the masks the same training grows the pruned weights back: the masks are what keeps them.
    dense = finetune(pruned, digits.context(pruned), steps=20, keep_sparsity=False)
    regrown = sum(int((p[zeros[n]] != 0).sum()) for n, p in dense.model.named_parameters() if n in zeros)
    assert regrown > 1000 and dense.details["sparse_weights_kept"] == []


def test_reacher_actions_move_back_to_the_original_on_held_out_states(reacher: Zoo) -> None:
    task = make_task("reacher")
    try:
        states = expert_demonstrations(task, range(1000, 1010))[0]  # evaluation seeds: never trained on
    finally:
        task.close()
    inputs = collate(states)

    def action_mse(model: nn.Module) -> float:
        with torch.no_grad():
            return float(((model.eval()(*inputs) - reacher.original(*inputs)) ** 2).mean())

    pruned = reacher.compress("prune_structured", {"ratio": 0.6})
    result = finetune(pruned, reacher.context(pruned), steps=200)
    before, after = action_mse(pruned), action_mse(result.model)
    # Measured on 500 held-out states: 0.237 -> 0.036.
    assert after < before / 3, (before, after)
    assert result.details["loss"] == "mse"
    assert_round_trips(result.model, inputs)


def test_budgets_and_determinism(digits: Zoo) -> None:
    pruned = digits.compress("prune_unstructured", {"sparsity": 0.9})
    first = finetune(pruned, digits.context(pruned), steps=15)
    second = finetune(pruned, digits.context(pruned), steps=15)
    assert first.details["fit"]["steps"] == 15
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs between two runs with the same seed"
    timed = finetune(pruned, digits.context(pruned), steps=100_000, seconds=0.5)
    assert timed.details["fit"]["stopped_by"] == "time" and timed.details["fit"]["steps"] < 100_000


def test_cancellation_stops_training(digits: Zoo) -> None:
    pruned = digits.compress("prune_structured", {"ratio": 0.3})
    progress = Progress(min_interval_s=0)

    def emit(event: dict) -> None:
        if event.get("stage") == "finetune" and event.get("current") == 3:
            progress.cancel.set()

    progress.emit = emit
    with pytest.raises(CancelledError):
        finetune(pruned, digits.context(pruned, progress=progress), steps=200)


def test_refusals_say_why(digits: Zoo) -> None:
    technique = get_technique("finetune")
    pruned = digits.compress("prune_structured", {"ratio": 0.3})
    with pytest.raises(TechniqueNotApplicableError, match="original model"):
        finetune(pruned, digits.context(pruned, teacher=None))
    with pytest.raises(TechniqueNotApplicableError, match="calibration"):
        finetune(pruned, digits.context(pruned, calibration=None))
    few = CalibrationSet(samples=digits.calibration(4).samples, source="four images")
    with pytest.raises(TechniqueNotApplicableError, match="at least"):
        finetune(pruned, digits.context(pruned, calibration=lambda n: few))
    quantized = digits.compress("quantize_dynamic_int8", {})
    census = profile_module(quantized, digits.example).layer_census  # robopt's census names torch.ao layers
    appl = technique.applicable(analyze(quantized, "cnn").model_copy(update={"layer_census": census}))
    assert not appl.applicable and "lora_recovery" in appl.reason
    with pytest.raises(TechniqueNotApplicableError, match="quantized") as info:
        finetune(quantized, digits.context(quantized))
    assert "lora_recovery" in (info.value.hint or "")
    with pytest.raises(TechniqueNotApplicableError, match="float16"):
        finetune(copy.deepcopy(pruned).half(), digits.context(pruned))
    estimate = technique.estimate(analyze(pruned, "cnn"), technique.default_config())
    assert (estimate.size_ratio, estimate.speedup, estimate.accuracy_risk) == (1.0, 1.0, "low")
    assert "only recovers accuracy" in estimate.note
    assert technique.applicable(analyze(pruned, "cnn")).applicable
