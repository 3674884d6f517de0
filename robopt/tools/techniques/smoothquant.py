"""SmoothQuant + static INT8 for transformers, by NNCF's post-training quantization on its ONNX backend.

`nncf.quantize(model_type=TRANSFORMER)` first runs SmoothQuant (per-channel scales, strength `alpha`, move the
activation outliers of each MatMul input into its weights; they are inserted as `.../nncf_smooth_quant` Mul
nodes), then places QuantizeLinear/DequantizeLinear pairs with its transformer rules (int8 per-channel weights,
calibrated activations, softmax/layer-norm paths left in float) and corrects the biases. The output is a QDQ ONNX
model that ONNX Runtime runs with integer kernels (MatMulIntegerToFloat, QGemm).

Why NNCF: it is installed (3.4), maintained, and supports SmoothQuant on ONNX. ONNX Runtime's own
`extra_options={"SmoothQuant": True}` imports neural-compressor, which robopt does not depend on.
Measured on MiniLM (ONNX Runtime, 1 thread, this CPU): cosine to fp32 0.993 (ONNX Runtime static INT8: 0.944-0.948)
but no faster than fp32: the 18 Q/K/V MatMuls behind the smoothing Mul nodes are not fused into integer kernels
and run in float on dequantized weights (see result.details["float_kernels"]). NNCF without SmoothQuant keeps the same
cosine and is 1.4x faster; alpha=0.95 (NNCF's default) lowers the cosine to 0.986.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from typing import Any

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

SMOOTHING_NODE_SUFFIX = "/nncf_smooth_quant"


class SmoothQuantInt8Config(TechniqueConfig):
    """NNCF post-training quantization settings (transformer model type, SmoothQuant on MatMul inputs)."""

    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="SmoothQuant migration strength: 0 keeps activations as they are, 1 moves all of their range "
        "into the weights.",
    )
    samples: int = Field(default=64, ge=1, le=10_000, description="Calibration samples for the statistics.")


@functools.cache
def _nncf_version() -> str | None:
    if importlib.util.find_spec("nncf") is None:
        return None
    return importlib.metadata.version("nncf")


def _backend() -> str:
    return (
        f"nncf {_nncf_version()} SmoothQuant + post-training quantization (ONNX backend, QDQ), onnxruntime "
        f"{_onnx_static.ort_version()} {_onnx_static.EXECUTION_PROVIDER}"
    )


@register_technique
class SmoothQuantInt8(Technique):
    name = "smoothquant_int8"
    family = "quantization"
    description = (
        "SmoothQuant + static INT8 for transformers (NNCF, QDQ ONNX for ONNX Runtime): activation outliers are "
        "migrated into the weights before int8 quantization. Needs calibration data; the result is an ONNX model."
    )
    config_cls = SmoothQuantInt8Config

    def availability(self) -> Availability:
        if _nncf_version() is None:
            return Availability(False, "nncf is not installed (pip install nncf)")
        return Availability(True, backend=_backend())

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        if not _onnx_static.is_transformer(analysis):
            return Applicability(
                False,
                f"SmoothQuant targets transformer activations; this model is {analysis.architecture!r} "
                "(use onnx_static_int8)",
            )
        return _onnx_static.static_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        return _onnx_static.int8_estimate(
            analysis,
            1.0,
            "medium",  # static (calibrated) activation scales
            "MiniLM on this CPU: cosine to fp32 0.993, same latency as fp32 in ONNX Runtime (the Q/K/V MatMuls "
            "behind the smoothing Mul nodes run in float).",
        )

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, SmoothQuantInt8Config)
        import onnx

        workdir = _onnx_static.require_workdir(context, self.name)
        calibration = _onnx_static.require_calibration(context, self.name, config.samples)
        graph = _onnx_static.float_graph(model, context, self.name, calibration)
        feeds = _onnx_static.calibration_feeds(graph.path, calibration)
        context.progress.message(self.name, f"nncf SmoothQuant (alpha {config.alpha}) and INT8 calibration")
        quantized = _nncf_quantize(onnx.load(str(graph.path)), feeds, config.alpha, context)
        output = workdir / "model.smoothquant.qdq.onnx"
        large = quantized.ByteSize() > 1_800_000_000
        onnx.save_model(quantized, str(output), save_as_external_data=large, location=f"{output.name}.data")
        smoothing = sum(1 for n in quantized.graph.node if n.name.endswith(SMOOTHING_NODE_SUFFIX))
        ops = _onnx_static.quantized_ops(output)
        if not ops:
            raise TechniqueFailedError("nncf quantized no op of this graph", "try onnx_static_int8")
        kernels = _onnx_static.runtime_kernels(output, workdir)
        return TechniqueResult(
            model=OnnxModule(output),
            backend=_backend(),
            onnx_path=output,
            notes=f"SmoothQuant alpha {config.alpha}; {len(calibration)} calibration samples from {calibration.source}",
            # The calibration set used (size, source, fingerprint) is recorded once, by the optimize node, in
            # details["calibration"]; the notes name it for direct callers.
            details={
                **graph.details,
                "preprocessing": "none (nncf runs its own ONNX shape inference and graph matching)",
                "quant_format": "QDQ",
                "smoothquant_alpha": config.alpha,
                "smoothquant_scales": smoothing,
                "quantized_ops": ops,
                "nncf_version": _nncf_version(),
                "onnxruntime_version": _onnx_static.ort_version(),
                **kernels,
            },
        )


def _nncf_quantize(model: Any, feeds: list[dict[str, Any]], alpha: float, context: ApplyContext) -> Any:
    """nncf.quantize on an onnx.ModelProto; each calibration item passed reports progress (and honours cancel)."""
    os.environ.setdefault("NNCF_CI", "1")  # read when nncf is imported: no usage telemetry from robopt runs
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    seen = 0

    def report(feed: dict[str, Any]) -> dict[str, Any]:
        nonlocal seen
        seen += 1
        context.progress.update("calibrate", (seen - 1) % len(feeds) + 1, len(feeds))
        return feed

    return nncf.quantize(
        model,
        nncf.Dataset(feeds, report),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha)
        ),
    )
