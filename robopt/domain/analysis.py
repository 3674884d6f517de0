"""The analysis agent's output: what the model is, what it costs, and what each technique could gain."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from robopt.domain.records import InputSpec

ArchitectureFamily = Literal[
    "cnn", "mlp-policy", "transformer-encoder", "decoder-llm", "vision-language-action", "unknown"
]


class TechniqueOutlook(BaseModel):
    """Whether a registered technique applies to this model and what it is expected to gain."""

    model_config = ConfigDict(extra="forbid")

    technique: str
    family: str
    available: bool
    applicable: bool
    reason: str = ""
    expected_size_ratio: float | None = None
    expected_speedup: float | None = None
    note: str = ""


class AnalysisReport(BaseModel):
    """Static and measured profile of one model."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field(description="Format of the artifact analysed: torch-module, torchscript or onnx.")
    source: str
    source_format: str | None = Field(default=None, description="Format of the user's file, detected by content.")
    param_count: int
    trainable_param_count: int | None = None
    size_on_disk_bytes: int
    size_in_memory_bytes: int = Field(description="Bytes of parameters and buffers held in memory.")
    flops: int | None = Field(default=None, description="FLOPs of one forward pass on the example input.")
    macs: int | None = None
    layer_census: dict[str, int] = Field(default_factory=dict, description="Leaf layer type -> count.")
    params_by_layer_type: dict[str, int] = Field(default_factory=dict)
    architecture: ArchitectureFamily = "unknown"
    architecture_evidence: str = ""
    input_spec: InputSpec | None = None
    output_shapes: list[list[int]] = Field(default_factory=list)
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    peak_memory_bytes: int | None = None
    techniques: list[TechniqueOutlook] = Field(default_factory=list)
    unmeasured: dict[str, str] = Field(default_factory=dict)

    def fingerprint(self) -> str:
        """A coarse identity for history lookups: family, format and parameter count."""
        return f"{self.architecture}|{self.format}|{self.param_count}"
