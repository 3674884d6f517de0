"""Evaluation's verdicts: check a measurement against the criteria, and accept or reject a candidate step."""

from __future__ import annotations

from dataclasses import dataclass

from robopt.domain.criteria import Criteria, format_bytes
from robopt.domain.plan import CriteriaCheck
from robopt.domain.records import Measurement
from robopt.evaluation.statistics import paired_noninferiority, smallest_demonstrable_margin

MIN_SIZE_GAIN = 0.02  # a step must shrink the model by 2% ...
MIN_SPEED_GAIN = 0.10  # ... or speed it up by 10% to be worth keeping; latency of small models is noisy


def metric_drop(candidate: Measurement, baseline: Measurement) -> float | None:
    """How much worse the primary metric got (positive = worse), or None when it was not measured."""
    before, after = baseline.primary_value, candidate.primary_value
    if before is None or after is None:
        return None
    return before - after if baseline.higher_is_better else after - before


def check_criteria(measurement: Measurement, baseline: Measurement, criteria: Criteria) -> list[CriteriaCheck]:
    """One check per criterion that has a limit; values are measured, never estimated."""
    checks = []
    size_limit = criteria.size_limit(baseline.size_bytes)
    if size_limit is not None:
        checks.append(
            CriteriaCheck(
                name="size_bytes",
                limit=size_limit,
                value=measurement.size_bytes,
                met=measurement.size_bytes <= size_limit,
            )
        )
    if criteria.max_latency_ms is not None:
        value = measurement.latency_ms_p50
        checks.append(
            CriteriaCheck(
                name="latency_ms_p50",
                limit=criteria.max_latency_ms,
                value=value,
                met=value is not None and value <= criteria.max_latency_ms,
            )
        )
    if baseline.primary_value is not None:
        checks.append(_metric_check(measurement, baseline, criteria))
    return checks


def _metric_check(measurement: Measurement, baseline: Measurement, criteria: Criteria) -> CriteriaCheck:
    """The primary metric's drop within budget. With paired per-episode outcomes (closed-loop success on the same
    seeds) it is a paired non-inferiority test at the evaluator's confidence, not a raw difference: noise must
    neither pass a broken model nor reject a good one."""
    name = f"{baseline.primary_metric}_drop"
    drop = metric_drop(measurement, baseline)
    allowed = criteria.allowed_drop(baseline.primary_value or 0.0)
    paired = _paired_outcomes(measurement, baseline)
    if paired is None or drop is None:
        return CriteriaCheck(name=name, limit=allowed, value=drop, met=drop is not None and drop <= allowed + 1e-12)
    original, candidate = paired
    confidence = criteria.confidence
    test = paired_noninferiority(original, candidate, margin=min(allowed, 0.999), confidence=confidence)
    detail = test.describe()
    if not test.non_inferior and test.losses == 0 and allowed < smallest_demonstrable_margin(test.n, confidence):
        detail += (
            f"; with {test.n} episodes no margin below {smallest_demonstrable_margin(test.n, confidence):.3f} "
            "can be shown: allow a larger drop (--max-accuracy-drop) or run more episodes (--episodes)"
        )
    return CriteriaCheck(name=name, limit=allowed, value=drop, met=test.non_inferior, detail=detail)


def _paired_outcomes(measurement: Measurement, baseline: Measurement) -> tuple[list[float], list[float]] | None:
    metric = baseline.primary_metric
    if metric is None or not baseline.higher_is_better:
        return None
    original, candidate = baseline.samples.get(metric), measurement.samples.get(metric)
    if not original or not candidate or len(original) != len(candidate):
        return None
    if any(v not in (0.0, 1.0) for v in (*original, *candidate)):
        return None  # the test is for binary outcomes (success per episode)
    return original, candidate


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str
    criteria_met: bool
    provisional: bool = False
    """Accepted with its metric judgement deferred to the next step of the chain."""


def judge_candidate(
    candidate: Measurement,
    current: Measurement,
    baseline: Measurement,
    criteria: Criteria,
    *,
    provisional: bool = False,
) -> Verdict:
    """Accept a step only if the model still works, keeps the metric within budget, and gains something.

    Rules, in order: non-finite outputs reject; a missing or over-budget metric drop rejects; under a
    latency (size) limit, getting slower by 10% (larger by 2%) rejects; no size gain of 2% and no
    speed-up of 10% rejects.
    A step that is smaller but slower is accepted only without a latency limit, and flagged as slower.
    A `provisional` step (judged together with the next one, e.g. pruning before its recovery fine-tuning) may
    exceed the metric budget: the next step's verdict decides, and a failure there rolls both back. The step that
    closes such a chain is compared (`current`) with the model before the chain, so recovery counts the chain's gain.
    """
    if not candidate.outputs_finite or candidate.metrics.get("nonfinite_outputs", 0.0) > 0:
        return Verdict(False, "the model produces NaN/inf outputs", False)
    checks = {c.name: c for c in check_criteria(candidate, baseline, criteria)}
    deferred = ""
    if baseline.primary_value is not None:
        drop_check = checks[f"{baseline.primary_metric}_drop"]
        if drop_check.value is None:
            return Verdict(False, f"{baseline.primary_metric} could not be measured", False)
        if not drop_check.met and provisional:
            deferred = (
                f"{baseline.primary_metric} dropped by {drop_check.value:.4f} (allowed {drop_check.limit:.4f}): "
                "judged after the next step of the chain"
            )
        elif not drop_check.met:
            how = f": {drop_check.detail}" if drop_check.detail else ""
            return Verdict(
                False,
                f"{baseline.primary_metric} dropped by {drop_check.value:.4f} "
                f"({baseline.primary_value:.4f} -> {candidate.primary_value:.4f}), allowed {drop_check.limit:.4f}{how}",
                False,
            )
    size_gain = current.size_bytes / max(candidate.size_bytes, 1)
    speed_gain = (
        current.latency_ms_p50 / candidate.latency_ms_p50
        if current.latency_ms_p50 and candidate.latency_ms_p50
        else 1.0
    )
    if criteria.max_latency_ms is not None and speed_gain < 1 - MIN_SPEED_GAIN:
        return Verdict(False, f"slower (latency x{1 / speed_gain:.2f}) under a latency limit", False)
    if criteria.size_limit(baseline.size_bytes) is not None and size_gain < 1 - MIN_SIZE_GAIN:
        return Verdict(False, f"larger (size x{1 / size_gain:.2f}) under a size limit", False)
    if size_gain < 1 + MIN_SIZE_GAIN and speed_gain < 1 + MIN_SPEED_GAIN:
        return Verdict(
            False,
            f"no gain: size {format_bytes(current.size_bytes)} -> {format_bytes(candidate.size_bytes)}, "
            f"latency x{1 / speed_gain:.2f}",
            False,
        )
    notes = [f"size {1 / size_gain:.2f}x of the current model", f"latency {1 / speed_gain:.2f}x"]
    if speed_gain < 1 - MIN_SPEED_GAIN:
        notes.append("SLOWER than the model it replaces")
    if deferred:
        return Verdict(True, "provisionally accepted: " + ", ".join([*notes, deferred]), False, provisional=True)
    met = all(c.met for c in checks.values())
    return Verdict(True, "accepted: " + ", ".join(notes), met)
