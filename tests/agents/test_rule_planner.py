"""The deterministic planner on the real digits-cnn analysis and the real technique registry."""

from __future__ import annotations

import pytest
import torch

from robopt.agents.deciders.rule_planner import rule_plan
from robopt.domain.analysis import AnalysisReport
from robopt.domain.criteria import Criteria
from robopt.domain.records import Attempt, Measurement, PlanStep
from robopt.tools.analysis import profile_module
from robopt.tools.registry import list_techniques
from robopt.zoo.digits_cnn import DigitsCNN


@pytest.fixture(scope="module")
def analysis() -> AnalysisReport:
    model = DigitsCNN().eval()
    p = profile_module(model, (torch.zeros(1, 1, 8, 8),))
    return AnalysisReport(
        format="torch-module",
        source="digits-cnn",
        param_count=p.param_count,
        size_on_disk_bytes=560_000,
        size_in_memory_bytes=p.size_in_memory_bytes,
        flops=p.flops,
        layer_census=p.layer_census,
        params_by_layer_type=p.params_by_layer_type,
        architecture=p.architecture,
        input_spec=DigitsCNN.input_spec,
    )


BASE = Measurement(size_bytes=560_000, latency_ms_p50=0.1, metrics={"accuracy": 0.99}, primary_metric="accuracy")


def plan(analysis, criteria, attempts=(), past=(), allowed=None):
    return rule_plan(
        analysis=analysis,
        current=BASE,
        baseline=BASE,
        criteria=criteria,
        attempts=list(attempts),
        past_attempts=list(past),
        allowed=allowed,
    )


INT8 = {"dtype": "qint8", "layer_types": ["Linear"], "per_channel": True}


def attempt(technique, config, status, index=0):
    return Attempt(index=index, step=PlanStep(technique=technique, config=config), status=status, input_artifact="x")


def test_3x_smaller_is_one_low_risk_int8_step(analysis):
    p = plan(analysis, Criteria(max_size_ratio=1 / 3))
    assert [s.technique for s in p.steps] == ["quantize_dynamic_int8"]
    assert p.steps[0].expected_size_ratio < 1 / 3 and p.decider == "rules"


def test_6x_smaller_needs_4_bit_or_a_chain(analysis):
    p = plan(analysis, Criteria(max_size_ratio=1 / 6))
    estimate = 1.0
    for s in p.steps:
        estimate *= s.expected_size_ratio
    assert estimate <= 1 / 6
    # INT8 alone is far short (x0.29): a structural step comes first (pruning, low rank or distillation), recovery
    # may follow it, quantization comes last if at all
    families = [{t.name: t.family for t in list_techniques()}[s.technique] for s in p.steps]
    assert families[0] in ("pruning", "low-rank", "distillation")
    order = {"pruning": 0, "low-rank": 0, "distillation": 0, "recovery": 1, "quantization": 2}
    assert [order[f] for f in families] == sorted(order[f] for f in families)


def test_a_rejected_quantizer_is_not_retried(analysis):
    rejected = attempt("quantize_dynamic_int8", INT8, "rejected")
    p = plan(analysis, Criteria(max_size_ratio=1 / 3), attempts=[rejected])
    assert p.steps and "quantize_dynamic_int8" not in [s.technique for s in p.steps]


def test_past_sessions_count_only_when_their_measured_drop_breaks_todays_budget(analysis):
    def past(accuracy, status="rejected"):
        a = attempt("quantize_dynamic_int8", INT8, status)
        a.measurement = Measurement(size_bytes=160_000, metrics={"accuracy": accuracy}, primary_metric="accuracy")
        return a

    criteria = Criteria(max_size_ratio=1 / 3, max_metric_drop=0.01)
    # lost 4 points in a past session: still too much today, so it is not tried again
    assert "quantize_dynamic_int8" not in [s.technique for s in plan(analysis, criteria, past=[past(0.95)]).steps]
    # lost half a point, rejected then under a tighter budget: within today's budget, so it is tried
    assert [s.technique for s in plan(analysis, criteria, past=[past(0.985)]).steps] == ["quantize_dynamic_int8"]
    # raised an exception in a past session: not retried
    crashed = attempt("quantize_dynamic_int8", INT8, "failed")
    assert "quantize_dynamic_int8" not in [s.technique for s in plan(analysis, criteria, past=[crashed]).steps]


def test_nothing_left_gives_an_empty_plan_with_the_reason(analysis):
    p = plan(
        analysis,
        Criteria(max_size_ratio=1 / 3),
        allowed={"prune_unstructured"},
        attempts=[
            attempt("prune_unstructured", {"sparsity": s, "scope": "global", "skip_head": True}, "rejected")
            for s in (0.5, 0.3, 0.15)
        ],
    )
    assert p.steps == [] and "nothing left" in p.summary


def test_no_limits_means_the_safest_shrinking_step(analysis):
    p = plan(analysis, Criteria())
    assert len(p.steps) == 1 and p.steps[0].expected_size_ratio < 0.98
    assert "no size or latency limit" in p.summary


def test_unstructured_sparsity_is_only_used_when_asked(analysis):
    assert all(s.technique != "prune_unstructured" for s in plan(analysis, Criteria(max_size_ratio=0.9)).steps)
    asked = plan(analysis, Criteria(), allowed={"prune_unstructured"})
    assert asked.steps == [] and "expected to make the model smaller or faster" in asked.summary
