"""Deterministic planning: search short technique chains by their estimates; pick the least risky one that
meets the targets."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from robopt.domain.analysis import AnalysisReport
from robopt.domain.criteria import Criteria
from robopt.domain.plan import OptimizationPlan
from robopt.domain.records import Attempt, Measurement, PlanStep
from robopt.tools.registry import Technique, TechniqueConfig, list_techniques, plannable

_RISK = {"low": 1, "medium": 2, "high": 3}
STRUCTURAL = ("pruning", "low-rank", "distillation")
RECOVERABLE = ("pruning", "low-rank")  # families whose accuracy loss a recovery step can win back
_SIZE_MARGIN = 0.95  # estimates are rough: aim a little below the size limit


@dataclass(frozen=True)
class _Option:
    steps: tuple[PlanStep, ...]
    size_ratio: float
    speedup: float
    risk: int


def _ladder(technique: Technique) -> list[TechniqueConfig]:
    """The technique's configs from the most aggressive to the mildest: stronger ones (for targets the default
    cannot reach), the default, then milder ones."""
    stronger: list[TechniqueConfig] = []
    config = technique.stronger(technique.default_config())
    while config is not None and len(stronger) < 5:
        stronger.insert(0, config)
        config = technique.stronger(config)
    configs, config = [], technique.default_config()
    while config is not None and len(configs) < 10:
        configs.append(config)
        config = technique.milder(config)
    return stronger + configs


def _step(
    technique: Technique, config: TechniqueConfig, analysis: AnalysisReport
) -> tuple[PlanStep, float, float, int]:
    est = technique.estimate(analysis, config)
    step = PlanStep(
        technique=technique.name,
        config=config.model_dump(mode="json"),
        rationale=est.note,
        expected_size_ratio=round(est.size_ratio, 4),
        expected_speedup=round(est.speedup, 3),
    )
    return step, est.size_ratio, est.speedup, _RISK[est.accuracy_risk]


def _recovered(
    step: tuple[PlanStep, float, float, int], recovery: Technique, analysis: AnalysisReport
) -> tuple[tuple[PlanStep, float, float, int], ...]:
    """`step` followed by recovery fine-tuning (the planning node marks the step to be judged together with it), its
    accuracy risk one level lower: recovery wins back what the structure change lost; evaluation still judges."""
    plan_step, size, speed, risk = step
    fix, fix_size, fix_speed, _ = _step(recovery, recovery.default_config(), analysis)
    return (plan_step, size, speed, max(1, risk - 1)), (fix, fix_size, fix_speed, 0)


def _recovery_technique(analysis: AnalysisReport, allowed: set[str] | None) -> Technique | None:
    """The first recovery technique among those the planner may use (`allowed`, else the ones planned by default)
    that runs here and applies to this model."""
    for t in plannable(allowed):
        if t.family != "recovery":
            continue
        outlook = t.outlook(analysis)
        if outlook.available and outlook.applicable:
            return t
    return None


def _untried_configs(technique: Technique, tried: dict[str, str]) -> list[TechniqueConfig]:
    """The technique's configs not yet tried; after a rejection only configs milder than the rejected one."""
    ladder = _ladder(technique)
    keys = [PlanStep(technique=technique.name, config=c.model_dump(mode="json")).key() for c in ladder]
    rejected = [i for i, k in enumerate(keys) if tried.get(k) in ("rejected", "failed")]
    start = max(rejected) + 1 if rejected else 0
    return [c for i, c in enumerate(ladder) if i >= start and keys[i] not in tried]


def _still_fails(past: Attempt, baseline: Measurement, criteria: Criteria) -> bool:
    """A past session's attempt (same model, same evaluator) rules a config out if it raised, or if its measured
    metric drop breaks today's budget. Rejections that depended on that session's limits (no gain, latency)
    do not carry over."""
    if past.status == "failed":
        return True
    if past.status != "rejected" or past.measurement is None or baseline.primary_value is None:
        return False
    value = past.measurement.metrics.get(baseline.primary_metric or "")
    if value is None:
        return False
    drop = baseline.primary_value - value if baseline.higher_is_better else value - baseline.primary_value
    return drop > criteria.allowed_drop(baseline.primary_value)


