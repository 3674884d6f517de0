"""Sensitivity-driven mixed precision: meets its budget, protects roles, and beats uniform HQQ at equal bits."""

from __future__ import annotations

import copy
import io
import itertools
import math
import random

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from robopt.calibration import CalibrationSet
from robopt.errors import TechniqueNotApplicableError
from robopt.tools.registry import ApplyContext, TechniqueResult, get_technique, parse_config
from robopt.tools.sensitivity import LayerSensitivity
from robopt.tools.techniques.hqq_quant import layer_class
from robopt.tools.techniques.mixed_precision import MixedPrecisionConfig, assign_bits
from tests.tools.test_sensitivity import ScaledResidualMLP, samples
from tests.tools.test_techniques import analyze, serialized_size

MODEL = ScaledResidualMLP().eval()
CALIBRATION = CalibrationSet(tuple(samples(32, seed=0)), "test: standard-normal inputs, seed 0")
HELD_OUT = torch.cat([s[0] for s in samples(128, seed=1)])


def context(model: nn.Module, calibration: CalibrationSet | None = CALIBRATION) -> ApplyContext:
    source = (lambda n: CalibrationSet(calibration.samples[:n], calibration.source)) if calibration else None
    return ApplyContext(analysis=analyze(model, "mlp-policy"), example_inputs=samples(1)[0], calibration=source)


def run(name: str, model: nn.Module = MODEL, **config: object) -> TechniqueResult:
    technique = get_technique(name)
    return technique.apply(copy.deepcopy(model), parse_config(technique, config), context(model))


def output_error(model: nn.Module) -> float:
    with torch.no_grad():
        ref = MODEL(HELD_OUT)
        return float(((model(HELD_OUT) - ref) ** 2).sum() / (ref**2).sum())


@pytest.mark.parametrize("bits", [3, 4])
def test_mixed_beats_uniform_at_equal_average_bits(bits: int) -> None:
    uniform = run("hqq", nbits=bits, skip_head=False)
    mixed = run("mixed_precision", average_bits=bits, keep_roles=[])
    assert mixed.details["average_bits"] <= bits + 1e-9
    assert len(set(mixed.details["bits"].values())) > 1  # really mixed
    # same packed budget: the artifacts are the same size within 2%
    assert serialized_size(mixed.model) <= 1.02 * serialized_size(uniform.model)
    # measured on held-out inputs the sensitivity never saw; about 2-3x less output error here
    assert output_error(mixed.model) < 0.7 * output_error(uniform.model)
    # the branch feeding the output most strongly gets the most bits
    assigned = mixed.details["bits"]
    assert assigned["branches.0"] >= assigned["branches.3"] + 2


def test_protected_roles_keep_eight_bits_and_details_are_recorded() -> None:
    result = run("mixed_precision", average_bits=4, keep_roles=["action_head"])
    assigned = result.details["bits"]
    assert assigned["head"] == 8  # the protected action head
    assert result.details["average_bits"] <= 4 + 1e-9
    assert result.details["calibration_source"] == CALIBRATION.source
    assert result.details["calibration_samples"] == 32
    assert result.details["calibration_fingerprint"] == CalibrationSet(CALIBRATION.samples[:32], "x").fingerprint
    table = result.details["sensitivity"]
    assert {row["name"] for row in table} == set(assigned)
    assert {row["role"] for row in table} == {"action_head", "other"}
    assert all(set(row["sqnr_db"]) == {"8", "4", "3", "2"} for row in table)
    assert sum(result.details["bits_histogram"].values()) == 6
    assert all(isinstance(m, layer_class()) for n, m in result.model.named_modules() if n in assigned)
    assert "HiGHS" in result.details["solver"] and "hqq" in result.backend


def test_size_ratio_budget() -> None:
    result = run("mixed_precision", average_bits=None, size_ratio=0.12, keep_roles=[])
    assert 0.1 < result.details["weight_size_ratio"] <= 0.12
    # the whole Linear layers, fp32 biases included, come close to the budget too
    assert result.details["linear_bytes_after"] / result.details["linear_bytes_before"] < 0.13


