"""Intake agent: understands the request (LLM or rules), validates the model and stores the baseline artifact."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from langgraph.runtime import Runtime
from langgraph.types import Command

from robopt.agents.common import decider_event, node_env, session_id
from robopt.agents.deciders.chat_model import resolve_chat_model
from robopt.agents.deciders.llm_request import llm_parse_request
from robopt.agents.deciders.request_rules import ParsedRequest, parse_request
from robopt.calibration import check_calibration_path, validate_calibration_file
from robopt.domain.criteria import Criteria, criteria_from_strings
from robopt.errors import RequestNotUnderstoodError
from robopt.evaluation.base import EvaluatorSpec
from robopt.evaluation.language_model import fill_model_dir
from robopt.graph.context import Context
from robopt.graph.state import State
from robopt.tools.ingest import ingest_model
from robopt.tools.loading import LoadOptions


def _understand(text: str, context: Context, events: list[dict]) -> ParsedRequest:
    from robopt import zoo

    names = zoo.list_entries()
    chat, error = resolve_chat_model(context)
    if error:
        events.append(decider_event("intake", "llm", False, error))
    if chat is not None:
        try:
            parsed = llm_parse_request(chat, text, names)
            if parsed.model:
                events.append(decider_event("intake", "llm", True, "; ".join(parsed.understood)))
                return parsed
            events.append(decider_event("intake", "llm", False, "the LLM named no model"))
        except Exception as e:  # any provider or validation failure: recorded, then the rules decide
            events.append(decider_event("intake", "llm", False, f"invalid answer: {type(e).__name__}: {e}"))
    parsed = parse_request(text, names)
    events.append(decider_event("intake", "rules", True, "; ".join(parsed.understood)))
    return parsed


def intake(state: State, runtime: Runtime[Context]) -> Command[Literal["analyze"]]:
    env = node_env("intake", runtime)
    events: list[dict] = []
    reference = state.get("model")
    criteria = state.get("criteria")
    if state.get("request"):
        parsed = _understand(state["request"], env.context, events)
        reference = reference or parsed.model
        if not criteria:
            criteria = parsed.criteria().model_dump(mode="json")
    if not reference:
        raise RequestNotUnderstoodError("no model was given", "pass a model path or a zoo name (e.g. digits-cnn)")
    calibration = state.get("calibration")
    if calibration:  # a missing file fails now, before the model is ingested (zoo models may need building)
        check_calibration_path(Path(calibration))

    ingested = ingest_model(
        reference,
        store=env.store,
        zoo_dir=env.settings.zoo_dir,
        options=LoadOptions.model_validate(state.get("load_options") or {}),
        progress=env.progress,
    )
    if criteria is None and ingested.card is not None and ingested.card.get("suggested_criteria"):
        suggested = ingested.card["suggested_criteria"]
        criteria_obj = criteria_from_strings(**suggested)
        env.progress.message("intake", f"no criteria given: using the model card's suggestion {suggested}")
    else:
        criteria_obj = Criteria.model_validate(criteria or {})
    if state.get("evaluator"):
        spec = EvaluatorSpec.model_validate(state["evaluator"])
        # Language-model evaluators need the tokenizer: from the zoo card's folder, or the HF folder given.
        card_dir = ((ingested.card or {}).get("evaluator") or {}).get("options", {}).get("model_dir")
        spec = fill_model_dir(spec, card_dir or (ingested.source if ingested.source_format == "hf-folder" else None))
    elif ingested.card is not None:
        spec = EvaluatorSpec.model_validate(ingested.card["evaluator"])
    else:
        spec = EvaluatorSpec(name="output-fidelity")
    env.progress.message(
        "intake",
        f"model {ingested.source} ({ingested.source_format}); criteria: "
        f"{criteria_obj.describe()}; evaluator: {spec.name}",
    )
    if calibration:  # checked against the model now, not minutes later when a technique first asks for it
        env.progress.message("intake", validate_calibration_file(Path(calibration), spec, ingested.artifact.input_spec))
    return Command(
        goto="analyze",
        update={
            "model": reference,
            "session": session_id(),
            "started_at": time.time(),
            "criteria": criteria_obj.model_dump(mode="json"),
            "ingested": ingested.to_state(),
            "evaluator_resolved": spec.model_dump(mode="json"),
            "decider_events": events,
            "attempts": [],
            "replans": 0,
            "cursor": 0,
            "plan": None,
            "candidate": None,
            "calibration": calibration or None,
        },
    )
