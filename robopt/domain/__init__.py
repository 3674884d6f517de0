"""Domain objects shared by agents, tools and interfaces (pydantic, JSON round-trippable)."""

from robopt.domain.analysis import AnalysisReport, ArchitectureFamily, TechniqueOutlook
from robopt.domain.criteria import Criteria, criteria_from_strings, format_bytes
from robopt.domain.plan import CriteriaCheck, DeciderEvent, ModelSummary, OptimizationPlan, OptimizationResult
from robopt.domain.records import ArtifactRef, Attempt, InputSpec, Measurement, PlanStep, TensorSpec

__all__ = [
    "AnalysisReport",
    "ArchitectureFamily",
    "ArtifactRef",
    "Attempt",
    "Criteria",
    "CriteriaCheck",
    "DeciderEvent",
    "InputSpec",
    "Measurement",
    "ModelSummary",
    "OptimizationPlan",
    "OptimizationResult",
    "PlanStep",
    "TechniqueOutlook",
    "TensorSpec",
    "criteria_from_strings",
    "format_bytes",
]
