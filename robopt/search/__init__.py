"""Architecture search: optuna-driven, multi-objective search over distillation students designed from a teacher."""

from robopt.search.space import SearchSpace, StudentConfig
from robopt.search.student_search import (
    LatencySettings,
    SearchBudget,
    SearchResult,
    StudentPoint,
    TrialTraining,
    choose_student,
    search_students,
)

__all__ = [
    "LatencySettings",
    "SearchBudget",
    "SearchResult",
    "SearchSpace",
    "StudentConfig",
    "StudentPoint",
    "TrialTraining",
    "choose_student",
    "search_students",
]
