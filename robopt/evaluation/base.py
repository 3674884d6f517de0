"""The evaluator interface: a task metric measured on a model, chosen by an EvaluatorSpec."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from robopt.domain.records import InputSpec
from robopt.errors import EvaluationError
from robopt.progress import Progress


class EvaluatorSpec(BaseModel):
    """Which evaluator judges the model, on which data, with which options."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Registered evaluator name, e.g. 'classification' or 'output-fidelity'.")
    dataset: str | None = Field(default=None, description="A bundled dataset name (e.g. 'digits') or a file path.")
    options: dict[str, Any] = Field(default_factory=dict)


@dataclass
class EvaluationSetup:
    """What an evaluator may need besides its spec: the reference (original) model and the input spec."""

    reference: nn.Module | None = None
    input_spec: InputSpec | None = None
    seed: int = 0


@dataclass(frozen=True)
class ModelFacts:
    """What was measured about the model being evaluated before the evaluator runs (all optional).

    Control-rate-aware evaluators use the latency; device-profile predictions use FLOPs and weight bytes.
    """

    latency_ms: float | None = None
    latency_source: str = "measured on this machine"
    flops: int | None = None
    weight_bytes: int | None = None
    param_count: int | None = None


@dataclass
class Evaluation:
    """Metrics, plus per-sample outcomes (e.g. success per seeded episode) for paired statistical decisions."""

    metrics: dict[str, float]
    samples: dict[str, list[float]] = field(default_factory=dict)


class Evaluator(ABC):
    """Measures a task metric. `primary_metric` is the one acceptance is judged on."""

    name: ClassVar[str]
    description: ClassVar[str]
    primary_metric: str
    higher_is_better: bool = True
    needs_reference: ClassVar[bool] = False  # True: EvaluationSetup.reference must be the original model
    criteria_options: ClassVar[tuple[str, ...]] = ()  # Criteria fields passed to the evaluator as options

    @abstractmethod
    def evaluate(self, model: nn.Module, progress: Progress) -> dict[str, float]:
        """Return metric name -> value. Raise EvaluationError when the model cannot be evaluated."""

    def evaluate_detailed(self, model: nn.Module, progress: Progress, facts: ModelFacts | None = None) -> Evaluation:
        """Metrics and per-sample outcomes; evaluators that use `facts` or keep samples override this."""
        return Evaluation(metrics=self.evaluate(model, progress))


EvaluatorFactory = Callable[[EvaluatorSpec, EvaluationSetup], Evaluator]
_EVALUATORS: dict[str, tuple[EvaluatorFactory, str]] = {}


def register_evaluator(name: str, description: str) -> Callable[[EvaluatorFactory], EvaluatorFactory]:
    def decorator(factory: EvaluatorFactory) -> EvaluatorFactory:
        _EVALUATORS[name] = (factory, description)
        return factory

    return decorator


def _ensure_builtin() -> None:
    import robopt.evaluation.evaluators  # noqa: F401  (registers the built-in evaluators on import)


def list_evaluators() -> dict[str, str]:
    _ensure_builtin()
    return {name: desc for name, (_, desc) in sorted(_EVALUATORS.items())}


def evaluator_needs_reference(name: str) -> bool:
    """Whether the evaluator registered as `name` compares against the original model."""
    _ensure_builtin()
    factory = _EVALUATORS.get(name, (None, ""))[0]
    return bool(getattr(factory, "needs_reference", False))


def evaluator_criteria_options(name: str) -> tuple[str, ...]:
    """The criteria fields (e.g. episodes, control_rate_hz) the evaluator registered as `name` takes as options."""
    _ensure_builtin()
    factory = _EVALUATORS.get(name, (None, ""))[0]
    return tuple(getattr(factory, "criteria_options", ()))


def build_evaluator(spec: EvaluatorSpec, setup: EvaluationSetup) -> Evaluator:
    _ensure_builtin()
    if spec.name not in _EVALUATORS:
        raise EvaluationError(
            f"no evaluator named {spec.name!r}", f"available evaluators: {', '.join(sorted(_EVALUATORS))}"
        )
    return _EVALUATORS[spec.name][0](spec, setup)
