"""The rule planner chooses among the quantization techniques by the criteria, on tiny-lm's real analysis."""

from __future__ import annotations

import math

import pytest

from robopt import api
from robopt.agents.deciders.rule_planner import rule_plan
from robopt.domain.criteria import Criteria
from robopt.domain.records import Measurement


@pytest.fixture(scope="module")
def analysis(data_dir):
    return api.analyze("tiny-lm")


def chosen(analysis, criteria: Criteria, allowed: set[str] | None = None) -> list[str]:
    base = Measurement(
        size_bytes=analysis.size_on_disk_bytes,
        latency_ms_p50=10.0,
        metrics={"perplexity": 92.0},
        primary_metric="perplexity",
    )
    plan = rule_plan(analysis=analysis, current=base, baseline=base, criteria=criteria, attempts=[], allowed=allowed)
    return [s.technique for s in plan.steps]


def test_every_issue_4_quantizer_is_registered_and_judged_for_tiny_lm(analysis) -> None:
    outlooks = {o.technique: o for o in analysis.techniques}
    expected = {"autoround", "gptq", "awq", "bnb_int8", "weight_only_int4", "cast_half", "onnx_static_int8"}
    assert expected <= set(outlooks)
    assert outlooks["autoround"].applicable and outlooks["autoround"].expected_size_ratio < 0.4
    for name in ("gptq", "awq"):  # optional backends: either runnable here or unavailable with the reason
        assert outlooks[name].available or outlooks[name].reason


def test_a_loose_size_limit_takes_the_least_risky_quantizer(analysis) -> None:
    assert chosen(analysis, Criteria(max_size_ratio=0.5, max_metric_drop_relative=0.05)) == ["quantize_dynamic_int8"]


def test_a_latency_limit_takes_a_quantizer_estimated_to_be_faster(analysis) -> None:
    steps = chosen(analysis, Criteria(max_latency_ms=7.0, max_metric_drop_relative=0.05))
    assert steps == ["onnx_static_int8"]


def test_a_tight_size_limit_rules_out_int8_weights(analysis) -> None:
    steps = chosen(analysis, Criteria(max_size_ratio=0.36, max_metric_drop_relative=0.05))
    assert steps and steps[-1] not in {"quantize_dynamic_int8", "weight_only_int8", "bnb_int8", "cast_half"}


def test_naming_autoround_plans_it(analysis) -> None:
    assert chosen(analysis, Criteria(max_size_ratio=0.4), allowed={"autoround"}) == ["autoround"]


def _with_sensitive_layer(analysis, layer: str, error_at_4_bits: float):
    """The real analysis with one layer's measured sensitivity replaced: it breaks the output at <= 4 bits."""
    report = analysis.layer_sensitivity.model_copy(deep=True)
    (row,) = [r for r in report.layers if r.name == layer]
    for b in (4, 3, 2):
        row.relative_error[b] = error_at_4_bits * 4 / b
        row.sqnr_db[b] = -10 * math.log10(row.relative_error[b])
    return analysis.model_copy(update={"layer_sensitivity": report})


def test_the_analysis_lists_per_layer_sensitivity(analysis) -> None:
    report = analysis.layer_sensitivity
    assert report is not None, analysis.unmeasured.get("layer_sensitivity")
    assert report.samples >= 4 and "stdlib" in report.calibration_source and report.calibration_fingerprint
    assert len(report.layers) == analysis.layer_census["Linear"]
    worst = [r.sqnr_db[2] for r in report.layers]
    assert worst == sorted(worst)  # most sensitive first
    uniform = report.uniform_sqnr_db  # fewer bits, more output noise
    assert uniform[8] > uniform[4] > uniform[3] > uniform[2]
    assert report.spread_db[4] > 0


def test_measured_sensitivity_sets_the_risk_of_low_bit_plans(analysis) -> None:
    from robopt.tools.registry import get_technique

    hqq, mixed = get_technique("hqq"), get_technique("mixed_precision")
    flat_hqq = hqq.estimate(analysis, hqq.default_config())
    assert "Measured sensitivity predicts output SQNR" in flat_hqq.note
    fragile = _with_sensitive_layer(analysis, "model.layers.1.self_attn.o_proj", 0.1)
    assert hqq.estimate(fragile, hqq.default_config()).accuracy_risk == "high"  # ~10 dB predicted at 4 bits
    fragile_mixed = mixed.estimate(fragile, mixed.default_config())
    assert fragile_mixed.accuracy_risk in ("low", "medium") and "uniform 4-bit" in fragile_mixed.note


def test_the_planner_takes_mixed_precision_when_one_layer_is_fragile(analysis) -> None:
    criteria = Criteria(max_size_ratio=0.45, max_metric_drop_relative=0.05)  # both are estimated to fit
    allowed = {"hqq", "mixed_precision"}
    # even sensitivity: uniform 4-bit is predicted safe and is smaller than 4.5 bits on average
    assert chosen(analysis, criteria, allowed) == ["hqq"]
    # one fragile layer: uniform 4-bit is predicted to break the output, mixed precision keeps that layer wide
    fragile = _with_sensitive_layer(analysis, "model.layers.1.self_attn.o_proj", 0.1)
    assert chosen(fragile, criteria, allowed) == ["mixed_precision"]