def rule_plan(
    *,
    analysis: AnalysisReport,
    current: Measurement,
    baseline: Measurement,
    criteria: Criteria,
    attempts: list[Attempt],
    past_attempts: list[Attempt] | None = None,
    allowed: set[str] | None = None,
) -> OptimizationPlan:
    """Plan the chain still to apply to the current model.

    Options are chains of at most one structural step (pruning, low-rank factorization or distillation; pruning
    and low-rank optionally followed by a recovery fine-tuning step it is judged together with) and at most one
    quantization step, each config taken from the technique's ladder (default, then milder ones). The option
    chosen is the least risky one whose estimated size and speed meet the limits (among equals, those not
    estimated to be slower than the current model, else the least slow, then the smallest); without a feasible
    option, the one that gets closest; without limits, the least risky one that makes the model both smaller and
    not slower. Past sessions' failures on the same model and evaluator count as tried (see _still_fails).
    """
    tried: dict[str, str] = {}
    for a in past_attempts or []:
        if _still_fails(a, baseline, criteria):
            tried[a.step.key()] = a.status
    for a in attempts:
        tried[a.step.key()] = a.status
    accepted = {a.step.technique for a in attempts if a.status == "accepted"}
    accepted_families = {t.family for t in list_techniques() if t.name in accepted}

    usable: list[Technique] = []
    skipped: list[str] = []
    for t in plannable(allowed):
        outlook = t.outlook(analysis)
        if not (outlook.available and outlook.applicable):
            skipped.append(f"{t.name}: {outlook.reason}")
            continue
        if t.name in accepted and t.family != "recovery":  # recovery may close any number of chains
            continue
        usable.append(t)

    quantizers = [t for t in usable if t.family == "quantization" and "quantization" not in accepted_families]
    # Structural changes come before quantization: a quantized model is not pruned, factorized or distilled again.
    structural = [t for t in usable if t.family in STRUCTURAL and "quantization" not in accepted_families]
    recovery = _recovery_technique(analysis, allowed)

    head_choices: list[tuple[tuple[PlanStep, float, float, int], ...]] = [()]
    for t in structural:
        for c in _untried_configs(t, tried):
            step = _step(t, c, analysis)
            head_choices.append((step,))
            if recovery is not None and t.family in RECOVERABLE:
                head_choices.append(_recovered(step, recovery, analysis))
    quant_choices: list[tuple[PlanStep, float, float, int] | None] = [None]
    for t in quantizers:
        configs = _untried_configs(t, tried)
        if configs:
            quant_choices.append(_step(t, configs[0], analysis))

    options = []
    for head, quant in itertools.product(head_choices, quant_choices):
        chosen = [*head, *([quant] if quant is not None else [])]
        if not chosen:
            continue
        size = speed = 1.0
        risk = 0
        for _, s, v, r in chosen:
            size, speed, risk = size * s, speed * v, risk + r
        options.append(_Option(tuple(c[0] for c in chosen), size, speed, risk))

    size_limit = criteria.size_limit(baseline.size_bytes)
    need_size = size_limit / current.size_bytes if size_limit is not None else None
    need_speed = (
        current.latency_ms_p50 / criteria.max_latency_ms
        if criteria.max_latency_ms is not None and current.latency_ms_p50
        else None
    )

    def shortfall(o: _Option) -> float:
        """How far the option's estimate stays from the limits (0 = meets them)."""
        gaps = [0.0]
        if need_size is not None:
            gaps.append(max(0.0, o.size_ratio / (need_size * _SIZE_MARGIN) - 1))
        if need_speed is not None:
            gaps.append(max(0.0, need_speed / o.speedup - 1))
        return max(gaps)

    if need_size is None and need_speed is None:
        # No limits but the accuracy guard: take the safest option that shrinks the model without slowing it.
        useful = [o for o in options if o.size_ratio < 0.98 and o.speedup >= 0.95] or [
            o for o in options if o.size_ratio < 0.98
        ]
        best = min(useful, key=lambda o: (o.risk, len(o.steps), o.size_ratio, -o.speedup), default=None)
        goal = "no size or latency limit: the least risky option that shrinks the model"
        if best is None and options:
            return OptimizationPlan(
                steps=[],
                decider="rules",
                summary="no remaining technique is expected to make the model smaller or faster",
            )
    else:
        feasible = [o for o in options if shortfall(o) == 0]
        if feasible:
            # among equally safe chains: not slower than the current model first, else the least slow, then smallest
            best = min(feasible, key=lambda o: (o.risk, len(o.steps), -min(o.speedup, 1.0), o.size_ratio, -o.speedup))
            goal = "the least risky chain whose estimate meets the limits"
        else:
            best = min(options, key=lambda o: (shortfall(o), o.risk), default=None)
            goal = "no chain is estimated to meet the limits: the one that gets closest"

    if best is None:
        why = "; ".join(skipped) if skipped else "every applicable technique and setting has been tried"
        return OptimizationPlan(steps=[], decider="rules", summary=f"nothing left to try ({why})")
    summary = (
        f"{goal}: {' -> '.join(s.technique for s in best.steps)} "
        f"(estimated size x{best.size_ratio:.2f}, speed x{best.speedup:.2f})"
    )
    return OptimizationPlan(steps=list(best.steps), decider="rules", summary=summary)
