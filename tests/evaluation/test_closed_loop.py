"""The closed-loop evaluator on the real reacher-policy: determinism, broken policies, timing, non-inferiority."""

from __future__ import annotations

import copy

import pytest
import torch

from robopt import zoo
from robopt.domain.criteria import Criteria
from robopt.domain.records import Measurement
from robopt.errors import PrefilterRejectedError
from robopt.evaluation.base import EvaluationSetup, EvaluatorSpec, ModelFacts, build_evaluator
from robopt.evaluation.judge import judge_candidate
from robopt.progress import Progress
from robopt.zoo import load_card_model

EPISODES = 20


@pytest.fixture(scope="module")
def policy(data_dir):
    weights, card = zoo.resolve("reacher-policy", data_dir / "zoo")
    return load_card_model(weights, card)


def evaluator(policy, **options):
    spec = EvaluatorSpec(name="closed-loop", dataset="reacher", options={"episodes": EPISODES, **options})
    return build_evaluator(spec, EvaluationSetup(reference=policy))


def measurement(evaluation, size=1000):
    return Measurement(
        size_bytes=size,
        latency_ms_p50=0.1,
        metrics=evaluation.metrics,
        samples=evaluation.samples,
        primary_metric="success_real",
    )


FAST = ModelFacts(latency_ms=0.1)


def test_deterministic_for_fixed_seeds_and_reports_intervals(policy):
    first = evaluator(policy).evaluate_detailed(policy, Progress(), FAST)
    second = evaluator(policy).evaluate_detailed(copy.deepcopy(policy), Progress(), FAST)
    assert first.samples == second.samples
    assert first.metrics["success_real"] == second.metrics["success_real"]
    m = first.metrics
    assert m["success_real"] >= 0.8, m
    assert m["success_real_ci_low"] <= m["success_real"] <= m["success_real_ci_high"]
    assert m["ticks_per_inference"] == 1 and m["success_ideal"] == m["success_real"]
    assert m["proxy_action_error"] == 0.0  # the original compared with itself
    assert len(first.samples["success_real"]) == EPISODES


def test_progress_events_and_cancellation(policy):
    events = []
    evaluator(policy).evaluate_detailed(policy, Progress(emit=events.append, min_interval_s=0), FAST)
    stages = {e.get("stage") for e in events}
    assert "episodes (ideal timing)" in stages
    progress = Progress()
    progress.cancel.set()
    from robopt.errors import CancelledError

    with pytest.raises(CancelledError):
        evaluator(policy).evaluate_detailed(policy, progress, FAST)


def test_zeroed_policy_is_rejected_by_the_offline_prefilter(policy):
    zeroed = copy.deepcopy(policy)
    with torch.no_grad():
        for p in zeroed.parameters():
            p.zero_()
    with pytest.raises(PrefilterRejectedError, match="pre-filter"):
        evaluator(policy).evaluate_detailed(zeroed, Progress(), FAST)


def test_noised_policy_fails_in_closed_loop_and_the_judge_rejects_it(policy):
    noised = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noised.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * p.std() * 0.6)
    # Pre-filter off: this checks the closed-loop verdict itself.
    ev = evaluator(policy, prefilter_max_action_error=100.0)
    base = measurement(ev.evaluate_detailed(policy, Progress(), FAST))
    bad = measurement(ev.evaluate_detailed(noised, Progress(), FAST), size=300)
    assert bad.metrics["success_real"] <= base.metrics["success_real"] - 0.3, (bad.metrics, base.metrics)
    verdict = judge_candidate(bad, base, base, Criteria(max_metric_drop=0.10))
    assert not verdict.accepted and "success_real dropped" in verdict.reason


def test_a_model_too_slow_for_the_control_rate_fails_at_real_timing(policy):
    ev = evaluator(policy)
    base = measurement(ev.evaluate_detailed(policy, Progress(), FAST))
    # Same weights, but 120 ms per inference at 50 Hz: each inference spans 6 ticks.
    slow = ev.evaluate_detailed(copy.deepcopy(policy), Progress(), ModelFacts(latency_ms=120.0))
    assert slow.metrics["ticks_per_inference"] == 6
    assert slow.metrics["success_ideal"] == base.metrics["success_ideal"]  # accurate ...
    assert slow.metrics["success_real"] <= base.metrics["success_real"] - 0.3  # ... but too slow
    verdict = judge_candidate(measurement(slow, size=300), base, base, Criteria(max_metric_drop=0.10))
    assert not verdict.accepted


def test_a_slower_control_rate_tolerates_the_same_latency(policy):
    slow = ModelFacts(latency_ms=120.0)
    relaxed = evaluator(policy, control_rate_hz=5.0).evaluate_detailed(policy, Progress(), slow)
    assert relaxed.metrics["ticks_per_inference"] == 1 and relaxed.metrics["control_rate_hz"] == 5.0


def test_target_device_latency_is_predicted_from_flops_and_bytes(policy):
    facts = ModelFacts(latency_ms=0.1, flops=140_000, weight_bytes=280_000, param_count=70_000)
    result = evaluator(policy, target="raspberry-pi-5").evaluate_detailed(policy, Progress(), facts)
    assert result.metrics["latency_predicted"] == 1.0
    assert result.metrics["inference_latency_ms"] > 0 and result.metrics["inference_latency_ms"] != 0.1
