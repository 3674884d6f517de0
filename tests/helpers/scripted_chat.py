"""A scripted chat model for LLM-path tests: returns queued messages and supports bind_tools/structured output."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from pydantic import Field


class ScriptedChatModel(GenericFakeChatModel):
    """Each call pops the next queued AIMessage; every prompt it received is kept in `prompts`."""

    prompts: list[list[BaseMessage]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedChatModel:
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any):  # type: ignore[override]
        self.prompts.append(list(messages))
        return super()._generate(messages, *args, **kwargs)


def tool_answer(name: str, args: dict[str, Any]) -> AIMessage:
    """An AIMessage that calls the structured-output tool `name` with `args`."""
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": f"call-{name}"}])


def scripted(messages: Iterable[AIMessage]) -> ScriptedChatModel:
    return ScriptedChatModel(messages=iter(list(messages)), prompts=[])
