"""Resolve the run's chat model: an explicit instance, else an init_chat_model spec from context or settings."""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel

from robopt.graph.context import Context


def resolve_chat_model(context: Context) -> tuple[BaseChatModel | None, str | None]:
    """(model, None) when one is configured and builds; (None, reason) when it is configured but fails;
    (None, None) when no LLM is configured (the deterministic deciders are used)."""
    if context.chat_model is not None:
        return context.chat_model, None
    spec = context.settings().llm
    if not spec:
        return None, None
    from langchain.chat_models import init_chat_model

    try:
        return init_chat_model(spec), None
    except (ImportError, ValueError) as e:
        return None, f"cannot initialise chat model {spec!r}: {e}"
