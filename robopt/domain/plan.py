"""The planning agent's output and the run's final result."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from robopt.domain.criteria import Criteria
from robopt.domain.records import ArtifactRef, Attempt, Measurement, PlanStep


class OptimizationPlan(BaseModel):
    """Ordered candidate steps. Each accepted step is the input of the next (a chain)."""

    model_config = ConfigDict(extra="forbid")

    steps: list[PlanStep]
    decider: Literal["rules", "llm"] = "rules"
    summary: str = ""


class DeciderEvent(BaseModel):
    """A decision worth keeping: which decider answered, and why an LLM answer was rejected."""

    model_config = ConfigDict(extra="forbid")

    agent: str
    decider: Literal["rules", "llm"]
    ok: bool
    detail: str = ""


class ModelSummary(BaseModel):
    """A model in the result: its artifact and what was measured about it."""

    model_config = ConfigDict(extra="forbid")

    artifact: ArtifactRef
    measurement: Measurement

    @property
    def size_bytes(self) -> int:
        return self.measurement.size_bytes

    @property
    def latency_ms_p50(self) -> float | None:
        return self.measurement.latency_ms_p50


class CriteriaCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    limit: float
    value: float | None
    met: bool
    detail: str = Field(default="", description="How the check was decided, when more than value <= limit.")


class OptimizationResult(BaseModel):
    """What a run returns: the baseline, the best accepted model, every attempt, and whether criteria are met."""

    model_config = ConfigDict(extra="forbid")

    session: str
    criteria: Criteria
    baseline: ModelSummary
    best: ModelSummary
    attempts: list[Attempt] = Field(default_factory=list)
    checks: list[CriteriaCheck] = Field(default_factory=list)
    criteria_met: bool
    stop_reason: str = ""
    decider_events: list[DeciderEvent] = Field(default_factory=list)

    @property
    def artifact(self) -> str:
        """Path of the best model's artifact."""
        return self.best.artifact.path

    def chain(self) -> list[Attempt]:
        """The accepted steps that lead from the baseline to the best model, in order (each one's measurement is
        the model after it); steps undone with a failed chain are not in it."""
        steps: list[Attempt] = []
        model = self.baseline.artifact.sha256
        for a in self.attempts:
            if a.status == "accepted" and a.input_artifact == model and a.artifact is not None:
                steps.append(a)
                model = a.artifact.sha256
        return steps if model == self.best.artifact.sha256 else []

    def summary_json(self) -> dict:
        """The compact JSON the CLI prints with --json."""

        def model(summary: ModelSummary) -> dict:
            m = summary.measurement
            return {
                "artifact": summary.artifact.path,
                "sha256": summary.artifact.sha256,
                "size_bytes": m.size_bytes,
                "latency_ms_p50": m.latency_ms_p50,
                "latency_ms_p95": m.latency_ms_p95,
                "peak_memory_bytes": m.peak_memory_bytes,
                "metrics": m.metrics,
            }

        return {
            "session": self.session,
            "criteria": self.criteria.model_dump(exclude_none=True),
            "baseline": model(self.baseline),
            "best": model(self.best),
            "criteria_met": self.criteria_met,
            "checks": [c.model_dump() for c in self.checks],
            "artifact": self.artifact,
            "stop_reason": self.stop_reason,
            "chain": [
                {
                    "index": a.index,
                    "technique": a.step.technique,
                    "size_bytes": a.measurement.size_bytes if a.measurement else None,
                    "latency_ms_p50": a.measurement.latency_ms_p50 if a.measurement else None,
                    "metrics": a.measurement.metrics if a.measurement else {},
                }
                for a in self.chain()
            ],
            "attempts": [
                {
                    "index": a.index,
                    "technique": a.step.technique,
                    "config": a.step.config,
                    "status": a.status,
                    "reason": a.reason,
                    "size_bytes": a.measurement.size_bytes if a.measurement else None,
                    "latency_ms_p50": a.measurement.latency_ms_p50 if a.measurement else None,
                    "metrics": a.measurement.metrics if a.measurement else {},
                    "artifact": a.artifact.path if a.artifact else None,
                }
                for a in self.attempts
            ],
        }
