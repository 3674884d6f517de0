"""The technique registry: each compression technique is a typed config plus applicable/estimate/apply."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from robopt.calibration.base import CalibrationSource
from robopt.domain.analysis import AnalysisReport, TechniqueOutlook
from robopt.domain.records import PlanStep
from robopt.errors import TechniqueNotApplicableError, TechniqueNotFoundError
from robopt.progress import Progress


class TechniqueConfig(BaseModel):
    """Base of every technique config: strict, immutable, JSON round-trippable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""
    backend: str = ""


@dataclass(frozen=True)
class Applicability:
    applicable: bool
    reason: str = ""


Risk = Literal["low", "medium", "high"]


@dataclass(frozen=True)
class Estimate:
    """Expected effect relative to the input model: size after/before, latency before/after."""

    size_ratio: float
    speedup: float
    accuracy_risk: Risk
    note: str = ""


@dataclass
class ApplyContext:
    """What a technique may use besides the model: example inputs, the analysis, progress, a seed, a
    scratch directory (deleted after the result is stored) for techniques that write files, and a calibration
    source: `calibration(n)` gives n real inputs (robopt.calibration); None when the caller has none, and a
    technique that needs calibration then raises TechniqueNotApplicableError saying so."""

    analysis: AnalysisReport
    example_inputs: tuple[Any, ...] | None = None
    progress: Progress = field(default_factory=Progress)
    seed: int = 0
    workdir: Path | None = None
    calibration: CalibrationSource | None = None
    teacher: Callable[[], nn.Module] | None = None
    """The run's original model, loaded fresh on each call: the teacher of distillation and recovery steps
    (None outside a run: such techniques then distil from the model they are given, before changing it)."""
    task: str | None = None
    """The closed-loop task of the run's evaluator (e.g. "reacher"; robopt.robotics.task.make_task), for techniques
    that roll out policies (DAgger); None when the run is not judged in closed loop."""


@dataclass
class TechniqueResult:
    """The transformed model and how it was made. `backend` names the library/kernel that ran.

    Techniques that produce an ONNX graph also set `onnx_path` (a file in the context's workdir); the
    artifact is then stored from that file, and `model` is the runnable OnnxModule over it.
    """

    model: nn.Module
    backend: str
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    onnx_path: Path | None = None


class Technique(ABC):
    """A registry entry. `apply` receives a fresh model loaded from the input artifact and may modify it."""

    name: ClassVar[str]
    family: ClassVar[str]
    description: ClassVar[str]
    config_cls: ClassVar[type[TechniqueConfig]]
    planned_by_default: ClassVar[bool] = True
    """False: deciders only use it when the caller names it (it gains nothing measurable on its own)."""

    def availability(self) -> Availability:
        return Availability(True)

    @abstractmethod
    def applicable(self, analysis: AnalysisReport) -> Applicability: ...

    @abstractmethod
    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate: ...

    @abstractmethod
    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult: ...

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        """A less aggressive config to retry with after a rejection, or None."""
        return None

    def stronger(self, config: TechniqueConfig) -> TechniqueConfig | None:
        """A more aggressive config than `config` (for size targets the default cannot reach), or None."""
        return None

    def default_config(self) -> TechniqueConfig:
        return self.config_cls()

    def outlook(self, analysis: AnalysisReport) -> TechniqueOutlook:
        avail = self.availability()
        appl = self.applicable(analysis) if avail.available else Applicability(False, "backend unavailable")
        est = self.estimate(analysis, self.default_config()) if avail.available and appl.applicable else None
        return TechniqueOutlook(
            technique=self.name,
            family=self.family,
            available=avail.available,
            applicable=appl.applicable,
            reason=avail.reason if not avail.available else appl.reason,
            expected_size_ratio=est.size_ratio if est else None,
            expected_speedup=est.speedup if est else None,
            note=est.note if est else "",
        )


_REGISTRY: dict[str, Technique] = {}


def register_technique(cls: type[Technique]) -> type[Technique]:
    """Class decorator: one line registers a technique under its `name`."""
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"technique {cls.name!r} is already registered by {type(_REGISTRY[cls.name]).__name__}")
    _REGISTRY[cls.name] = cls()
    return cls


def _ensure_builtin() -> None:
    import importlib

    import robopt.tools.techniques  # noqa: F401  (registers the built-in techniques on import)
    from robopt.settings import get_settings

    for module in get_settings().plugin_modules():  # ROBOPT_PLUGINS: third-party techniques register on import
        importlib.import_module(module)


def list_techniques() -> list[Technique]:
    _ensure_builtin()
    return list(_REGISTRY.values())


def get_technique(name: str) -> Technique:
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TechniqueNotFoundError(
            f"no technique named {name!r}", f"registered techniques: {', '.join(sorted(_REGISTRY))}"
        ) from None


def plannable(allowed: set[str] | None) -> list[Technique]:
    """Techniques a decider may choose from: the caller's list, else those planned by default."""
    return [t for t in list_techniques() if (t.name in allowed if allowed is not None else t.planned_by_default)]


def parse_config(technique: Technique, config: dict[str, Any] | TechniqueConfig) -> TechniqueConfig:
    """Validate a config dict against the technique's schema (raises pydantic ValidationError)."""
    if isinstance(config, technique.config_cls):
        return config
    if isinstance(config, TechniqueConfig):
        raise TechniqueNotApplicableError(
            f"{type(config).__name__} is not a config of {technique.name}",
            f"use {technique.config_cls.__name__}",
        )
    return technique.config_cls.model_validate(config)


def validate_step(step: PlanStep, analysis: AnalysisReport | None = None) -> tuple[Technique, TechniqueConfig]:
    """Check a plan step against the registry: known name, valid config, available, applicable.

    Raises TechniqueNotFoundError / TechniqueNotApplicableError with the reason.
    """
    technique = get_technique(step.technique)
    try:
        config = parse_config(technique, step.config)
    except ValidationError as e:
        raise TechniqueNotApplicableError(
            f"invalid config for {technique.name}: {e.errors(include_url=False)}",
            f"its schema: {technique.config_cls.model_json_schema()}",
        ) from e
    avail = technique.availability()
    if not avail.available:
        raise TechniqueNotApplicableError(f"{technique.name} is unavailable here: {avail.reason}")
    if analysis is not None:
        appl = technique.applicable(analysis)
        if not appl.applicable:
            raise TechniqueNotApplicableError(f"{technique.name} does not apply to this model: {appl.reason}")
    return technique, config


def technique_table() -> list[dict[str, Any]]:
    """Every registered technique with family, config schema and availability (for `robopt techniques`)."""
    rows = []
    for t in list_techniques():
        avail = t.availability()
        rows.append(
            {
                "name": t.name,
                "family": t.family,
                "description": t.description,
                "available": avail.available,
                "reason": avail.reason,
                "backend": avail.backend,
                "config_schema": t.config_cls.model_json_schema(),
            }
        )
    return rows
