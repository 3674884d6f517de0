"""Serializable records kept in graph state: artifact references, measurements and attempts."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ArtifactFormat = Literal["torch-module", "torchscript", "onnx"]


class TensorSpec(BaseModel):
    """One model input: name, shape (batch dimension included) and dtype; `high` bounds integer inputs."""

    model_config = ConfigDict(extra="forbid")

    name: str = "input"
    shape: list[int]
    dtype: str = "float32"
    high: int | None = Field(
        default=None, description="Exclusive upper bound for integer inputs (token ids: vocab size)."
    )


class InputSpec(BaseModel):
    """The inputs a model takes, in call order."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[TensorSpec]
    source: str = Field(description="Where the shapes came from: model, metadata, caller or zoo.")


class ArtifactRef(BaseModel):
    """A reference to an immutable, content-addressed model artifact in the artifact store."""

    model_config = ConfigDict(extra="forbid")

    sha256: str
    path: str = Field(description="Path of the artifact's payload file.")
    format: ArtifactFormat
    size_bytes: int
    parent: str | None = Field(default=None, description="sha256 of the artifact this one was made from.")
    technique: str | None = None
    input_spec: InputSpec | None = None


class Measurement(BaseModel):
    """Everything measured about one model on this machine. Missing values carry their reason in `unmeasured`."""

    model_config = ConfigDict(extra="forbid")

    size_bytes: int
    param_count: int | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    latency_threads: int | None = None
    peak_memory_bytes: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    samples: dict[str, list[float]] = Field(
        default_factory=dict,
        description="Per-sample outcomes behind a metric (e.g. success per seeded episode), for paired decisions.",
    )
    primary_metric: str | None = None
    higher_is_better: bool = True
    outputs_finite: bool = True
    unmeasured: dict[str, str] = Field(default_factory=dict, description="Quantity -> why it was not measured.")

    @property
    def primary_value(self) -> float | None:
        return self.metrics.get(self.primary_metric) if self.primary_metric else None


class PlanStep(BaseModel):
    """One candidate step: a registered technique, its config, why, and what it should gain."""

    model_config = ConfigDict(extra="forbid")

    technique: str
    config: dict[str, Any] = Field(default_factory=dict)
    rationale: str = ""
    expected_size_ratio: float | None = Field(default=None, description="Expected size after / before.")
    expected_speedup: float | None = Field(default=None, description="Expected latency before / after.")
    judged_with_next: bool = Field(
        default=False,
        description="Provisional: the metric is judged after the NEXT step of the plan (e.g. pruning before its "
        "recovery fine-tuning); if that step fails, both are rolled back.",
    )

    def key(self) -> str:
        import json

        return f"{self.technique}:{json.dumps(self.config, sort_keys=True)}"


AttemptStatus = Literal["accepted", "rejected", "failed", "skipped"]


class Attempt(BaseModel):
    """One applied step and its fate. `failed` = the technique raised; `rejected` = evaluation said no."""

    model_config = ConfigDict(extra="forbid")

    index: int
    step: PlanStep
    status: AttemptStatus
    reason: str = ""
    input_artifact: str = Field(description="sha256 of the model the step was applied to.")
    artifact: ArtifactRef | None = None
    measurement: Measurement | None = None
    backend: str | None = None
    duration_s: float = 0.0
    session: str | None = None
    model_fingerprint: str | None = None
