"""ONNX Runtime dynamic INT8 for ONNX models: MatMul/Gemm weights stored as int8, activations quantized at run time.

Convolutions are deliberately left in float: ONNX Runtime's dynamic path turns them into ConvInteger, which runs
about 10x slower on this CPU (ENVIRONMENT.md); static QDQ quantization is the right tool for them.
"""

from __future__ import annotations

import functools

import onnxruntime
from pydantic import Field
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueNotApplicableError
from robopt.tools.onnx_module import OnnxModule
from robopt.tools.registry import (
    Applicability,
    ApplyContext,
    Availability,
    Estimate,
    Technique,
    TechniqueConfig,
    TechniqueResult,
    register_technique,
)
from robopt.tools.techniques import _layers

_OPS = ("MatMul", "Gemm")


class OnnxDynamicInt8Config(TechniqueConfig):
    """onnxruntime.quantization.quantize_dynamic settings."""

    per_channel: bool = Field(default=True, description="Per-output-channel weight scales (better accuracy).")
    reduce_range: bool = Field(default=False, description="7-bit weights, for CPUs without VNNI that overflow.")


@functools.cache
def _backend() -> str:
    return f"onnxruntime {onnxruntime.__version__} quantize_dynamic (MatMulInteger/DynamicQuantizeLinear)"


@register_technique
class OnnxDynamicInt8(Technique):
    name = "onnx_dynamic_int8"
    family = "quantization"
    description = (
        "ONNX Runtime dynamic INT8 for ONNX models: MatMul/Gemm weights as int8, activations quantized on the fly; "
        "convolutions stay float (dynamic ConvInteger is ~10x slower on CPUs)."
    )
    config_cls = OnnxDynamicInt8Config

    def availability(self) -> Availability:
        return Availability(True, backend=_backend())

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        if analysis.format != "onnx":
            return Applicability(False, "for ONNX models; PyTorch models use quantize_dynamic_int8")
        if quantized := _layers.quantized_layer_types(analysis):
            return Applicability(False, f"the model is already quantized ({', '.join(quantized)})")
        if _layers.params_of(analysis, _OPS) <= 0:
            return Applicability(False, "the graph has no MatMul/Gemm weights to quantize")
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        quantized = _layers.params_of(analysis, _OPS)
        share = _layers.share_of_params(analysis, quantized)
        return Estimate(
            size_ratio=_layers.size_ratio_after(analysis, quantized, _layers.INT8_BYTES_PER_PARAM),
            speedup=_layers.amdahl_speedup(share, 1.25),
            accuracy_risk="low",
            note=(
                f"{share:.0%} of weights are MatMul/Gemm initializers: int8 (~1 byte each). Speed-up ~1.25x on "
                "those ops on this CPU (MiniLM measured 1.25x); convolutions are left in float."
            ),
        )

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, OnnxDynamicInt8Config)
        if not isinstance(model, OnnxModule):
            raise TechniqueNotApplicableError(f"{self.name} needs an ONNX model", "use quantize_dynamic_int8")
        if context.workdir is None:
            raise TechniqueNotApplicableError(f"{self.name} writes a new ONNX file and needs a work directory")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        output = context.workdir / "model.int8.onnx"
        context.progress.update(self.name, 0, 1, "quantizing MatMul/Gemm weights")
        quantize_dynamic(
            model.path,
            output,
            op_types_to_quantize=list(_OPS),
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            weight_type=QuantType.QInt8,
        )
        context.progress.update(self.name, 1, 1)
        return TechniqueResult(
            model=OnnxModule(output),
            backend=_backend(),
            onnx_path=output,
            details={"op_types": list(_OPS), "per_channel": config.per_channel},
        )
