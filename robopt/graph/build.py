"""The LangGraph state machine:
intake -> analyze -> plan -> optimize -> evaluate -> (optimize | rollback -> plan | report)."""

from __future__ import annotations

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.store.base import BaseStore

from robopt.agents.analysis import analyze
from robopt.agents.evaluation import evaluate
from robopt.agents.intake import intake
from robopt.agents.optimization import optimize
from robopt.agents.planning import plan
from robopt.agents.report import report
from robopt.agents.rollback import rollback
from robopt.graph.context import Context
from robopt.graph.state import InputState, State


def build_graph(checkpointer: BaseCheckpointSaver | None = None, store: BaseStore | None = None) -> CompiledStateGraph:
    """Compile the optimization graph. Routes live in the nodes' Command return types."""
    builder = StateGraph(State, context_schema=Context, input_schema=InputState)
    builder.add_node("intake", intake)
    builder.add_node("analyze", analyze)
    builder.add_node("plan", plan)
    builder.add_node("optimize", optimize)
    builder.add_node("evaluate", evaluate)
    builder.add_node("rollback", rollback)
    builder.add_node("report", report)
    builder.add_edge(START, "intake")
    builder.add_edge("report", END)
    return builder.compile(checkpointer=checkpointer, store=store, name="robopt")


# For LangGraph Studio / `langgraph dev` (langgraph.json), which supplies its own checkpointer and store.
graph = build_graph()
