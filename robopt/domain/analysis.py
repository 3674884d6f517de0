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


class LayerSensitivityRecord(BaseModel):
    """One layer's measured output sensitivity (robopt.tools.sensitivity): the model's output error when this layer
    alone is quantized, per bit width."""

    model_config = ConfigDict(extra="forbid")

    name: str
    layer_type: str
    role: str = Field(description="vision_tower, projector, backbone, action_head or other.")
    params: int
    relative_error: dict[int, float | None] = Field(
        description="Output noise power / signal power per bit width (None: not finite)."
    )
    sqnr_db: dict[int, float | None] = Field(description="The same as output SQNR in dB (higher is better).")
    stored_bytes: dict[int, int] = Field(default_factory=dict, description="Packed bytes per bit width.")


class SensitivityReport(BaseModel):
    """Per-layer quantization sensitivity of the model, measured on calibration data."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="The measured proxy and quantizer.")
    calibration_source: str
    calibration_fingerprint: str = ""
    samples: int
    group_size: int
    bits: list[int]
    seconds: float
    layers: list[LayerSensitivityRecord] = Field(description="Most sensitive first.")
    uniform_sqnr_db: dict[int, float | None] = Field(
        default_factory=dict,
        description="Predicted output SQNR with every measured layer at b bits (per-layer noise powers summed).",
    )
    spread_db: dict[int, float] = Field(
        default_factory=dict, description="Per-layer SQNR range (best - worst layer) at b bits, in dB."
    )


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
    layer_sensitivity: SensitivityReport | None = Field(
        default=None, description="Per-layer quantization sensitivity (analysis node, when calibration data exists)."
    )
    unmeasured: dict[str, str] = Field(default_factory=dict)

    def fingerprint(self) -> str:
        """A coarse identity for history lookups: family, format and parameter count."""
        return f"{self.architecture}|{self.format}|{self.param_count}"
