"""LLM planning: structured output whose schema is generated from the technique registry, then validated again."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import BaseModel, ConfigDict, Field, create_model

from robopt.domain.analysis import AnalysisReport, SensitivityReport
from robopt.domain.criteria import Criteria
from robopt.domain.plan import OptimizationPlan
from robopt.domain.records import Attempt, Measurement, PlanStep
from robopt.memory.history import summarize
from robopt.prompts import load_prompt, render_prompt
from robopt.tools.registry import Technique, validate_step


def plan_schema(techniques: list[Technique]) -> type[BaseModel]:
    """`{steps: [{technique, config, rationale}], summary}` with `config` typed per technique (one source of truth)."""
    step_models = [
        create_model(
            f"Step_{t.name}",
            __config__=ConfigDict(extra="forbid"),
            __doc__=f"{t.name} ({t.family}): {t.description}",
            technique=(Literal[t.name], ...),  # type: ignore[valid-type]
            config=(t.config_cls, Field(default_factory=t.config_cls)),
            rationale=(str, Field(description="one sentence: why this step, in this place")),
        )
        for t in techniques
    ]
    step_type: Any = (
        step_models[0]
        if len(step_models) == 1
        else Annotated[Union[tuple(step_models)], Field(discriminator="technique")]  # noqa: UP007
    )
    return create_model(
        "OptimizationPlanAnswer",
        __config__=ConfigDict(extra="forbid"),
        __doc__="The ordered compression steps still to apply to the current model.",
        steps=(list[step_type], ...),
        summary=(str, Field(description="the strategy in one or two sentences")),
    )


def _analysis_brief(analysis: AnalysisReport) -> str:
    brief = analysis.model_dump(
        mode="json",
        include={
            "architecture",
            "architecture_evidence",
            "format",
            "param_count",
            "size_on_disk_bytes",
            "flops",
            "layer_census",
            "params_by_layer_type",
            "latency_ms_p50",
            "peak_memory_bytes",
            "unmeasured",
        },
    )
    if analysis.layer_sensitivity is not None:
        brief["layer_sensitivity"] = sensitivity_brief(analysis.layer_sensitivity)
    return json.dumps(brief, indent=1)


def sensitivity_brief(report: SensitivityReport, top: int = 8) -> dict[str, Any]:
    """What the planner needs of the per-layer sensitivity: the predicted output SQNR at each uniform width, how
    unevenly the layers react (a large spread is where mixed precision beats uniform bits) and the most sensitive
    layers."""
    return {
        "method": report.method,
        "calibration": f"{report.samples} samples: {report.calibration_source}",
        "predicted_output_sqnr_db_uniform": report.uniform_sqnr_db,
        "per_layer_sqnr_spread_db": report.spread_db,
        "most_sensitive_layers": [
            {"name": r.name, "role": r.role, "params": r.params, "sqnr_db": r.sqnr_db} for r in report.layers[:top]
        ],
        "rule_of_thumb": "output SQNR >= 25 dB rarely hurts the task metric, < 15 dB often does; prefer "
        "mixed_precision over a uniform width when the spread at that width is large (> 6 dB)",
    }


def _techniques_brief(techniques: list[Technique], analysis: AnalysisReport) -> str:
    rows = []
    for t in techniques:
        outlook = t.outlook(analysis)
        rows.append(
            {
                "name": t.name,
                "family": t.family,
                "description": t.description,
                "expected_size_ratio": outlook.expected_size_ratio,
                "expected_speedup": outlook.expected_speedup,
                "note": outlook.note,
                "config_schema": t.config_cls.model_json_schema(),
            }
        )
    return json.dumps(rows, indent=1)


def llm_plan(
    model: BaseChatModel,
    *,
    techniques: list[Technique],
    analysis: AnalysisReport,
    current: Measurement,
    criteria: Criteria,
    attempts: list[Attempt],
    past_attempts: list[Attempt],
) -> OptimizationPlan:
    """Ask the chat model for a plan. Raises (pydantic/parser/registry errors) when the answer is invalid:
    the caller records the reason and falls back to the rule-based planner."""
    schema = plan_schema(techniques)
    prompt = render_prompt(
        "planner_request",
        criteria=criteria.describe() or "none besides the default accuracy guard",
        analysis=_analysis_brief(analysis),
        current=current.model_dump_json(include={"size_bytes", "latency_ms_p50", "metrics"}),
        attempts=json.dumps(summarize(attempts), indent=1) if attempts else "none yet",
        history=json.dumps(summarize(past_attempts[-20:]), indent=1) if past_attempts else "none",
        techniques=_techniques_brief(techniques, analysis),
    )
    answer = model.with_structured_output(schema).invoke(
        [SystemMessage(load_prompt("planner_system")), HumanMessage(prompt)]
    )
    parsed = answer if isinstance(answer, schema) else schema.model_validate(answer)
    steps = []
    for raw in parsed.steps:  # type: ignore[attr-defined]
        step = PlanStep(
            technique=raw.technique,
            config=raw.config.model_dump(mode="json"),
            rationale=raw.rationale,
        )
        technique, config = validate_step(step, analysis)
        est = technique.estimate(analysis, config)
        step.expected_size_ratio = round(est.size_ratio, 4)
        step.expected_speedup = round(est.speedup, 3)
        steps.append(step)
    return OptimizationPlan(steps=steps, decider="llm", summary=parsed.summary)  # type: ignore[attr-defined]
