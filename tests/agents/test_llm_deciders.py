"""The LLM side of the deciders, with a scripted chat model: valid answers are used, invalid ones are recorded
and the deterministic deciders take over."""

from __future__ import annotations

from langchain_core.messages import AIMessage

from robopt import api
from robopt.domain.criteria import Criteria
from robopt.graph.context import Context
from tests.helpers.scripted_chat import scripted, tool_answer

PLAN = "OptimizationPlanAnswer"


def plan_answer(*steps: dict) -> AIMessage:
    return tool_answer(PLAN, {"steps": list(steps), "summary": "scripted plan"})


def run(model, criteria=None):
    criteria = criteria or Criteria(max_size_ratio=1 / 3)
    return api.optimize("digits-cnn", criteria, context=Context(chat_model=model, isolated_measurement=False))


def test_a_valid_llm_plan_is_followed_with_its_config(fresh_data_dir):
    model = scripted(
        [
            plan_answer(
                {
                    "technique": "quantize_dynamic_int8",
                    "config": {"per_channel": False},
                    "rationale": "Linear layers hold most weights",
                }
            )
        ]
    )
    result = run(model)
    assert result.attempts[0].step.technique == "quantize_dynamic_int8"
    assert result.attempts[0].step.config["per_channel"] is False
    assert result.attempts[0].step.rationale == "Linear layers hold most weights"
    assert result.criteria_met
    assert [(e.agent, e.decider, e.ok) for e in result.decider_events] == [("plan", "llm", True)]
    prompt = "\n".join(str(m.content) for m in model.prompts[0])
    assert "size <= 33% of original" in prompt and "quantize_dynamic_int8" in prompt and "config_schema" in prompt


def test_a_hallucinated_technique_is_rejected_and_rules_plan(fresh_data_dir):
    model = scripted([plan_answer({"technique": "magic_compress", "config": {}, "rationale": "trust me"})])
    result = run(model)
    llm_event, rules_event = result.decider_events[0], result.decider_events[1]
    assert (llm_event.decider, llm_event.ok) == ("llm", False)
    assert "magic_compress" in llm_event.detail
    assert (rules_event.decider, rules_event.ok) == ("rules", True)
    assert result.criteria_met and result.attempts[0].step.technique == "quantize_dynamic_int8"


def test_a_malformed_config_is_rejected(fresh_data_dir):
    model = scripted(
        [plan_answer({"technique": "quantize_dynamic_int8", "config": {"dtype": "qint4"}, "rationale": "x"})]
    )
    result = run(model)
    assert not result.decider_events[0].ok and "dtype" in result.decider_events[0].detail
    assert result.decider_events[1].decider == "rules"
    assert result.attempts[0].step.config["dtype"] == "qint8"


def test_a_prose_answer_without_structure_is_rejected(fresh_data_dir):
    result = run(scripted([AIMessage(content="You should probably quantize it.")]))
    assert not result.decider_events[0].ok
    assert result.decider_events[1].decider == "rules" and result.criteria_met


def test_llm_intake_then_llm_plan(fresh_data_dir):
    model = scripted(
        [
            tool_answer("RequestFields", {"model": "digits-cnn", "max_size": "200KB", "max_accuracy_drop": "1%"}),
            plan_answer({"technique": "quantize_dynamic_int8", "config": {}, "rationale": "r"}),
        ]
    )
    result = api.chat(
        "please make the digits classifier fit in 200 kilobytes, keeping accuracy within a point",
        context=Context(chat_model=model, isolated_measurement=False),
    )
    assert result.criteria.max_size_bytes == 200_000 and result.criteria.max_metric_drop == 0.01
    assert [(e.agent, e.decider, e.ok) for e in result.decider_events][:2] == [
        ("intake", "llm", True),
        ("plan", "llm", True),
    ]
    assert result.criteria_met


def test_invalid_llm_intake_falls_back_to_the_rules_parser(fresh_data_dir):
    model = scripted(
        [
            tool_answer("RequestFields", {"model": "digits-cnn", "max_size": "huge"}),
            plan_answer({"technique": "quantize_dynamic_int8", "config": {}, "rationale": "r"}),
        ]
    )
    result = api.chat(
        "shrink digits-cnn to under 200 KB and lose at most 1% accuracy",
        context=Context(chat_model=model, isolated_measurement=False),
    )
    intake_llm, intake_rules = result.decider_events[0], result.decider_events[1]
    assert (intake_llm.agent, intake_llm.ok) == ("intake", False) and "huge" in intake_llm.detail
    assert (intake_rules.agent, intake_rules.decider) == ("intake", "rules")
    assert result.criteria.max_size_bytes == 200_000


def test_a_configured_but_unbuildable_llm_is_reported_not_silently_ignored(fresh_data_dir):
    result = api.optimize(
        "digits-cnn",
        Criteria(max_size_ratio=1 / 3),
        context=Context(llm="no-such-provider:model-x", isolated_measurement=False),
    )
    assert not result.decider_events[0].ok and "no-such-provider" in result.decider_events[0].detail
    assert result.criteria_met
