"""The rule planner chooses among the quantization techniques by the criteria, on tiny-lm's real analysis."""

from __future__ import annotations

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
