"""ONNX Runtime static INT8: per-channel int8 weights and calibrated activation ranges, as a QDQ graph.

The model (eager torch, exported first, or ONNX) goes through ONNX Runtime's quant_pre_process, then
quantize_static with QuantFormat.QDQ: QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into integer
kernels (QLinearConv, QGemm, QLinearMatMul) and that other runtimes (TensorRT, OpenVINO) read as well. Unlike the
dynamic path, convolutions get real integer kernels instead of ConvInteger, which is ~10x slower on this CPU.
Activations default to uint8: on this x86 CPU (AVX512-VNNI) ONNX Runtime fuses u8 x s8 QDQ groups into integer
kernels; with int8 activations half of MiniLM's MatMuls fell back to float and it ran 2.6x slower (measured).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueFailedError
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
from robopt.tools.techniques import _onnx_static

# Transformers: weights only (linear layers and embedding tables). Quantizing LayerNorm/Softmax/Add activations as
# well cost MiniLM's embeddings 0.94 -> 0.86 cosine to fp32 (measured).
TRANSFORMER_OP_TYPES = ("Conv", "MatMul", "Gemm", "Gather")
WEIGHT_OP_TYPES = ("Conv", "MatMul", "Gemm")


class OnnxStaticInt8Config(TechniqueConfig):
    """onnxruntime.quantization.quantize_static settings (QDQ format, int8 weights)."""

    samples: int = Field(default=64, ge=1, le=10_000, description="Calibration samples fed through the model.")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        default="minmax",
        description="How activation ranges are chosen from the calibration statistics: min/max, KL-divergence "
        "(entropy) or the 99.999th percentile of a histogram.",
    )
    activation_type: Literal["uint8", "int8"] = Field(
        default="uint8", description="Activation integer type; uint8 runs the fast u8 x s8 kernels on x86 CPUs."
    )
    per_channel: bool = Field(default=True, description="One weight scale per output channel (better accuracy).")
    op_types: tuple[str, ...] | None = Field(
        default=None,
        description="ONNX op types to quantize. None: every op ONNX Runtime quantizes for CNNs and MLPs; "
        f"{', '.join(TRANSFORMER_OP_TYPES)} for transformers.",
    )


def _backend(activation_type: str = "uint8") -> str:
    return (
        f"onnxruntime {_onnx_static.ort_version()} quantize_static (QDQ, per-channel int8 weights, {activation_type} "
        f"activations), {_onnx_static.EXECUTION_PROVIDER}"
    )


@register_technique
class OnnxStaticInt8(Technique):
    name = "onnx_static_int8"
    family = "quantization"
    description = (
        "ONNX Runtime static INT8 (QDQ): int8 per-channel weights and int8 activations calibrated on real inputs; "
        "convolutions run as integer kernels. Needs calibration data; the result is an ONNX model."
    )
    config_cls = OnnxStaticInt8Config

    def availability(self) -> Availability:
        return Availability(True, backend=_backend())

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return _onnx_static.static_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        if _onnx_static.is_transformer(analysis):
            return _onnx_static.int8_estimate(
                analysis, 1.6, "medium", "MiniLM on this CPU: 1.6x faster than fp32 in ONNX Runtime, cosine 0.94-0.95."
            )
        return _onnx_static.int8_estimate(
            analysis,
            1.0,
            "medium",  # activations get fixed, calibrated scales: riskier than dynamic INT8's per-call scales
            "Integer conv/GEMM kernels; digits-cnn: same speed at batch 1, 1.3x at batch 64.",
        )

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        """Fewer quantized ops: weight layers only, then also keeping embedding tables in float."""
        assert isinstance(config, OnnxStaticInt8Config)
        if config.op_types is None:
            return config.model_copy(update={"op_types": WEIGHT_OP_TYPES})
        if "Gather" in config.op_types:
            return config.model_copy(update={"op_types": tuple(t for t in config.op_types if t != "Gather")})
        return None

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, OnnxStaticInt8Config)
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        workdir = _onnx_static.require_workdir(context, self.name)
        calibration = _onnx_static.require_calibration(context, self.name, config.samples)
        graph = _onnx_static.float_graph(model, context, self.name, calibration)
        prepared = workdir / "model.pre.onnx"
        context.progress.message(self.name, "onnxruntime quant_pre_process")
        preprocessing = _onnx_static.preprocess(graph.path, prepared)
        feeds = _onnx_static.calibration_feeds(prepared, calibration)
        op_types = config.op_types
        if op_types is None and _onnx_static.is_transformer(context.analysis):
            op_types = TRANSFORMER_OP_TYPES
        output = workdir / "model.qdq.onnx"
        quantize_static(
            str(prepared),
            str(output),
            _onnx_static.CalibrationFeeds(feeds, context.progress, "calibrate"),
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            activation_type=QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[config.calibrate_method],
            op_types_to_quantize=list(op_types) if op_types else None,
            use_external_data_format=prepared.stat().st_size > 1_800_000_000,
            extra_options={"CalibStridedMinMax": 1},  # one sample per collection step (see CalibrationFeeds)
        )
        quantized = _onnx_static.quantized_ops(output)
        if not quantized:
            raise TechniqueFailedError(
                f"quantize_static left no op quantized (op types asked: {op_types or 'all'})",
                "give op_types that occur in the graph, e.g. Conv, MatMul, Gemm",
            )
        dynamic = _onnx_static.graph_op_types(output) & _onnx_static.DYNAMIC_INTEGER_OPS
        if dynamic:
            raise TechniqueFailedError(f"the static graph holds dynamic integer ops {sorted(dynamic)}")
        kernels = _onnx_static.runtime_kernels(output, workdir)
        return TechniqueResult(
            model=OnnxModule(output),
            backend=_backend(config.activation_type),
            onnx_path=output,
            notes=f"calibrated on {len(calibration)} samples from {calibration.source}",
            # The calibration set used (size, source, fingerprint) is recorded once, by the optimize node, in
            # details["calibration"]; the notes name it for direct callers.
            details={
                **graph.details,
                **preprocessing,
                "quant_format": "QDQ",
                "op_types_requested": list(op_types) if op_types else "all onnxruntime quantizes",
                "quantized_ops": quantized,
                "per_channel": config.per_channel,
                "weight_type": "int8",
                "activation_type": config.activation_type,
                "calibrate_method": config.calibrate_method,
                "onnxruntime_version": _onnx_static.ort_version(),
                **kernels,
            },
        )
