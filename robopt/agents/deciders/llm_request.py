"""LLM intake: the chat model extracts the model and criteria from a request as structured output."""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import BaseModel, ConfigDict, Field

from robopt.agents.deciders.request_rules import ParsedRequest
from robopt.prompts import load_prompt, render_prompt


class RequestFields(BaseModel):
    """The model and criteria stated in a user's request; null where the request is silent."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Zoo model name or model file path")
    max_size: str | None = Field(default=None, description='e.g. "100KB", "2MB", "25%", "4x"')
    max_accuracy_drop: str | None = Field(default=None, description='e.g. "1%", "0.5pt", "2%rel"')
    max_latency: str | None = Field(default=None, description='e.g. "5ms"')
    target: str | None = Field(default=None, description="target hardware, free text")
    time_budget: str | None = Field(default=None, description='e.g. "10m"')


def llm_parse_request(model: BaseChatModel, text: str, zoo_names: list[str]) -> ParsedRequest:
    """Ask the chat model; the answer is validated by building Criteria from it (raises on bad values)."""
    structured = model.with_structured_output(RequestFields)
    answer = structured.invoke(
        [
            SystemMessage(load_prompt("intake_system")),
            HumanMessage(render_prompt("intake_request", zoo_names=", ".join(zoo_names), request=text)),
        ]
    )
    fields = answer if isinstance(answer, RequestFields) else RequestFields.model_validate(answer)
    parsed = ParsedRequest(**fields.model_dump())
    parsed.understood = [f"{k}={v}" for k, v in fields.model_dump().items() if v is not None]
    parsed.criteria()  # validates every value; raises InvalidCriteriaError
    return parsed
