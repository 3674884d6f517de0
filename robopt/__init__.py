"""robopt: autonomous optimization of robotics models for edge inference.

Public API (imported lazily so that `robopt --help` starts fast):
    optimize, chat, analyze, resume, history, rollback   -- run and inspect sessions
    Criteria, EvaluatorSpec, LoadOptions, Context         -- what to ask for and how to run
    OptimizationResult, AnalysisReport                    -- what comes back
    load_model, build_graph                               -- the intake tool and the LangGraph graph
    export_model                                          -- write a model that loads without robopt, verified
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "optimize": "robopt.api",
    "chat": "robopt.api",
    "analyze": "robopt.api",
    "resume": "robopt.api",
    "history": "robopt.api",
    "rollback": "robopt.api",
    "Criteria": "robopt.domain.criteria",
    "OptimizationResult": "robopt.domain.plan",
    "AnalysisReport": "robopt.domain.analysis",
    "EvaluatorSpec": "robopt.evaluation.base",
    "LoadOptions": "robopt.tools.loading",
    "load_model": "robopt.tools.loading",
    "Context": "robopt.graph.context",
    "build_graph": "robopt.graph.build",
    "export_model": "robopt.export",
}

__all__ = [  # noqa: RUF022 (grouped like _EXPORTS)
    "optimize",
    "chat",
    "analyze",
    "resume",
    "history",
    "rollback",
    "Criteria",
    "OptimizationResult",
    "AnalysisReport",
    "EvaluatorSpec",
    "LoadOptions",
    "load_model",
    "Context",
    "build_graph",
    "export_model",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'robopt' has no attribute {name!r}")
