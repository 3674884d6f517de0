"""Chains: a step followed by a recovery step is judged together with it; if the chain fails, both roll back."""

from __future__ import annotations

from robopt import api
from robopt.domain.criteria import Criteria
from robopt.graph.context import Context
from tests.agents.test_llm_deciders import plan_answer
from tests.helpers.scripted_chat import scripted

import tests.helpers.fault_techniques  # noqa: F401  isort: skip  (registers test_raise_recovery)


def test_a_failed_recovery_rolls_back_the_pruning_it_was_closing(fresh_data_dir) -> None:
    chat = scripted(
        [
            plan_answer(
                {"technique": "prune_structured", "config": {"ratio": 0.85}, "rationale": "shrink hard"},
                {"technique": "test_raise_recovery", "config": {}, "rationale": "win the accuracy back"},
            )
        ]
    )
    result = api.optimize(
        "digits-cnn",
        Criteria(max_size_ratio=0.5, max_metric_drop=0.01),
        techniques=["prune_structured", "test_raise_recovery"],
        context=Context(chat_model=chat, isolated_measurement=False, max_attempts=2),
    )
    prune, recovery = result.attempts[:2]
    assert prune.step.technique == "prune_structured" and prune.step.judged_with_next
    # pruning 85% of the channels breaks accuracy: accepted only provisionally, then undone with its chain
    assert "provisionally accepted" in prune.reason and "judged after the next step" in prune.reason
    assert prune.status == "rejected" and prune.reason.startswith("rolled back with its chain")
    assert recovery.status == "failed"
    assert result.best.artifact.sha256 == result.baseline.artifact.sha256
    assert result.chain() == []


def test_the_attempt_limit_holds_inside_a_plan(fresh_data_dir) -> None:
    chat = scripted(
        [
            plan_answer(
                {"technique": "prune_structured", "config": {"ratio": 0.3}, "rationale": "shrink"},
                {"technique": "quantize_dynamic_int8", "config": {}, "rationale": "then int8"},
            )
        ]
    )
    result = api.optimize(
        "digits-cnn",
        Criteria(max_size_ratio=0.05, max_metric_drop=0.05),
        techniques=["prune_structured", "quantize_dynamic_int8"],
        context=Context(chat_model=chat, isolated_measurement=False, max_attempts=1),
    )
    assert len(result.attempts) == 1 and result.attempts[0].status == "accepted"
    assert "attempt limit reached (1)" in result.stop_reason