def test_needs_calibration_and_a_feasible_budget() -> None:
    technique = get_technique("mixed_precision")
    with pytest.raises(TechniqueNotApplicableError, match="calibration"):
        technique.apply(copy.deepcopy(MODEL), parse_config(technique, {}), context(MODEL, None))
    head_share = 128 * 8 / (32 * 128 + 4 * 128 * 128 + 128 * 8)  # the head at 8 bits, the rest at 2
    assert 2 + 6 * head_share > 2.05
    with pytest.raises(TechniqueNotApplicableError, match="cannot be met"):
        run("mixed_precision", average_bits=2.0, keep_roles=["action_head"])


def test_the_result_survives_torch_save_and_load() -> None:
    model = run("mixed_precision", average_bits=3, keep_roles=[]).model
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(HELD_OUT), model(HELD_OUT))


def _feasible(combo: tuple[int, ...], layers: list[LayerSensitivity], average_bits: float) -> bool:
    protected = all(b >= 8 for b, layer in zip(combo, layers, strict=True) if layer.role == "action_head")
    spent = sum(b * layer.params for b, layer in zip(combo, layers, strict=True))
    return protected and spent <= average_bits * sum(layer.params for layer in layers) + 1e-9


def _objective(combo: tuple[int, ...], layers: list[LayerSensitivity]) -> float:
    return sum(layer.relative_error[b] for b, layer in zip(combo, layers, strict=True))


def test_assignment_is_the_exact_optimum() -> None:
    """The MILP's choice matches brute force over every combination, on random sensitivity tables."""
    rng = random.Random(0)
    bits = (8, 4, 3, 2)
    solved = infeasible = 0
    for trial in range(16):
        layers = []
        for i in range(5):
            base = rng.uniform(1e-6, 1e-2)
            errors = {b: base * 4 ** (8 - b) * rng.uniform(0.5, 2) for b in bits}
            role = "action_head" if i == 4 and trial % 2 else "backbone"
            layers.append(LayerSensitivity(f"l{i}", "Linear", role, rng.choice([1024, 4096, 16384]), errors))
        config = MixedPrecisionConfig(average_bits=rng.uniform(2.5, 5.5), keep_roles=("action_head",))
        combos = [c for c in itertools.product(bits, repeat=5) if _feasible(c, layers, config.average_bits)]
        if not combos:
            with pytest.raises(TechniqueNotApplicableError, match="cannot be met"):
                assign_bits(layers, config)
            infeasible += 1
            continue
        chosen = assign_bits(layers, config)
        combo = tuple(chosen[layer.name] for layer in layers)
        assert _feasible(combo, layers, config.average_bits)
        best = min(_objective(c, layers) for c in combos)
        assert math.isclose(_objective(combo, layers), best, rel_tol=1e-9)
        solved += 1
    assert solved >= 8 and infeasible >= 1


def test_config_validation_round_trip_and_milder() -> None:
    technique = get_technique("mixed_precision")
    for bad in (
        {"average_bits": 4, "size_ratio": 0.2},
        {"average_bits": None},
        {"candidate_bits": [4, 4]},
        {"candidate_bits": [5]},
        {"keep_roles": ["decoder"]},
        {"average_bits": 1.5},
    ):
        with pytest.raises(ValidationError):
            parse_config(technique, bad)
    config = parse_config(technique, {"average_bits": 3.5, "candidate_bits": [4, 2], "keep_roles": ["projector"]})
    assert parse_config(technique, config.model_dump(mode="json")) == config
    chain = []
    current = parse_config(technique, {"average_bits": 3})
    while current is not None:
        chain.append(current.average_bits)
        current = technique.milder(current)
    assert chain == [3, 4, 5, 6, 7, 8]
    analysis = analyze(MODEL, "mlp-policy")
    sizes = [technique.estimate(analysis, parse_config(technique, {"average_bits": b})).size_ratio for b in (3, 6)]
    assert sizes[0] < sizes[1] < 0.35
